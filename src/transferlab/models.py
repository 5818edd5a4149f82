"""Backbone registry: how to build each architecture, load its weights, and name its layer groups.

A backbone's layer groups are data: an ordered table `group name -> module paths` (or bare parameter
paths), in forward order, ending with the group `head`. Freezing strategies, discriminative learning
rates and the frozen-prefix cache all read the same table (see `freezing.py`), and `Backbone.split`
cuts the model between two groups into a prefix and a suffix whose composition is the forward pass.

Two sources: torchvision (squeezenet1_0/1_1, resnet18/50, registered below; running the groups' modules
in order is their forward pass) and timm (`timm/<name>`, any model of timm's zoo, see timm_backbone.py).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import read_torch_file
from .config import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """Weights are missing or do not fit the architecture (message is one line). Its advice names the fix where the
    user is: `train`'s --weights flag, or (for_study) a study spec's weights key."""

    FIXES = {
        "train": {"path": "--weights PATH", "none": "--weights none", "any": "--weights imagenet|none|PATH"},
        "study": {
            "path": '--set weights=PATH (or weights = "PATH" in [run])',
            "none": "--set weights=none",
            "any": "--set weights=imagenet|none|PATH (or weights = ... in [run])",
        },  # fmt: skip
    }

    def __init__(self, problem: str, advice: str = "", where: str = "train"):
        self.problem, self.advice = problem, advice
        text = advice.format(**self.FIXES[where]) if advice else ""
        super().__init__(f"{problem}: {text}" if text else problem)

    def for_study(self) -> WeightsError:
        """The same error with the fix a study takes (its spec has no --weights flag)."""
        return WeightsError(self.problem, self.advice, "study")


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[[], nn.Module]  # torchvision constructor, no weights
    torchvision_weights: str  # name of the torchvision weights enum member, e.g. "SqueezeNet1_1_Weights.IMAGENET1K_V1"
    groups: tuple[tuple[str, tuple[str, ...]], ...]  # forward order; the last group is "head"
    make_head: Callable[
        [nn.Module, int, str, float], None
    ]  # (model, classes, head kind, dropout) -> replaces the head in place
    tunable: tuple[str, ...] = field(default=())  # groups that `partial` counts back from (Fire modules, ResNet stages)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    heads: tuple[str, ...] = ("paper", "linear", "mlp")  # --head values it builds; the config default 'paper' means
    # the backbone's own classifier where it has no paper head (ResNet, timm)
    source: str = "torchvision"
    timm_name: str = ""  # the timm model name (source timm)
    head_keys: tuple[str, ...] = ()  # state-dict prefixes pretrained weights skip; default: the head group's paths
    resolution: int | None = None  # the input side its pretrained weights were trained at (timm's input_size)
    fixed_resolution: bool = False  # takes only `resolution` (ViT's patch grid and position embedding)
    preprocessing: tuple[tuple[str, object], ...] = ()  # further pretrained_cfg entries, recorded (crop_pct, ...)

    @property
    def group_names(self) -> list[str]:
        return [name for name, _ in self.groups]

    def split(self, model: nn.Module, cut: int) -> tuple[nn.Module, nn.Module]:
        """(prefix, suffix) sharing the model's modules, with suffix(prefix(x)) == model(x); the prefix runs the
        groups [0, cut). torchvision: the groups' modules in order; timm: pieces of forward_features."""
        if self.source == "timm":
            from . import timm_backbone

            return timm_backbone.split(model, self.groups, self.timm_name, cut)
        return as_sequential(model, self, 0, cut), as_sequential(model, self, cut)


