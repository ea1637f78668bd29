"""The comparison methods (docs/methods.md): each is a schedule of phases driven by the one
training loop, on a shared harness; `run_comparison` runs several side by side and reports.

Imports `stages`, `training`, `models`, `data`, `evaluation` and below.
"""

from cached_mslt.methods.compare import run_comparison
from cached_mslt.methods.harness import run_method
from cached_mslt.methods.registry import METHODS

__all__ = [
    "METHODS",
    "run_comparison",
    "run_method",
]
