"""transferlab: transfer-learning studies on image classifiers.

Library API (the CLI is a thin layer over it):

    from transferlab import RunConfig, train, lr_find, evaluate_checkpoint, predict_files, run_study
    result = train(RunConfig(data="path/to/images", strategy="partial", epochs=5), "runs/try")
    print(lr_find(RunConfig(data="path/to/images", strategy="partial")).suggestion)   # the lr range test

The names are imported on first use (module __getattr__), so `import transferlab` and `transferlab --help` do not
load torch.
"""

from __future__ import annotations

import importlib

from .config import ConfigError, RunConfig, StudySpec
from .version import __version__

# name -> the module defining it, imported on first use: `import transferlab` and `transferlab --help` stay light
_LAZY = {
    "DataError": "errors",
    "ImageSet": "data.imageset",
    "load_images": "data.sources",
    "make_split": "data.split",
    "evaluate_checkpoint": "inference.evaluate",
    "load_checkpoint": "inference.predict",
    "predict_files": "inference.predict",
    "export_checkpoint": "inference.export",
    "LRFindResult": "engine.lr_curve",
    "lr_find": "engine.lr_find",
    "REGISTRY": "models.registry",
    "resolve": "models.registry",
    "WeightsError": "errors",
    "build_model": "models.weights",
    "RunResult": "engine.rundir",
    "RunData": "engine.run",
    "Run": "engine.run",
    "prepare_run": "engine.run",
    "build_run": "engine.run",
    "fit": "engine.loop",
    "train": "engine.train",
    "run_study": "study.runner",
}

__all__ = [
    "REGISTRY", "ConfigError", "DataError", "ImageSet", "LRFindResult", "Run", "RunConfig", "RunData", "RunResult",
    "StudySpec", "WeightsError", "__version__", "build_model", "build_run", "evaluate_checkpoint", "export_checkpoint",
    "fit", "load_checkpoint", "load_images", "lr_find", "make_split", "predict_files", "prepare_run", "resolve",
    "run_study", "train",
]  # fmt: skip
assert set(__all__) == {"ConfigError", "RunConfig", "StudySpec", "__version__", *_LAZY}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'transferlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
