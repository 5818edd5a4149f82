"""Typed configuration: one RunConfig per training run, one StudySpec per grid of runs.

Everything a user can set lives here, once, with its type, its allowed values and its help text.
The CLI flags, `--set key=value` overrides, TOML files and the study grid axes are all read
through `RunConfig.from_dict`, so a typo or a bad value fails the same way everywhere: one line
naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range (message is one line)."""


# Selection metrics: keys of a run's per-epoch rows. All but val_loss are higher-is-better.
METRICS = ("val_accuracy", "val_loss", "val_balanced_accuracy", "val_macro_f1")


TRACKERS = ("mlflow", "tensorboard")  # the values of RunConfig.log


def higher_is_better(metric: str) -> bool:
    return metric != "val_loss"


def _opt(
    default,
    help: str,
    choices: tuple | None = None,
    min: float | None = None,
    max: float | None = None,
    group: str | None = None,
    each: tuple | None = None,
):
    """A RunConfig field; `group` is its section in `train --help` (data, model, augmentation, training, execution)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "group": group, "each": each}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_cache_dir() -> str:
    return os.environ.get("TRANSFERLAB_CACHE", str(Path.home() / ".cache" / "transferlab"))


@dataclass
class RunConfig:
    # data
    data: str = _opt(
        "cifar10",
        "'cifar10' (torchvision's CIFAR-10) or the path of an ImageFolder tree <root>/<class>/<image>",
        group="data",
    )
    labels: str | None = _opt(
        None,
        "a CSV or TSV file (header row) of image paths and labels, instead of --data (leave --data unset); "
        "paths relative to the file's folder",
        group="data",
    )
    labels_path_column: str = _opt("path", "--labels: the column holding each image's path", group="data")
    labels_label_column: str = _opt(
        "label", "--labels: the column holding each image's label (its class name)", group="data"
    )
    labels_split_column: str | None = _opt(
        "split",
        "--labels: the column giving each row's part (train, val or test), used instead of carving a split when the "
        "file has it; 'none' to ignore it",
        group="data",
    )
    data_dir: str | None = _opt(
        None,
        "where CIFAR-10 is downloaded, or where a local cifar-10-batches-py folder lies (env TRANSFERLAB_DATA_DIR)",
        group="data",
    )
    download: bool = _opt(True, "download CIFAR-10 when it is not in --data-dir", group="data")
    cache_dir: str | None = _opt(
        None,
        "cache of decoded images and frozen features (env TRANSFERLAB_CACHE, default ~/.cache/transferlab)",
        group="execution",
    )
    skip_bad_images: bool = _opt(
        False, "skip unreadable images with a counted warning instead of stopping", group="data"
    )
    limit: int | None = _opt(None, "use a stratified subset of N images (quick tries)", min=10, group="data")
    test_fraction: float = _opt(
        0.1, "fraction of all images held out as the test split", min=0.0, max=0.9, group="data"
    )
    val_fraction: float = _opt(0.1, "fraction of all images used for validation", min=0.01, max=0.9, group="data")
    official_test: bool = _opt(
        False, "use the source's official test split (CIFAR-10 only) instead of carving one", group="data"
    )
    split_seed: int = _opt(
        0,
        "seed of the test and validation splits (kept apart from --seed so seeds share one split)",
        min=0,
        max=2**32 - 2,  # scikit-learn's seeds end at 2**32 - 1, and validation uses split_seed + 1
        group="data",
    )
    folds: int = _opt(
        0,
        "cross-validation: cut the images left after the test split into this many stratified folds (shuffled with "
        "--split-seed), fold --fold being the validation split, instead of --val-fraction (0 = off; the test split "
        "is the same either way)",
        min=0,
        group="data",
    )
    fold: int = _opt(0, "with --folds: which fold (0 .. folds - 1) is the validation split", min=0, group="data")
    # model
    arch: str = _opt(
        "squeezenet1_1", "backbone: a torchvision name or timm/<name> (see `transferlab models`)", group="model"
    )
    weights: str = _opt(
        "imagenet",
        "'imagenet' (torchvision's published weights; timm's from the local Hugging Face cache), a local state-dict "
        "or .safetensors path, or 'none' (env TRANSFERLAB_WEIGHTS)",
        group="model",
    )
    head: str = _opt(
        "paper",
        "classifier head: 'paper' (dropout, 1x1 conv, ReLU, average pool, as in the study), "
        "'linear' (average pool, dropout, linear) or 'mlp' (1x1 conv, BatchNorm, ReLU, average pool, dropout, linear); "
        "ResNet and timm models have only their own linear classifier ('paper' means it)",
        choices=("paper", "linear", "mlp"),
        group="model",
    )
    dropout: float | None = _opt(
        None,
        "dropout before the head's classifier layer; default: the backbone's (0.5, the study's, for torchvision "
        "heads; timm's default, 0, for timm models, passed to timm as drop_rate)",
        min=0.0,
        max=0.99,
        group="model",
    )
    strategy: str = _opt(
        "frozen",
        "which layers train: frozen (head only), partial (last --unfreeze groups + head), full",
        choices=("frozen", "partial", "full"),
        group="model",
    )
    unfreeze: int = _opt(
        2,
        "number of last backbone groups (Fire modules for SqueezeNet) that train under 'partial'",
        min=1,
        group="model",
    )
    # input
    resolution: int | None = _opt(
        None,
        "side in pixels the images are resized to before the backbone; default: the backbone's (32 for torchvision "
        "backbones, which reproduces the study; the pretrained input size for timm models)",
        min=8,
        max=1024,
        group="model",
    )
    crop_fraction: float | None = _opt(
        None,
        "central fraction of each stored square kept before resizing (timm's crop_pct: 0.875 at 224 px reads the "
        "centre 224 of 256); default: the backbone's (1 for torchvision backbones, timm's pretrained crop_pct)",
        min=0.1,
        max=1.0,
        group="model",
    )
    interpolation: str | None = _opt(
        None,
        "how the square is resized to --resolution; default: the backbone's (bilinear for torchvision backbones, "
        "timm's pretrained interpolation)",
        choices=("bilinear", "bicubic"),
        group="model",
    )
    storage_size: int | None = _opt(
        None,
        "largest side images are stored at after decoding (never enlarged); default: --resolution / --crop-fraction "
        "(a study: the largest of its trials on the same data)",
        min=8,
        max=4096,
        group="data",
    )
    resize_policy: str = _opt(
        "crop",
        "how a file becomes a square: crop (shorter side, centre square), squash (whole image, aspect lost), "
        "pad (whole image, letterboxed in black); the same in training, evaluate and predict",
        choices=("crop", "squash", "pad"),
        group="data",
    )
    normalize: str = _opt(
        "imagenet",
        "input normalisation: the backbone's ImageNet mean/std, or the training split's own statistics",
        choices=("imagenet", "dataset"),
        group="model",
    )
    crop_padding: int = _opt(
        0, "random-crop augmentation: pad by this many pixels and crop back (0 = off)", min=0, group="augmentation"
    )
    feature_shift: int = _opt(
        0,
        "shift the frozen groups' output by up to N cells at random in training (zero-padded): "
        "a random crop that keeps the feature cache valid (0 = off)",
        min=0,
        group="augmentation",
    )
    flip: bool = _opt(False, "random horizontal-flip augmentation", group="augmentation")
    tta_flip: bool = _opt(
        False, "evaluate on the mean of the image and its mirror (test-time augmentation)", group="augmentation"
    )
    # optimisation
    loss: str = _opt(
        "ce",
        "ce (cross-entropy) or mse (mean squared error of softmax vs one-hot, the study's)",
        choices=("ce", "mse"),
        group="training",
    )
    label_smoothing: float = _opt(0.0, "label smoothing for the ce loss", min=0.0, max=0.5, group="training")
    class_weights: str = _opt(
        "none",
        "imbalanced classes: 'balanced' weights each class's training loss by n / (classes x its training count) "
        "(sklearn's formula); validation and test loss stay unweighted so they compare across options",
        choices=("none", "balanced"),
        group="training",
    )
    sampler: str = _opt(
        "shuffle",
        "training order: 'shuffle' (each image once per epoch) or 'balanced' (as many draws, with replacement, "
        "each class equally likely)",
        choices=("shuffle", "balanced"),
        group="training",
    )
    optimizer: str = _opt("adamw", "optimiser", choices=("sgd", "adam", "adamw"), group="training")
    lr: float = _opt(1e-3, "peak learning rate", min=0.0, group="training")
    momentum: float = _opt(0.9, "SGD momentum (Nesterov)", min=0.0, max=0.999, group="training")
    weight_decay: float = _opt(0.01, "weight decay (decoupled for adamw)", min=0.0, group="training")
    schedule: str = _opt(
        "constant",
        "learning-rate schedule; constant and step do not depend on --epochs, "
        "so runs that differ only in epochs share one computation",
        choices=("constant", "step", "cosine", "onecycle"),
        group="training",
    )
    warmup_epochs: float = _opt(0.0, "linear warm-up from 0 over this many epochs", min=0.0, group="training")
    step_every: int = _opt(
        30, "'step' schedule: multiply the learning rate by 0.1 every N epochs", min=1, group="training"
    )
    gradual_unfreeze: int = _opt(
        0,
        "fastai-style gradual unfreezing: train the head alone, "
        "then unfreeze one more of the strategy's groups (backwards) every N epochs (0 = off)",
        min=0,
        group="training",
    )
    lr_group_decay: float = _opt(
        1.0,
        "discriminative learning rates: each backbone group gets this factor times the lr "
        "of the group after it (1 = off)",
        min=0.0,
        max=1.0,
        group="training",
    )
    epochs: int = _opt(10, "training epochs", min=1, group="training")
    batch_size: int = _opt(250, "batch size", min=1, group="training")
    # execution
    device: str = _opt(
        "auto", "auto (CUDA when available), cpu or cuda", choices=("auto", "cpu", "cuda"), group="execution"
    )
    seed: int = _opt(
        0, "seed of initialisation, shuffling, augmentation and dropout", min=0, max=2**32 - 1, group="execution"
    )
    cache_features: str = _opt(
        "auto",
        "cache the frozen prefix's activations: auto (when no random augmentation precedes it), off",
        choices=("auto", "off"),
        group="execution",
    )
    compile: bool = _opt(False, "torch.compile the trainable part", group="execution")
    amp: str = _opt("auto", "bf16 autocast: auto (on CUDA), on, off", choices=("auto", "on", "off"), group="execution")
    record_epochs: list = _opt(
        [], "also record metrics and the best checkpoint at these epochs (shared epoch prefixes)", group="execution"
    )
    metric: str = _opt(
        "val_accuracy",
        "what picks the best epoch and its checkpoint (a study sets it from its own `metric`); only val_loss is "
        "lower-is-better",
        choices=METRICS,
        group="training",
    )
    progress: bool = _opt(True, "show a progress bar", group="execution")
    log: list = _opt(
        [],
        "also record the run's config, per-epoch metrics and files with mlflow and/or tensorboard "
        "(comma-separated; MLFLOW_TRACKING_URI or <out>/mlflow.db; <out>/tensorboard)",
        each=TRACKERS,
        group="execution",
    )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, values: dict[str, Any], *, base: RunConfig | None = None, where: str = "") -> RunConfig:
        """Build a config from plain values (TOML, CLI, grid point), validating every key."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        current = dataclasses.asdict(base) if base is not None else {}
        for raw_key, value in values.items():
            key = raw_key.replace("-", "_")
            if key not in known:
                raise ConfigError(f"{where}unknown key {raw_key!r}{_suggest(key, known)}")
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
        if self.feature_shift and self.strategy == "full":
            raise ConfigError(
                f"{where}feature_shift = {self.feature_shift}: strategy 'full' freezes nothing whose output could be "
                "shifted (use crop_padding)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def training_dict(self) -> dict[str, Any]:
        """The settings that decide a run's numbers, with the backbone's defaults filled in: all but where caches
        live, whether a bar is drawn and where the run is also logged. Every other field counts, new ones included:
        an option added later re-identifies earlier runs, which are then trained again rather than reused under
        settings they never had."""
        values = {k: v for k, v in self.resolved().to_dict().items() if k not in ("progress", "cache_dir", "log")}
        return {k: _absolute_path(k, v) for k, v in values.items()}

    @property
    def source(self) -> str:
        """The data source as the user named it: the labels file, 'cifar10' or the image folder."""
        return self.labels if self.labels is not None else self.data

    def resolved(self) -> RunConfig:
        """This config with the backbone's defaults in the fields left unset (None): resolution, crop_fraction,
        interpolation, dropout (see `models.backbone_defaults`). What a run trains with and is identified by."""
        from .models import backbone_defaults

        unset = {k: v for k, v in backbone_defaults(self.arch).items() if getattr(self, k) is None}
        return dataclasses.replace(self, **unset) if unset else self

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir or default_cache_dir()).expanduser()

    @property
    def epochs_independent_schedule(self) -> bool:
        return self.schedule in ("constant", "step")


