"""Backbone registry: how to build each architecture, load its weights, and name its layer groups.

A backbone's layer groups are data: an ordered table `group name -> module paths`, in forward
order, ending with the group `head`. Running the modules of all groups one after another is the
model's forward pass; freezing strategies, discriminative learning rates and the frozen-prefix
cache all read the same table (see `freezing.py`).
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
    """Weights are missing or do not fit the architecture (message is one line)."""


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

    @property
    def group_names(self) -> list[str]:
        return [name for name, _ in self.groups]


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


def get_backbone(name: str) -> Backbone:
    if name not in REGISTRY:
        raise WeightsError(f"unknown architecture {name!r}: choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


@functools.lru_cache(maxsize=None)
def min_resolution(name: str, start: int = 8, stop: int = 1024) -> int:
    """The smallest input side the backbone's body turns into a feature map (its pooling needs some pixels left);
    found once per process by a forward pass of a randomly initialised body at growing sides (milliseconds)."""
    model = get_backbone(name).build().eval()
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
            f"({type(error).__name__}): "
            f"pass --weights PATH to a local state dict (or set TRANSFERLAB_WEIGHTS), or --weights none"
        ) from None


def _file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist: pass --weights imagenet|none|PATH")
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
        return f"torchvision:{get_backbone(arch).torchvision_weights}"
    path = Path(weights).expanduser()
    if path.is_dir():
        raise WeightsError(f"weights file {path} is a directory, not a file")
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist: pass --weights imagenet|none|PATH")
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
    if weights == "imagenet":
        state, source = _torchvision_state_dict(backbone), f"torchvision {backbone.torchvision_weights}"
    else:
        state, source = _file_state_dict(Path(weights).expanduser()), str(weights)
    head_prefixes = dict(backbone.groups)["head"]
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
    arch: str, num_classes: int, *, weights: str = "none", head: str = "paper", dropout: float = 0.5
) -> tuple[nn.Module, str]:
    """torchvision architecture + pretrained body + a re-initialised head for `num_classes`."""
    backbone = get_backbone(arch)
    model = backbone.build()
    source = load_backbone_weights(model, backbone, weights)
    backbone.make_head(model, num_classes, head, dropout)
    return model, source


def group_modules(model: nn.Module, backbone: Backbone) -> list[tuple[str, list[nn.Module]]]:
    return [(name, [model.get_submodule(path) for path in paths]) for name, paths in backbone.groups]


def as_sequential(model: nn.Module, backbone: Backbone, start: int = 0, stop: int | None = None) -> nn.Sequential:
    """Groups [start, stop) as one nn.Sequential sharing the model's modules (and parameters)."""
    modules = [m for _, ms in group_modules(model, backbone)[start:stop] for m in ms]
    return nn.Sequential(*modules)
