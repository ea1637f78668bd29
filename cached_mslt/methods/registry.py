"""The comparison methods (docs/methods.md): each is a schedule of phases driven by the one training loop.

The modules here hold the structural operators the loop calls at phase boundaries
(stacking, share/unshare, multi-level coalescing, the PLD model); none owns a loop.
"""

# The registry: method name -> (module of this package, its `run(ctx)` function). Modules
# are imported when a method runs (they import the harness, which reads this table).
METHODS: dict[str, tuple[str, str]] = {
    "full": ("full", "run"),
    "stacking": ("stacking", "run"),
    "mslt-live": ("mslt", "run_live"),
    "mslt-cached": ("mslt", "run_cached"),
    "mslt-live-joint": ("mslt", "run_live_joint"),
    "mslt-cached-joint": ("mslt", "run_cached_joint"),
    "pld": ("pld", "run"),
    "share-unshare": ("share_unshare", "run"),
    "multilevel": ("multilevel", "run"),
}
