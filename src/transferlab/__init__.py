"""transferlab: transfer-learning studies on image classifiers.

Library API (the CLI is a thin layer over it):

    from transferlab import RunConfig, train, evaluate_checkpoint, predict_files, run_study
    result = train(RunConfig(data="path/to/images", strategy="partial", epochs=5), "runs/try")
"""

from .config import ConfigError, RunConfig, StudySpec
from .data import DataError, ImageSet, load_images, make_split
from .evaluate import evaluate_checkpoint, load_checkpoint, predict_files
from .models import REGISTRY, WeightsError, build_model
from .train import RunResult, Trainer, train
from .version import __version__

__all__ = [
    "ConfigError",
    "DataError",
    "ImageSet",
    "REGISTRY",
    "RunConfig",
    "RunResult",
    "StudySpec",
    "Trainer",
    "WeightsError",
    "__version__",
    "build_model",
    "evaluate_checkpoint",
    "load_checkpoint",
    "load_images",
    "make_split",
    "predict_files",
    "run_study",
    "train",
]


def run_study(*args, **kwargs):
    from .study import run_study as _run

    return _run(*args, **kwargs)
