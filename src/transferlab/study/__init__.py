"""Study: a grid (or searches) of runs in an Optuna storage: typed trial records, identities, storage, workers,
selection and the single test evaluation.

Submodules are imported where used: this package imports nothing itself.
"""