PATH_FIELDS = {"data": ("cifar10",), "labels": (), "data_dir": (), "weights": ("imagenet", "none")}


def _absolute_path(key: str, value):
    """A path option as one spelling (absolute, symlinks kept): ./data/../data and $PWD/data are one run's data."""
    if key not in PATH_FIELDS or not isinstance(value, str) or value in PATH_FIELDS[key]:
        return value
    return os.path.abspath(os.path.expanduser(value))


def _suggest(key: str, known) -> str:
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


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' -> (key, value); the value is read as TOML when it parses, else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a table")
    tree[parts[-1]] = value


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: {error}") from None


# ---------------------------------------------------------------------------- studies
STUDY_KEYS = {
    "name": "study name (default: the spec file's stem)",
    "metric": "selection metric: val_accuracy (default), val_loss, val_balanced_accuracy or val_macro_f1",
    "storage": "Optuna storage URL (default: SQLite file in the study directory); keep passwords out of it",
    "storage_password_env": "name of an environment variable holding the storage's password (never saved or shown)",
    "run": "table of RunConfig keys shared by every trial",
    "grid": "table of axes: RunConfig key -> list of values; every combination is one trial",
    "variants": "named bundles of RunConfig keys; the grid axis `variant` picks one (ablations: one change at a time)",
    "repeat": "seeds per grid point: K runs every grid point with seeds seed, seed + 1, ... (1 = once, the default)",
    "folds": "cross-validation: K stratified folds, every grid point run once per fold (0 = off, the default)",
    "search": "an Optuna search per grid point: sampler, n_trials and/or timeout, pruner, and [search.space]",
}