REGISTRY: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    REGISTRY[backbone.name] = backbone
    return backbone


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = cuda: no CUDA device is available here (use --device cpu or auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def uses_autocast(amp: str, device: torch.device) -> bool:
    """Whether a run computes under bf16 autocast: `amp = "on"`, or `"auto"` on CUDA."""
    return amp == "on" or (amp == "auto" and device.type == "cuda")


def get_backbone(name: str) -> Backbone:
    if name.startswith("timm/"):
        return _timm_backbone(name)
    if name not in REGISTRY:
        raise WeightsError(f"unknown architecture {name!r}: choose one of {', '.join(sorted(REGISTRY))} or timm/<name>")
    return REGISTRY[name]


def _timm_head(model: nn.Module, num_classes: int, kind: str, dropout: float) -> None:
    model.reset_classifier(num_classes)  # timm's own classifier (and pooling), re-initialised; dropout: see build_model


@functools.lru_cache(maxsize=None)
def _timm_backbone(arch: str) -> Backbone:
    from . import timm_backbone

    name = timm_backbone.timm_name(arch)
    info = timm_backbone.describe(name)
    return Backbone(
        name=arch,
        build=functools.partial(timm_backbone.create, name),
        torchvision_weights="",
        groups=info["groups"],
        make_head=_timm_head,
        tunable=info["tunable"],
        mean=info["mean"],
        std=info["std"],
        heads=("linear",),
        source="timm",
        timm_name=name,
        head_keys=info["classifier"],
        resolution=info["input_size"][-1],
        fixed_resolution=info["fixed_size"],
        preprocessing=(("crop_pct", info["crop_pct"]), ("interpolation", info["interpolation"])),
    )


STUDY_RESOLUTION = 32  # torchvision backbones' default input side: the study's CIFAR-10 size


def backbone_defaults(arch: str) -> dict:
    """What a run uses where it leaves resolution, crop_fraction, interpolation or dropout unset: the study's
    settings for torchvision backbones, timm's pretrained config (input size, crop_pct, interpolation) and its
    default head dropout for timm models."""
    backbone = get_backbone(arch)
    if backbone.source != "timm":
        return {"resolution": STUDY_RESOLUTION, "crop_fraction": 1.0, "interpolation": "bilinear", "dropout": 0.5}
    cfg = dict(backbone.preprocessing)
    interpolation = cfg.get("interpolation")
    return {
        "resolution": backbone.resolution,
        "crop_fraction": float(cfg.get("crop_pct") or 1.0),
        "interpolation": interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
        "dropout": 0.0,
    }


def check_head(backbone: Backbone, head: str) -> str:
    """The head kind to build: one the backbone has, or a one-line ConfigError. The config's default 'paper'
    means the backbone's own classifier where it has no paper head."""
    if head in backbone.heads:
        return head
    if head == "paper":
        return backbone.heads[0]
    raise ConfigError(
        f"head = {head!r}: {backbone.name} supports only {', '.join(map(repr, backbone.heads))} "
        f"(its own classifier); pass --head {backbone.heads[0]}"
    )


@functools.lru_cache(maxsize=None)
def min_resolution(name: str, start: int = 8, stop: int = 1024) -> int:
    """The smallest input side the backbone's body turns into a feature map (its pooling needs some pixels left);
    found once per process by a forward pass of a randomly initialised body at growing sides (milliseconds)."""
    backbone = get_backbone(name)
    if backbone.fixed_resolution:
        return backbone.resolution
    model = backbone.build().eval()
    side = start
    with torch.no_grad():
        while side < stop:
            try:
                model(torch.zeros(1, 3, side, side))
                return side
            except RuntimeError:  # "Output size is too small"
                side += 1
    return side


def check_resolution(name: str, resolution: int) -> None:
    """A resolution the backbone cannot take is a one-line ConfigError before any data is loaded."""
    backbone = get_backbone(name)
    if backbone.fixed_resolution and resolution != backbone.resolution:
        raise ConfigError(
            f"resolution = {resolution}: {name} takes only {backbone.resolution} px (fixed patch grid); "
            f"pass --resolution {backbone.resolution}"
        )
    smallest = min_resolution(name)
    if resolution < smallest:
        raise ConfigError(f"resolution = {resolution}: too small for {name}, whose layers need at least {smallest} px")


# ------------------------------------------------------------------------------ heads
def _squeezenet_head(model: nn.Module, num_classes: int, kind: str, dropout: float) -> None:
    if kind == "paper":  # the study's last four layers: dropout, 1x1 conv to K classes, ReLU, global average pool
        conv = nn.Conv2d(512, num_classes, kernel_size=1)
        nn.init.normal_(conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(conv.bias)
        model.classifier = nn.Sequential(
            nn.Dropout(dropout), conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
    elif kind == "linear":  # pool first, then a linear classifier: logits can be negative, which cross-entropy prefers
        model.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(512, num_classes)
        )
    else:  # mlp: a trainable 1x1 conv + BatchNorm before pooling, so frozen features are recombined per location
        model.classifier = nn.Sequential(
            nn.Conv2d(512, 512, kernel_size=1, bias=False),
            nn.BatchNorm2d(512),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(512, num_classes),
        )


def _resnet_head(model: nn.Module, num_classes: int, kind: str, dropout: float) -> None:
    """ResNet's own head: average pool, then its fc (dropout, linear) for K classes (--head linear)."""
    width = model.fc.in_features
    model.fc = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(width, num_classes))


def _squeezenet(version: str, layout: list[tuple[str, list[int]]]) -> Backbone:
    from torchvision import models as tvm

    groups = tuple((name, tuple(f"features.{i}" for i in idx)) for name, idx in layout) + (("head", ("classifier",)),)
    return Backbone(
        name=f"squeezenet{version}",
        build=getattr(tvm, f"squeezenet{version}"),
        torchvision_weights=f"SqueezeNet{version}_Weights.IMAGENET1K_V1",
        groups=groups,
        make_head=_squeezenet_head,
        tunable=tuple(name for name, _ in layout if name.startswith("fire")),
    )


# Fire modules keep the paper's numbering (fire2..fire9); a max-pool joins the group before it.
register(
    _squeezenet(
        "1_0",
        [
            ("stem", [0, 1, 2]),
            ("fire2", [3]),
            ("fire3", [4]),
            ("fire4", [5, 6]),
            ("fire5", [7]),
            ("fire6", [8]),
            ("fire7", [9]),
            ("fire8", [10, 11]),
            ("fire9", [12]),
        ],
    )
)
register(
    _squeezenet(
        "1_1",
        [
            ("stem", [0, 1, 2]),
            ("fire2", [3]),
            ("fire3", [4, 5]),
            ("fire4", [6]),
            ("fire5", [7, 8]),
            ("fire6", [9]),
            ("fire7", [10]),
            ("fire8", [11]),
            ("fire9", [12]),
        ],
    )
)


def _resnet(depth: int) -> Backbone:
    from torchvision import models as tvm

    return Backbone(
        name=f"resnet{depth}",
        build=getattr(tvm, f"resnet{depth}"),
        torchvision_weights=f"ResNet{depth}_Weights.IMAGENET1K_V1",
        groups=(
            ("stem", ("conv1", "bn1", "relu", "maxpool")),
            ("layer1", ("layer1",)),
            ("layer2", ("layer2",)),
            ("layer3", ("layer3",)),
            ("layer4", ("layer4",)),
            ("head", ("avgpool", "fc")),
        ),
        make_head=_resnet_head,
        heads=("linear",),
        tunable=("layer1", "layer2", "layer3", "layer4"),
    )


register(_resnet(18))
register(_resnet(50))


# ------------------------------------------------------------------------------ building
def _torchvision_state_dict(backbone: Backbone) -> dict[str, torch.Tensor]:
    import torchvision

    enum_name, member = backbone.torchvision_weights.split(".")
    weights = getattr(torchvision.models, enum_name)[member]
    hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # noqa: BLE001 - offline, proxy, corrupt download: one piece of advice
        raise WeightsError(
            f"ImageNet weights for {backbone.name} are not in {hub} and could not be downloaded "
            f"({type(error).__name__})",
            "pass {path} to a local state dict (or set TRANSFERLAB_WEIGHTS), or {none}",
        ) from None


def _timm_state_dict(backbone: Backbone) -> tuple[dict[str, torch.Tensor], str]:
    """timm's pretrained weights from the local Hugging Face cache only: offline, nothing is downloaded."""
    from . import timm_backbone

    info = timm_backbone.describe(backbone.timm_name)
    found = timm_backbone.hf_cached_file(backbone.timm_name)
    if found is None:
        raise WeightsError(
            f"ImageNet weights for {backbone.name} ({info['hf_hub_id'] or 'no hub id'}) are not in the local Hugging "
            "Face cache and are not downloaded here",
            "pass {path} to a local state dict or .safetensors file, or {none}",
        )
    return _file_state_dict(Path(found)), f"timm {backbone.timm_name}.{info['tag']} ({found})"


def pretrained_on_disk(backbone: Backbone) -> str:
    """Where the backbone's pretrained weights already lie on this machine ('' when they do not)."""
    if backbone.source == "timm":
        from .timm_backbone import hf_cached_file

        return hf_cached_file(backbone.timm_name) or ""
    import torchvision

    enum_name, member = backbone.torchvision_weights.split(".")
    url = getattr(torchvision.models, enum_name)[member].url
    hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    return str(hub) if hub.is_file() else ""


def _file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist", "pass {any}")
    if path.suffix == ".safetensors":
        from .timm_backbone import load_state_file

        return load_state_file(path, WeightsError)
    state = read_torch_file(path, "weights file", WeightsError)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a transferlab checkpoint or a similar wrapper
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} is not a state dict of tensors")
    return state


