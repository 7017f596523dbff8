"""The train wing: the epoch loop and its hooks (optimizer groups, unfreeze phases, loss,
EMA, early stopping, torchrun, the LR finder, multi-label scores)."""
