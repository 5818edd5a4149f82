"""Scoring: metrics and the one scoring path, probabilities and calibration, statistics, selection (which is best).

Submodules are imported where used: this package imports nothing itself.
"""
