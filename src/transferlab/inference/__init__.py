"""Inference: the checkpoint format, evaluate / predict with a checkpoint, export, error analysis, run cost.

Submodules are imported where used: this package imports nothing itself.
"""