def resolve_weights(weights: str) -> str:
    """'imagenet' means TRANSFERLAB_WEIGHTS when that is set (a local stand-in for offline machines)."""
    return os.environ.get("TRANSFERLAB_WEIGHTS", weights) if weights == "imagenet" else weights


def weights_identity(arch: str, weights: str, seed: int | None = None) -> str:
    """What the starting parameters are, for cache keys and trial identities: the torchvision weights' name, or a
    file's resolved path with the sha256 of its content. Random initialisation ('none') is identified by the
    seed it was drawn with, when given."""
    weights = resolve_weights(weights)
    if weights == "none":
        return "none" if seed is None else f"none|seed={seed}"
    if weights == "imagenet":
        backbone = get_backbone(arch)
        if backbone.source == "timm":
            from .timm_backbone import describe

            return f"timm:{backbone.timm_name}.{describe(backbone.timm_name)['tag']}"
        return f"torchvision:{backbone.torchvision_weights}"
    path = Path(weights).expanduser()
    if path.is_dir():
        raise WeightsError(f"weights file {path} is a directory, not a file")
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist", "pass {any}")
    stat = path.stat()
    return f"file:{path.resolve()}|{_file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)}"


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in a process."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_backbone_weights(model: nn.Module, backbone: Backbone, weights: str) -> str:
    """Load pretrained weights into everything but the head. Returns a description for the run record."""
    weights = resolve_weights(weights)
    if weights == "none":
        return "none (random initialisation)"
    if weights == "imagenet" and backbone.source == "timm":
        state, source = _timm_state_dict(backbone)
    elif weights == "imagenet":
        state, source = _torchvision_state_dict(backbone), f"torchvision {backbone.torchvision_weights}"
    else:
        state, source = _file_state_dict(Path(weights).expanduser()), str(weights)
    head_prefixes = backbone.head_keys or dict(backbone.groups)["head"]
    own = model.state_dict()
    wanted = {k for k in own if not k.startswith(tuple(p + "." for p in head_prefixes))}
    body = {k: v for k, v in state.items() if not k.startswith(tuple(p + "." for p in head_prefixes))}
    missing = sorted(wanted - set(body))
    unexpected = sorted(set(body) - wanted)
    if missing or unexpected:
        detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise WeightsError(
            f"weights {weights} do not fit {backbone.name}: {len(missing)} missing, {len(unexpected)} unexpected keys "
            f"({detail})"
        )
    for key, value in body.items():
        if own[key].shape != value.shape:
            raise WeightsError(
                f"weights {weights} do not fit {backbone.name}: {key} has shape {tuple(value.shape)}, "
                f"expected {tuple(own[key].shape)}"
            )
    model.load_state_dict(body, strict=False)
    return source


