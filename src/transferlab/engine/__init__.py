"""Engine: one training run. Device and precision policy, preprocessing, the frozen-feature cache, the forward path,
the training loop and its per-epoch hooks, the run folder, the lr range test, runs across processes.

Submodules are imported where used (`from transferlab.engine.train import train`): this package imports nothing
itself, so importing one part never loads the others.
"""
