"""RunConfig: everything one training run can be told, once, with its type, allowed values, help text, section and role.

The CLI flags, `--set key=value` overrides, TOML files and the study grid axes are all read through
`RunConfig.from_dict`, so a typo or a bad value fails the same way everywhere: one line naming the key. Each field
names its section (config/identity.py: data, split, model, augment, optim, schedule, execution) and its role (result,
record or runtime): the identities of runs, trials and caches are read from these declarations.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .identity import ROLES, SECTIONS
from .metrics import METRICS
from .presets import PRESETS, with_preset

TRACKERS = ("mlflow", "tensorboard")  # the values of RunConfig.log
MIN_MIX_ALPHA = 0.01  # the smallest mixup / cutmix alpha other than 0 (off)
# train --help's groups of options, each gathering the sections it names
HELP_GROUPS = {"data": ("data", "split"), "model": ("model",), "augmentation": ("augment",),
               "training": ("optim", "schedule"), "execution and output": ("execution",)}  # fmt: skip


def _opt(
    default,
    help: str,
    *,
    section: str,
    role: str = "result",
    choices: tuple | None = None,
    min: float | None = None,
    max: float | None = None,
    each: tuple | None = None,
    added: bool = False,
):
    """A RunConfig field: its help text and checks, its `section` (config.identity.SECTIONS) and `role` (result:
    changes a run's numbers; record: what it records; runtime: neither). `added`: an option added after runs were
    recorded, off at its default, which joins an identity only when set (config/identity.py), so that the runs and
    trials recorded before it keep theirs."""
    if section not in SECTIONS or role not in ROLES:
        raise ValueError(f"an option's section must be one of {SECTIONS} and its role one of {ROLES}")
    meta = {"help": help, "choices": choices, "min": min, "max": max, "section": section, "role": role, "each": each,
            "added": added}  # fmt: skip
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


option = _opt  # the name a new option, or a test's, is declared with


def default_cache_dir() -> str:
    return os.environ.get("TRANSFERLAB_CACHE", str(Path.home() / ".cache" / "transferlab"))


@dataclass
class RunConfig:
    # data
    data: str = _opt(
        "cifar10",
        "'cifar10' (torchvision's CIFAR-10) or the path of an ImageFolder tree <root>/<class>/<image>",
        section="data",
    )
    labels: str | None = _opt(
        None,
        "a CSV or TSV file (header row) of image paths and labels, instead of --data (leave --data unset); "
        "paths relative to the file's folder",
        section="data",
    )
    labels_path_column: str = _opt("path", "--labels: the column holding each image's path", section="data")
    labels_label_column: str = _opt(
        "label", "--labels: the column holding each image's label (its class name)", section="data"
    )
    labels_split_column: str | None = _opt(
        "split",
        "--labels: the column giving each row's part (train, val or test), used instead of carving a split when the "
        "file has it; 'none' to ignore it",
        section="data",
    )
    data_dir: str | None = _opt(
        None,
        "where CIFAR-10 is downloaded, or where a local cifar-10-batches-py folder lies (env TRANSFERLAB_DATA_DIR)",
        section="data",
    )
    download: bool = _opt(True, "download CIFAR-10 when it is not in --data-dir", section="data", role="runtime")
    cache_dir: str | None = _opt(
        None,
        "cache of decoded images and frozen features (env TRANSFERLAB_CACHE, default ~/.cache/transferlab)",
        section="execution",
        role="runtime",
    )
    skip_bad_images: bool = _opt(
        False, "skip unreadable images with a counted warning instead of stopping", section="data"
    )
    limit: int | None = _opt(None, "use a stratified subset of N images (quick tries)", min=10, section="split")
    test_fraction: float = _opt(
        0.1, "fraction of all images held out as the test split", min=0.0, max=0.9, section="split"
    )
    val_fraction: float = _opt(0.1, "fraction of all images used for validation", min=0.01, max=0.9, section="split")
    official_test: bool = _opt(
        False, "use the source's official test split (CIFAR-10 only) instead of carving one", section="split"
    )
    split_seed: int = _opt(
        0,
        "seed of the test and validation splits (kept apart from --seed so seeds share one split)",
        min=0,
        max=2**32 - 2,  # scikit-learn's seeds end at 2**32 - 1, and validation uses split_seed + 1
        section="split",
    )
    folds: int = _opt(
        0,
        "cross-validation: cut the images left after the test split into this many stratified folds (shuffled with "
        "--split-seed), fold --fold being the validation split, instead of --val-fraction (0 = off; the test split "
        "is the same either way)",
        min=0,
        section="split",
    )
    fold: int = _opt(0, "with --folds: which fold (0 .. folds - 1) is the validation split", min=0, section="split")
    # model
    preset: str | None = _opt(
        None,
        "a whole recipe in one flag (regime, schedule, augmentation, epochs; config/presets.py): fast (the head on "
        "cached features), fine-tune (the head, then the last two groups one at a time), best (every layer); any "
        "option given beside it wins",
        section="model",
        role="runtime",  # how the options were named; the run is the values they resolve to
        choices=tuple(PRESETS),
    )
    arch: str = _opt(
        "squeezenet1_1", "backbone: a torchvision name or timm/<name> (see `transferlab models`)", section="model"
    )
    weights: str = _opt(
        "imagenet",
        "'imagenet' (torchvision's published weights; timm's from the local Hugging Face cache), a local state-dict "
        "or .safetensors path, or 'none' (env TRANSFERLAB_WEIGHTS)",
        section="model",
    )
    head: str = _opt(
        "paper",
        "classifier head: 'paper' (dropout, 1x1 conv, ReLU, average pool, as in the study), "
        "'linear' (average pool, dropout, linear) or 'mlp' (1x1 conv, BatchNorm, ReLU, average pool, dropout, linear); "
        "ResNet and timm models have only their own linear classifier ('paper' means it)",
        choices=("paper", "linear", "mlp"),
        section="model",
    )
    dropout: float | None = _opt(
        None,
        "dropout before the head's classifier layer; default: the backbone's (0.5, the study's, for torchvision "
        "heads; timm's default, 0, for timm models, passed to timm as drop_rate)",
        min=0.0,
        max=0.99,
        section="model",
    )
    strategy: str = _opt(
        "frozen",
        "which layers train: frozen (head only), partial (last --unfreeze groups + head), full",
        choices=("frozen", "partial", "full"),
        section="model",
    )
    unfreeze: int = _opt(
        2,
        "number of last backbone groups (Fire modules for SqueezeNet) that train under 'partial'",
        min=1,
        section="model",
    )
    # input
    resolution: int | None = _opt(
        None,
        "side in pixels the images are resized to before the backbone; default: the backbone's pretrained input "
        "size (224 for the torchvision backbones; the bundled CIFAR-10 studies set 32)",
        min=8,
        max=1024,
        section="model",
    )
    crop_fraction: float | None = _opt(
        None,
        "central fraction of each stored square kept before resizing (timm's crop_pct: 0.875 at 224 px reads the "
        "centre 224 of 256); default: the backbone's (1 for torchvision backbones, timm's pretrained crop_pct)",
        min=0.1,
        max=1.0,
        section="model",
    )
    interpolation: str | None = _opt(
        None,
        "how the square is resized to --resolution; default: the backbone's (bilinear for torchvision backbones, "
        "timm's pretrained interpolation)",
        choices=("bilinear", "bicubic"),
        section="model",
    )
    storage_size: int | None = _opt(
        None,
        "largest side images are stored at after decoding (never enlarged); default: --resolution / --crop-fraction "
        "(a study: the largest of its trials on the same data)",
        min=8,
        max=4096,
        section="data",
    )
    resize_policy: str = _opt(
        "crop",
        "how a file becomes a square: crop (shorter side, centre square), squash (whole image, aspect lost), "
        "pad (whole image, letterboxed in black); the same in training, evaluate and predict",
        choices=("crop", "squash", "pad"),
        section="data",
    )
    normalize: str = _opt(
        "imagenet",
        "input normalisation: the backbone's ImageNet mean/std, or the training split's own statistics",
        choices=("imagenet", "dataset"),
        section="model",
    )
    crop_padding: int = _opt(
        0, "random-crop augmentation: pad by this many pixels and crop back (0 = off)", min=0, section="augment"
    )
    feature_shift: int = _opt(
        0,
        "shift the frozen groups' output by up to N cells at random in training (zero-padded): "
        "a random crop that keeps the feature cache valid (0 = off)",
        min=0,
        section="augment",
    )
    flip: bool = _opt(False, "random horizontal-flip augmentation", section="augment")
    random_resized_crop: float = _opt(
        0.0,
        "RandomResizedCrop in training: a random box of this share of the image's area or more (timm trains with "
        "0.08), aspect 3/4 to 4/3, resized to --resolution; 0 = off",
        min=0.0,
        max=1.0,
        section="augment",
        added=True,
    )
    auto_augment: str = _opt(
        "none",
        "a random policy of photometric and geometric ops in training (torchvision's batched implementations): "
        "randaugment (2 ops at magnitude 9), trivialaugment (1 op, any magnitude), none",
        choices=("none", "randaugment", "trivialaugment"),
        section="augment",
        added=True,
    )
    mixup: float = _opt(
        0.0, "mixup in training: blend pairs of images and their labels, Beta(a, a) weights (timm's 0.8); 0 = off",
        min=0.0, section="augment", added=True,
    )  # fmt: skip
    cutmix: float = _opt(
        0.0, "cutmix in training: paste a box of another image, labels by area, Beta(a, a) (timm's 1.0); 0 = off; "
        "with --mixup each batch takes one of the two at random", min=0.0, section="augment", added=True,
    )  # fmt: skip
    tta_flip: bool = _opt(
        False, "evaluate on the mean of the image and its mirror (test-time augmentation)", section="augment"
    )
    # optimisation
    loss: str = _opt(
        "ce",
        "ce (cross-entropy) or mse (mean squared error of softmax vs one-hot, the study's)",
        choices=("ce", "mse"),
        section="optim",
    )
    label_smoothing: float = _opt(0.0, "label smoothing for the ce loss", min=0.0, max=0.5, section="optim")
    class_weights: str = _opt(
        "none",
        "imbalanced classes: 'balanced' weights each class's training loss by n / (classes x its training count) "
        "(sklearn's formula); validation and test loss stay unweighted so they compare across options",
        choices=("none", "balanced"),
        section="optim",
    )
    sampler: str = _opt(
        "shuffle",
        "training order: 'shuffle' (each image once per epoch) or 'balanced' (as many draws, with replacement, "
        "each class equally likely)",
        choices=("shuffle", "balanced"),
        section="optim",
    )
    optimizer: str = _opt("adamw", "optimiser", choices=("sgd", "adam", "adamw"), section="optim")
    lr: float = _opt(1e-3, "peak learning rate", min=0.0, section="schedule")
    momentum: float = _opt(0.9, "SGD momentum (Nesterov)", min=0.0, max=0.999, section="optim")
    weight_decay: float = _opt(0.01, "weight decay (decoupled for adamw)", min=0.0, section="optim")
    schedule: str = _opt(
        "constant",
        "learning-rate schedule; constant and step do not depend on --epochs, "
        "so runs that differ only in epochs share one computation",
        choices=("constant", "step", "cosine", "onecycle"),
        section="schedule",
    )
    warmup_epochs: float = _opt(0.0, "linear warm-up from 0 over this many epochs", min=0.0, section="schedule")
    step_every: int = _opt(
        30, "'step' schedule: multiply the learning rate by 0.1 every N epochs", min=1, section="schedule"
    )
    gradual_unfreeze: int = _opt(
        0,
        "fastai-style gradual unfreezing: train the head alone, "
        "then unfreeze one more of the strategy's groups (backwards) every N epochs (0 = off)",
        min=0,
        section="optim",
    )
    lr_group_decay: float = _opt(
        1.0,
        "discriminative learning rates: each backbone group gets this factor times the lr "
        "of the group after it (1 = off)",
        min=0.0,
        max=1.0,
        section="optim",
    )
    epochs: int = _opt(10, "training epochs", min=1, section="schedule")
    batch_size: int = _opt(250, "batch size", min=1, section="optim")
    # execution
    device: str = _opt(
        "auto", "auto (CUDA when available), cpu or cuda", choices=("auto", "cpu", "cuda"), section="execution"
    )
    seed: int = _opt(
        0, "seed of initialisation, shuffling, augmentation and dropout", min=0, max=2**32 - 1, section="execution"
    )
    cache_features: str = _opt(
        "auto",
        "cache the frozen prefix's activations: auto (when no random augmentation precedes it), off",
        choices=("auto", "off"),
        section="execution",
    )
    compile: bool = _opt(False, "torch.compile the trainable part", section="execution")
    amp: str = _opt("auto", "bf16 autocast: auto (on CUDA), on, off", choices=("auto", "on", "off"),
                    section="execution")  # fmt: skip
    record_epochs: list = _opt([], "also record metrics and the best checkpoint at these epochs (shared epoch "
                               "prefixes)", section="execution", role="record")  # fmt: skip
    metric: str = _opt(
        "val_accuracy",
        "what picks the best epoch and its checkpoint (a study sets it from its own `metric`); only val_loss is "
        "lower-is-better",
        choices=tuple(METRICS),
        section="schedule",
    )
    progress: bool = _opt(True, "show a progress bar", section="execution", role="runtime")
    log: list = _opt(
        [],
        "also record the run's config, per-epoch metrics and files with mlflow and/or tensorboard "
        "(comma-separated; MLFLOW_TRACKING_URI or <out>/mlflow.db; <out>/tensorboard)",
        each=TRACKERS,
        section="execution",
        role="runtime",
    )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, values: dict[str, Any], *, base: RunConfig | None = None, where: str = "") -> RunConfig:
        """Build a config from plain values (TOML, CLI, grid point), validating every key."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        current = dataclasses.asdict(base) if base is not None else {}
        given = {}
        for raw_key, value in values.items():
            key = raw_key.replace("-", "_")
            if key not in known:
                raise ConfigError(f"{where}unknown key {raw_key!r}{suggest(key, known)}")
            given[key] = value
        for key, value in with_preset(given, where).items():  # a preset fills what is not given beside it
            current[key] = _coerce(key, value, known[key], where)
        config = cls(**current)
        config.validate(where)
        return config

    def validate(self, where: str = "") -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            if meta.get("choices") and value is not None and value not in meta["choices"]:
                raise ConfigError(
                    f"{where}{f.name} = {value!r}: expected one of {', '.join(map(str, meta['choices']))}"
                )
            if value is None or isinstance(value, (bool, str, list)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{where}{f.name} = {value!r}: must be a finite number")
            if meta.get("min") is not None and value < meta["min"]:
                raise ConfigError(f"{where}{f.name} = {value!r}: must be >= {meta['min']}")
            if meta.get("max") is not None and value > meta["max"]:
                raise ConfigError(f"{where}{f.name} = {value!r}: must be <= {meta['max']}")
        if self.test_fraction + self.val_fraction >= 0.95:
            raise ConfigError(
                f"{where}test_fraction + val_fraction = {self.test_fraction + self.val_fraction}: "
                "leaves too little to train on"
            )
        for name in self.log:
            if name not in TRACKERS:
                raise ConfigError(f"{where}log = {self.log!r}: {name!r} is not one of {', '.join(TRACKERS)}")
        if any(not isinstance(e, int) or isinstance(e, bool) or e < 1 for e in self.record_epochs):
            raise ConfigError(f"{where}record_epochs = {self.record_epochs!r}: expected positive integers")
        if any(e > self.epochs for e in self.record_epochs):
            raise ConfigError(
                f"{where}record_epochs = {self.record_epochs!r}: beyond epochs = {self.epochs}, never reached"
            )
        if self.labels is not None and self.data != "cifar10":
            raise ConfigError(
                f"{where}labels = {self.labels!r} and data = {self.data!r}: give one data source "
                "(leave data unset with labels)"
            )
        if self.official_test and (self.data != "cifar10" or self.labels is not None):
            raise ConfigError(
                f"{where}official_test: only the cifar10 source has an official test split; "
                f"for {self.labels or self.data} use test_fraction"
            )
        if self.class_weights == "balanced" and self.sampler == "balanced":
            raise ConfigError(
                f"{where}class_weights = 'balanced' with sampler = 'balanced' corrects the imbalance twice: choose one"
            )
        if self.folds == 1:
            raise ConfigError(f"{where}folds = 1: cross-validation needs at least 2 folds (0 turns it off)")
        if self.fold and not self.folds:
            raise ConfigError(f"{where}fold = {self.fold} without folds: set folds = K (2 or more) to cut K folds")
        if self.folds and self.fold >= self.folds:
            raise ConfigError(
                f"{where}fold = {self.fold}: with folds = {self.folds} the folds are 0 .. {self.folds - 1}"
            )
        for name in ("mixup", "cutmix"):
            if 0 < getattr(self, name) < MIN_MIX_ALPHA:  # Beta(a, a) then draws 0 or 1 (or, in float32, fails)
                raise ConfigError(f"{where}{name} = {getattr(self, name)}: below {MIN_MIX_ALPHA} it mixes nothing; "
                                  "0 turns it off, timm uses 0.8 (mixup) and 1.0 (cutmix)")  # fmt: skip
        if (self.mixup or self.cutmix) and self.class_weights == "balanced":
            raise ConfigError(
                f"{where}mixup / cutmix with class_weights = 'balanced': a blended label has no one class to weight; "
                "use sampler = 'balanced' instead"
            )
        if self.feature_shift and self.strategy == "full":
            raise ConfigError(
                f"{where}feature_shift = {self.feature_shift}: strategy 'full' freezes nothing whose output could be "
                "shifted (use crop_padding)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def source(self) -> str:
        """The data source as the user named it: the labels file, 'cifar10' or the image folder."""
        return self.labels if self.labels is not None else self.data

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir or default_cache_dir()).expanduser()

    @property
    def epochs_independent_schedule(self) -> bool:
        return self.schedule in ("constant", "step")


def suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(key: str, value: Any, f: dataclasses.Field, where: str) -> Any:
    """Turn strings from the command line into the field's type; reject values of the wrong type."""
    hint = typing.get_type_hints(RunConfig)[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{where}{key} may not be empty")
    if base is str and isinstance(value, str) and not value.strip():  # "" would name the current folder
        raise ConfigError(f"{where}{key} may not be empty")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if (base is list or typing.get_origin(base) is list) and f.metadata.get("each"):  # names: "a,b", [..]
            names = value.replace(",", " ").split() if isinstance(value, str) else list(value)
            return list(dict.fromkeys(str(n) for n in names if str(n).lower() != "none"))
        if base is list or typing.get_origin(base) is list:
            if isinstance(value, str):
                value = [int(v) for v in value.replace(",", " ").split()]
            return list(value)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError
    except (TypeError, ValueError):
        name = getattr(base, "__name__", str(base))
        raise ConfigError(f"{where}{key} = {value!r}: expected {name}") from None
