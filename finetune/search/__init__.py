"""Hyperparameter search (`python train.py -m hparams_search=optuna`) on Optuna, run by the
project's own workers: each takes the next trial from the study's storage as soon as its
last one ends, reports every epoch to the pruner, and resumes a dead worker's trial from
its checkpoint. docs/sweeps.md says how to use it."""