# Grid axes whose values are replicates of one configuration rather than configurations of their own: a study
# selects by the mean over them, and the report pairs configurations on them.
REPLICATE_AXES = ("seed", "fold")


def replicate_axes(grid) -> list[str]:
    """The axes of a grid (its keys, in order) that are replicates: `seed` and `fold` (from `repeat`, `folds` or
    given as grid axes)."""
    return [axis for axis in grid if axis in REPLICATE_AXES]


def configuration_of(point: dict[str, Any], replicates) -> dict[str, Any]:
    """A grid point's configuration: the point without its replicate axes."""
    return {k: v for k, v in point.items() if k not in replicates}


def _setter_of(tree: dict, key: str) -> tuple[str, str] | None:
    """Which part of a spec tree sets run option `key` above [run] ([grid], a variant, [search.space]), and the --set
    that changes it there; None when only [run] does."""
    key = key.replace("-", "_")

    def keys(table) -> set[str]:
        return {k.replace("-", "_") for k in table} if isinstance(table, dict) else set()

    if key in keys(tree.get("grid")):
        return f"the [grid] axis {key}", f"--set grid.{key}=[...]"
    for name, bundle in (tree.get("variants") or {}).items() if isinstance(tree.get("variants"), dict) else ():
        if key in keys(bundle):
            return f"[variants.{name}]", f"--set variants.{name}.{key}=..."
    search = tree.get("search")
    if isinstance(search, dict) and key in keys(search.get("space")):
        return "[search.space]", f"--set search.space.{key}=..."
    return None


