"""Report: a study's storage -> tables, figures and prose -> report.md and a self-contained report.html.

Submodules are imported where used: this package imports nothing itself.
"""
