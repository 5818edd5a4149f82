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
import sys
import types

from .config import ConfigError, RunConfig, StudySpec
from .version import __version__

_LAZY = {
    "DataError": "data",
    "ImageSet": "data",
    "load_images": "data",
    "make_split": "data",
    "evaluate_checkpoint": "evaluate",
    "load_checkpoint": "evaluate",
    "predict_files": "evaluate",
    "export_checkpoint": "export",
    "LRFindResult": "lr_find",
    "lr_find": "lr_find",
    "REGISTRY": "models",
    "WeightsError": "models",
    "build_model": "models",
    "RunResult": "train",
    "Trainer": "train",
    "train": "train",
}

__all__ = [
    "ConfigError",
    "DataError",
    "ImageSet",
    "LRFindResult",
    "REGISTRY",
    "RunConfig",
    "RunResult",
    "StudySpec",
    "Trainer",
    "WeightsError",
    "__version__",
    "build_model",
    "evaluate_checkpoint",
    "export_checkpoint",
    "load_checkpoint",
    "load_images",
    "lr_find",
    "make_split",
    "predict_files",
    "run_study",
    "train",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'transferlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule transferlab.train binds it as the package's `train`; the function keeps the name.
        if not (name in _LAZY and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def run_study(*args, **kwargs):
    from .study import run_study as _run

    return _run(*args, **kwargs)