def _refuse_shadowed(tree: dict, where: str) -> None:
    """A run option given in two places of which one silently wins is refused in one line: [run] beside a [grid]
    axis (the axis sets it for every trial) and a variant beside a [grid] axis (the axis wins). [run] beside a
    variant is the ablation pattern (the variant changes one thing) and stays allowed."""
    grid = {k.replace("-", "_"): k for k in tree.get("grid", {}) if k != "variant"}
    for key in tree.get("run", {}):
        if key.replace("-", "_") in grid:
            raise ConfigError(
                f"{where}[run] {key} and the [grid] axis {grid[key.replace('-', '_')]}: the axis sets it for every "
                "trial, so [run]'s value would be ignored; give it in one of the two"
            )
    for name, bundle in tree.get("variants", {}).items():
        for key in bundle if isinstance(bundle, dict) else ():
            if key.replace("-", "_") in grid:
                raise ConfigError(
                    f"{where}[variants.{name}] {key} and the [grid] axis {grid[key.replace('-', '_')]}: the axis "
                    "wins, so the variant's value would be ignored; give it in one of the two"
                )


def _whole(tree: dict, key: str, default: int, where: str) -> int:
    value = tree.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}{key} = {value!r}: expected a whole number")
    return value


# lr = "find" in a study spec ([run], a [grid] lr value or a variant): the learning-rate range test (lr_find.py)
# chooses the rate of each configuration before it trains; RunConfig.lr itself is always a number
LR_FIND = "find"


def _without_find(values: dict[str, Any], where: str) -> tuple[dict[str, Any], bool]:
    """A spec table's run keys without lr = "find", and whether it was there; any other lr that is no number is
    refused in one line."""
    lr = values.get("lr")
    if lr == LR_FIND:
        return {k: v for k, v in values.items() if k != "lr"}, True
    if isinstance(lr, str):
        try:
            float(lr)
        except ValueError:
            raise ConfigError(f'{where}lr = {lr!r}: expected a number or "{LR_FIND}" (the lr range test)') from None
    return values, False


