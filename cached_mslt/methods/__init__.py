"""The comparison methods (docs/methods.md): each is a schedule of phases driven by the one training loop.

The modules here hold the structural operators the loop calls at phase boundaries
(stacking, share/unshare, multi-level coalescing, the PLD model); none owns a loop.
"""