def build_model(
    arch: str, num_classes: int, *, weights: str = "none", head: str = "paper", dropout: float | None = None
) -> tuple[nn.Module, str]:
    """torchvision or timm architecture + pretrained body + a re-initialised head for `num_classes` (dropout None:
    the backbone's default)."""
    backbone = get_backbone(arch)
    dropout = backbone_defaults(arch)["dropout"] if dropout is None else dropout
    head = check_head(backbone, head)
    # timm fixes a model's head dropout at construction (drop_rate), where each family's forward_head reads it
    model = backbone.build(drop_rate=dropout) if backbone.source == "timm" else backbone.build()
    source = load_backbone_weights(model, backbone, weights)
    backbone.make_head(model, num_classes, head, dropout)
    return model, source


def group_modules(model: nn.Module, backbone: Backbone) -> list[tuple[str, list[nn.Module]]]:
    """The modules of each group (bare parameters, such as ViT's cls_token, are left out: see group_parameters)."""
    return [
        (name, [model.get_submodule(p) for p in paths if not _is_parameter(model, p)])
        for name, paths in backbone.groups
    ]


def group_parameters(model: nn.Module, backbone: Backbone) -> list[tuple[str, list[nn.Parameter]]]:
    """The parameters of each group, its modules' and its bare ones."""
    out = []
    for name, paths in backbone.groups:
        params = []
        for path in paths:
            params += (
                [model.get_parameter(path)]
                if _is_parameter(model, path)
                else list(model.get_submodule(path).parameters())
            )
        out.append((name, params))
    return out


def _is_parameter(model: nn.Module, path: str) -> bool:
    owner, _, leaf = path.rpartition(".")
    return leaf in model.get_submodule(owner)._parameters


def as_sequential(model: nn.Module, backbone: Backbone, start: int = 0, stop: int | None = None) -> nn.Sequential:
    """Groups [start, stop) as one nn.Sequential sharing the model's modules (and parameters)."""
    modules = [m for _, ms in group_modules(model, backbone)[start:stop] for m in ms]
    return nn.Sequential(*modules)