SAMPLERS = ("tpe", "random", "grid", "qmc")
PRUNERS = ("median", "hyperband", "none")
SEARCH_KEYS = {
    "sampler": "tpe (default), random, grid or qmc: Optuna's samplers",
    "seed": "the sampler's seed (default 0): a search run again proposes the same trials",
    "n_trials": "finished trials (complete or pruned) each search runs to",
    "timeout": "seconds of trial time each search may spend (summed over its trials, across runs)",
    "pruner": "median (default), hyperband or none: stops a trial whose per-epoch metric falls behind",
    "startup_trials": "trials that complete before the pruner may stop one (default 5)",
    "warmup_epochs": "epochs every trial trains before the pruner may stop it (default 1)",
    "space": "table: run option -> {low, high, log, step} (a range) or a list of values",
}
RANGE_KEYS = ("low", "high", "log", "step")
# RunConfig fields a search may not vary: they cannot change a trial's numbers, or (metric) are set once per study
NOT_SEARCHED = ("progress", "cache_dir", "log", "record_epochs")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SearchRange:
    """A numeric range of one run option: integers when the option is an int, else floats."""

    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False

    def values(self) -> list | None:
        """Every value of the range, when it has a step (integers: step 1); None for a continuous range."""
        if not self.integer and self.step is None:
            return None
        step = self.step or 1
        n = round((self.high - self.low) / step)
        if self.integer:
            return [int(self.low + i * step) for i in range(n + 1)]
        return [round(self.low + i * step, 12) for i in range(n + 1)]  # 0.1 + 2 * 0.1 is 0.30000000000000004


@dataclass
class SearchSpec:
    """The [search] table: how each search samples, stops trials early and ends."""

    space: dict[str, SearchRange | list]
    sampler: str = "tpe"
    seed: int = 0
    n_trials: int | None = None
    timeout: float | None = None
    pruner: str = "median"
    startup_trials: int = 5
    warmup_epochs: int = 1

    def grid_values(self) -> dict[str, list] | None:
        """The sampler 'grid''s combinations: every key's values (None when a range has no step)."""
        values = {k: v if isinstance(v, list) else v.values() for k, v in self.space.items()}
        return None if any(v is None for v in values.values()) else values

    def target(self) -> int | None:
        """The finished trials a search runs to: n_trials, and at most every combination under the grid sampler."""
        if self.sampler != "grid":
            return self.n_trials
        size = math.prod(len(v) for v in self.grid_values().values())
        return size if self.n_trials is None else min(self.n_trials, size)

    def candidates(self, key: str) -> list:
        """The values of `key` to check a setting that depends on it at (both bounds, or every listed value)."""
        dimension = self.space[key]
        return dimension if isinstance(dimension, list) else [dimension.low, dimension.high]

    @classmethod
    def from_dict(cls, tree: Any, check, *, grid: dict, variants: dict, where: str) -> SearchSpec:
        """`check(values, where)` validates run values at every grid point (raising ConfigError)."""
        at = f"{where}[search] "
        if not isinstance(tree, dict):
            raise ConfigError(f"{where}search = {tree!r}: expected a table ([search])")
        for key in tree:
            if key not in SEARCH_KEYS:
                raise ConfigError(f"{at}unknown key {key!r}{_suggest(key, SEARCH_KEYS)}")
        values = {k: v for k, v in tree.items() if k != "space"}
        for key, choices in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
            if key in values and values[key] not in choices:
                raise ConfigError(
                    f"{at}{key} = {values[key]!r}: expected one of {', '.join(choices)}"
                    f"{_suggest(str(values[key]), choices)}"
                )
        for key, low in (("seed", 0), ("n_trials", 1), ("startup_trials", 0), ("warmup_epochs", 0)):
            value = values.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ConfigError(f"{at}{key} = {value!r}: expected a whole number >= {low}")
        if values.get("seed", 0) > 2**32 - 1:
            raise ConfigError(f"{at}seed = {values['seed']!r}: must be <= {2**32 - 1}")
        timeout = values.get("timeout")
        if timeout is not None and not (_is_number(timeout) and math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"{at}timeout = {timeout!r}: expected seconds > 0")
        if values.get("n_trials") is None and timeout is None:
            raise ConfigError(f"{at}needs n_trials, timeout or both: when does each search end?")
        space = tree.get("space")
        if not isinstance(space, dict) or not space:
            raise ConfigError(f"{at}has no [search.space]: name the run options to search over")
        parsed: dict[str, SearchRange | list] = {}
        for raw_key, dimension in space.items():
            key = raw_key.replace("-", "_")
            parsed[key] = _dimension(key, raw_key, dimension, check, grid, variants, parsed, f"{where}[search.space] ")
        spec = cls(parsed, **values)
        if spec.sampler == "grid" and spec.grid_values() is None:
            key = next(k for k, v in parsed.items() if not isinstance(v, list) and v.values() is None)
            raise ConfigError(f"{at}sampler = 'grid' needs countable values: give {key} a step or a list of values")
        return spec


def _dimension(key, raw_key, dimension, check, grid, variants, parsed, at) -> SearchRange | list:
    """One [search.space] entry, validated: a RunConfig field, searched nowhere else, every value valid."""
    known = {f.name: f for f in dataclasses.fields(RunConfig)}
    if key not in known:
        raise ConfigError(f"{at}unknown key {raw_key!r}{_suggest(key, known)}")
    if key in parsed:
        raise ConfigError(f"{at}{raw_key}: the option {key!r} is given twice")
    if key == "metric":
        raise ConfigError(f"{at}metric picks the study's best trial: it is set once at the top level, not searched")
    if key in NOT_SEARCHED:
        raise ConfigError(f"{at}{raw_key}: {key} cannot change a trial's result; search over training options")
    if key in grid:
        raise ConfigError(f"{at}{raw_key}: {key} is also a [grid] axis; give it in one of the two")
    setting = next((name for name, bundle in variants.items() if key in bundle), None)
    if setting is not None:  # the sampled value would silently replace the variant's
        raise ConfigError(f"{at}{raw_key}: {key} is also set by [variants.{setting}]; give it in one of the two")
    if isinstance(dimension, list):
        if not dimension:
            raise ConfigError(f"{at}{raw_key}: empty list")
        seen = []
        for value in dimension:
            if value is not None and not isinstance(value, (bool, int, float, str)):
                raise ConfigError(f"{at}{raw_key}: value {value!r} is not a plain value (number, string, boolean)")
            resolved = check({key: value}, at)
            if resolved in seen:
                raise ConfigError(f"{at}{raw_key}: value {value!r} is given twice")
            seen.append(resolved)
        return list(dimension)
    if not isinstance(dimension, dict):
        raise ConfigError(f"{at}{raw_key} = {dimension!r}: expected a range {{low, high}} or a list of values")
    for name in dimension:
        if name not in RANGE_KEYS:
            raise ConfigError(f"{at}{raw_key}: unknown key {name!r} in its range{_suggest(name, RANGE_KEYS)}")
    hint = typing.get_type_hints(RunConfig)[key]
    kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if kind not in (int, float):
        raise ConfigError(f"{at}{raw_key}: a range needs a numeric option ({key} is not); give a list of values")
    integer = kind is int
    if "low" not in dimension or "high" not in dimension:
        raise ConfigError(f"{at}{raw_key}: a range needs both low and high")
    low, high, log, step = (dimension.get(k) for k in RANGE_KEYS)
    for name, value in (("low", low), ("high", high), ("step", step)):
        if value is None:
            continue
        if not _is_number(value) or not math.isfinite(value) or (integer and not isinstance(value, int)):
            expected = "a whole number" if integer else "a number"
            raise ConfigError(f"{at}{raw_key}: {name} = {value!r}: expected {expected} ({key} is {kind.__name__})")
    if not isinstance(log if log is not None else False, bool):
        raise ConfigError(f"{at}{raw_key}: log = {log!r}: expected true or false")
    if low >= high:
        raise ConfigError(f"{at}{raw_key}: low = {low!r} must be below high = {high!r}")
    if log and low <= 0:
        raise ConfigError(f"{at}{raw_key}: log = true needs low > 0 (low = {low!r})")
    if step is not None:
        if step <= 0:
            raise ConfigError(f"{at}{raw_key}: step = {step!r}: must be > 0")
        if log and not (integer and step == 1):
            raise ConfigError(f"{at}{raw_key}: a log range takes no step (Optuna samples it continuously)")
        count = (high - low) / step
        if abs(count - round(count)) > 1e-9:
            raise ConfigError(f"{at}{raw_key}: high - low = {high - low!r} is not a multiple of step = {step!r}")
    for bound in (low, high):  # every value between lies within the option's range too
        check({key: bound}, at)
    return SearchRange(float(low) if not integer else low, float(high) if not integer else high, bool(log),
                       step if step is None or integer else float(step), integer)  # fmt: skip


@dataclass
class StudySpec:
    name: str
    base: RunConfig
    grid: dict[str, list]
    metric: str = "val_accuracy"
    storage: str | None = None
    storage_password_env: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    repeat: int = 1
    folds: int = 0
    # lr = "find": the rate found for each such grid point (its JSON text), filled by the study before it plans
    found_lr: dict[str, float] = field(default_factory=dict)
    search: SearchSpec | None = None  # the [search] table: an Optuna search per grid point instead of one trial

    @classmethod
    def from_dict(cls, tree: dict[str, Any], *, name: str = "study", where: str = "") -> StudySpec:
        for key in tree:
            if key not in STUDY_KEYS:
                raise ConfigError(f"{where}unknown key {key!r}{_suggest(key, STUDY_KEYS)}")
        for key in ("run", "grid", "variants"):
            if not isinstance(tree.get(key, {}), dict):
                raise ConfigError(f"{where}{key} = {tree[key]!r}: expected a table ([{key}])")
        name = tree.get("name", name)
        if not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
            raise ConfigError(f"{where}name = {name!r}: expected a study name (not empty, no '/')")
        tables = [tree.get("run", {}), tree.get("grid", {}), *tree.get("variants", {}).values()]
        if any(isinstance(t, dict) and "metric" in t for t in tables):
            raise ConfigError(
                f"{where}metric picks the study's best trial and each trial's best epoch alike: "
                'set it once at the top level (metric = "val_loss")'
            )
        repeat, folds = _whole(tree, "repeat", 1, where), _whole(tree, "folds", 0, where)
        if repeat < 1:
            raise ConfigError(f"{where}repeat = {repeat}: expected 1 or more runs per grid point (1 = once)")
        if folds == 1 or folds < 0:
            raise ConfigError(f"{where}folds = {folds}: cross-validation needs 2 or more folds (0 turns it off)")
        if "repeat" in tree and "seed" in tree.get("grid", {}):
            raise ConfigError(f"{where}repeat = {repeat} and a [grid] seed axis: give the seeds one way, not both")
        if folds and any(isinstance(t, dict) and ("folds" in t or "fold" in t) for t in tables):
            raise ConfigError(
                f"{where}folds = {folds} makes the fold axis itself: leave folds and fold out of [run], [grid] and "
                "[variants]"
            )
        if repeat > 1 and any(isinstance(v, dict) and "seed" in v for v in tree.get("variants", {}).values()):
            raise ConfigError(f"{where}repeat = {repeat} sets each trial's seed: leave seed out of [variants]")
        run = _without_find(tree.get("run", {}), f"{where}[run] ")[0]
        base = RunConfig.from_dict({**run, **({"folds": folds} if folds else {})}, where=f"{where}[run] ")
        variants = tree.get("variants", {})
        for vname, values in variants.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{where}[variants] {vname}: expected a table of run keys")
            inside = f"{where}[variants.{vname}] "
            RunConfig.from_dict(_without_find(values, inside)[0], base=base, where=inside)
        grid = tree.get("grid", {})
        if variants and "variant" not in grid:
            raise ConfigError(f"{where}[variants] given but [grid] has no 'variant' axis")
        checked: dict[str, list] = {}
        for axis, values in grid.items():
            values = values if isinstance(values, list) else [values]
            if not values:
                raise ConfigError(f"{where}[grid] {axis}: empty list")
            key = axis.replace("-", "_")
            if key in checked:
                raise ConfigError(f"{where}[grid] {axis}: the axis {key!r} is given twice")
            resolved = []  # each value as the trial will see it: 0.1 and "0.1" are one point
            for value in values:  # validates axis name and each value
                if axis == "variant":
                    if value not in variants:
                        raise ConfigError(
                            f"{where}[grid] variant {value!r} is not defined under [variants]"
                            f"{_suggest(str(value), variants)}"
                        )
                    resolved.append(value)
                    continue
                if key == "lr" and _without_find({"lr": value}, f"{where}[grid] ")[1]:  # lr = "find"
                    resolved.append(value)
                    continue
                config = RunConfig.from_dict({axis: value}, base=base, where=f"{where}[grid] ")
                resolved.append(getattr(config, key))
            for i, value in enumerate(resolved):  # a repeated point would never be complete (1 and 1.0 are equal)
                if value in resolved[:i]:
                    raise ConfigError(f"{where}[grid] {axis}: value {values[i]!r} is given twice")
            checked[key] = values
        _refuse_shadowed(tree, where)  # after each axis and value was checked on its own
        if repeat > 1:  # the replicate axes go last: the points of one configuration are neighbours
            seeds = [base.seed + i for i in range(repeat)]
            RunConfig.from_dict({"seed": seeds[-1]}, base=base, where=f"{where}repeat = {repeat} from [run] ")
            checked["seed"] = seeds
        if folds:
            checked["fold"] = list(range(folds))
        metric = tree.get("metric", "val_accuracy")
        if metric not in METRICS:
            raise ConfigError(f"{where}metric = {metric!r}: expected one of {', '.join(METRICS)}")
        if not isinstance(tree.get("storage", ""), str) or tree.get("storage") == "":
            raise ConfigError(f"{where}storage = {tree['storage']!r}: expected a storage URL")
        password_env = tree.get("storage_password_env")
        if password_env is not None and (not isinstance(password_env, str) or not password_env):
            raise ConfigError(f"{where}storage_password_env = {password_env!r}: expected an environment variable name")
        spec = cls(
            name=name,
            base=base,
            grid=checked,
            metric=metric,
            storage=tree.get("storage"),
            storage_password_env=password_env,
            source=tree,
            variants=variants,
            repeat=repeat,
            folds=folds,
        )
        if "search" in tree:
            if repeat > 1 or folds or "seed" in checked:
                raise ConfigError(
                    f"{where}[search] with repeated seeds or folds: a search trial is one training, and its sampler "
                    "would read each replicate as a trial of its own; search first, then repeat the chosen settings"
                )
            spec.search = SearchSpec.from_dict(tree["search"], spec.checked_value, grid=checked, variants=variants,
                                               where=where)  # fmt: skip
            if "lr" in spec.search.space and any(spec.finds_lr(p) for p in spec.points()):
                raise ConfigError(f'{where}[search.space] lr and lr = "{LR_FIND}": give the learning rate one way')
        return spec

    def checked_value(self, values: dict[str, Any], where: str) -> Any:
        """One run option's value (`values`: {key: value}) validated at every grid point; as the trials see it."""
        (key,) = values
        for point in self.points():
            point = dict(point)
            bundle = self.variants.get(point.pop("variant", None), {})
            run = _without_find({**bundle, **point}, where)[0]  # lr = "find": the rate is chosen later
            config = RunConfig.from_dict({**run, **values}, base=self.base, where=where)
        return getattr(config, key.replace("-", "_"))

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> StudySpec:
        tree = load_toml(path)
        for text in overrides:
            key, value = parse_override(text)
            if "." not in key:  # a bare run key is the common case: --set data=...
                key = key if key in STUDY_KEYS else f"run.{key}"
            if key.startswith("run."):
                option = key.removeprefix("run.")
                setter = _setter_of(tree, option)
                if setter is not None:
                    where_set, fix = setter
                    raise ConfigError(
                        f"--set {text}: {option} is set by {where_set} in {path}, which wins over [run]: the override "
                        f"would be ignored; change it there ({fix})"
                    )
            set_dotted(tree, key, value)
        return cls.from_dict(tree, name=Path(path).stem, where=f"{path}: ")

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the grid axes, in a stable order."""
        import itertools

        axes = list(self.grid)
        return [dict(zip(axes, combo)) for combo in itertools.product(*(self.grid[a] for a in axes))]

    @property
    def replicates(self) -> list[str]:
        """The grid's replicate axes (seed, fold): a configuration is a grid point without them."""
        return replicate_axes(self.grid)

    def finds_lr(self, point: dict[str, Any]) -> bool:
        """Is this grid point's lr "find"? Its own lr axis, else its variant's lr, else [run]'s decides."""
        point = dict(point)
        variant = self.variants.get(point.pop("variant", None), {})
        for values in ({k.replace("-", "_"): v for k, v in point.items()}, variant, self.source.get("run", {})):
            if "lr" in values:
                return values["lr"] == LR_FIND
        return False

    @staticmethod
    def point_id(point: dict[str, Any]) -> str:
        """A grid point as text, the key of `found_lr`: values as strings, as the grid compares them (epochs 2 and
        "2" are one point)."""
        return json.dumps({k: str(v) for k, v in point.items()}, sort_keys=True)

    def config_for(self, point: dict[str, Any], *, lr_unused: bool = False) -> RunConfig:
        """The grid point's run config: [run], then its variant, then its other axes. Where its lr is "find", the
        rate found for it (`found_lr`); asked before that rate is found, it is an error, unless `lr_unused`: the
        caller reads nothing lr decides (the range test itself, the data settings), and lr is left a placeholder."""
        finds, found = self.finds_lr(point), self.found_lr.get(self.point_id(point))
        values = dict(point)
        variant = self.variants.get(values.pop("variant", None), {})
        values = {**variant, **values, "metric": self.metric}
        if finds:
            values.pop("lr", None)
            if found is not None:
                values["lr"] = found
            elif not lr_unused:
                raise ConfigError(f'lr = "{LR_FIND}" at {point}: the range test has not chosen its rate yet')
        return RunConfig.from_dict(values, base=self.base).resolved()
