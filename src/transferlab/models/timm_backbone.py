"""timm's model zoo as a backbone source: `--arch timm/<name>`.

A timm model becomes a `Backbone` with the same interface as the torchvision ones:

- layer groups from timm's own block grouping (`model.group_matcher(coarse=False)`, the table its layer-wise lr
  decay uses): each parameter gets a group id; a group is the largest modules whose parameters all share its id
  (plus bare parameters such as ViT's `cls_token`). The first group is named `stem`, the last (timm's classifier,
  with whatever timm groups with it, e.g. a final norm or conv_head) `head`, the others by their module path.
- a cut `split(model, k) -> (prefix, suffix)`: the model's `forward_features` as an ordered list of steps (known
  families: ResNet, EfficientNet, MobileNetV3, ConvNeXt, RegNet, VisionTransformer; nn.Sequential containers and
  stages are opened up to their blocks), the prefix runs the steps of groups [0, k), the suffix the rest and
  `forward_head`. Any other timm family still splits at 0 (train everything) and before the head
  (`forward_features` | `forward_head`, so `frozen` and its feature cache work); other cuts are a one-line error.
- preprocessing (mean, std, input size) from the model's `pretrained_cfg`; the head is timm's classifier, reset
  for K classes (`num_classes=K`).
"""

from __future__ import annotations

import difflib
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, WeightsError
from .backbone import Backbone
from .files import file_state_dict

PREFIX = "timm/"

# forward_features of the families whose forward is known, as the model's attributes in order
FEATURE_STEPS = {
    "ResNet": ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"),
    "EfficientNet": ("conv_stem", "bn1", "blocks", "conv_head", "bn2"),
    "MobileNetV3": ("conv_stem", "bn1", "blocks"),
    "ConvNeXt": ("stem", "stages", "norm_pre"),
    "RegNet": ("stem", "s1", "s2", "s3", "s4", "final_conv"),
    "VisionTransformer": ("<vit-stem>", "blocks", "norm"),
}
# modules whose forward runs their children in registration order (when not gradient checkpointing)
SEQUENTIAL_CONTAINERS = ("Sequential", "ConvNeXtStage", "RegStage")

# `transferlab models` lists these timm models without a pattern: the tested families, a few sizes each
CURATED = (
    "resnet18",
    "resnet50",
    "efficientnet_b0",
    "efficientnet_b2",
    "mobilenetv3_small_100",
    "mobilenetv3_large_100",
    "convnext_atto",
    "convnext_tiny",
    "regnetx_002",
    "regnety_016",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
)


class UnknownModel(ConfigError):
    """A timm/<name> that timm does not have."""


def timm_name(arch: str) -> str:
    return arch[len(PREFIX) :]


def check_name(name: str) -> None:
    try:
        import timm  # timm takes seconds to import: loaded only for a timm backbone
    except ImportError:
        raise ConfigError(f"timm/{name}: the timm package is not installed (pip install 'timm>=1.0.3,<1.1')") from None

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1, cutoff=0.6)
        hint = f" (did you mean 'timm/{close[0]}'?)" if close else ""
        raise UnknownModel(f"unknown timm model {name!r}{hint}: see `transferlab models PATTERN`")


def create(name: str, num_classes: int = 1000, drop_rate: float = 0.0) -> nn.Module:
    import timm  # as above

    if not drop_rate:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
    except TypeError:  # the family's constructor has no head dropout
        raise ConfigError(
            f"dropout = {drop_rate}: timm/{name} takes no head dropout (drop_rate); pass --dropout 0"
        ) from None


def _param_groups(model: nn.Module) -> dict[str, int]:
    """parameter name -> group index (0-based, forward order), by timm's fine group matcher."""
    from timm.models._manipulate import group_with_matcher  # as above

    grouped = group_with_matcher(
        model.named_parameters(), model.group_matcher(coarse=False), return_values=False, reverse=False
    )
    return {p: i for i, (_, names) in enumerate(sorted(grouped.items())) for p in names}


def _cover(model: nn.Module, owner: dict[str, int]) -> list[list[str]]:
    """For each group: the largest module paths whose parameters all belong to it, then bare parameters."""
    count = max(owner.values()) + 1
    groups: list[list[str]] = [[] for _ in range(count)]
    covered: set[str] = set()

    def visit(path: str, module: nn.Module) -> None:
        names = [f"{path}.{n}" if path else n for n, _ in module.named_parameters()]
        ids = {owner[n] for n in names}
        if path and len(ids) == 1:
            groups[ids.pop()].append(path)
            covered.update(names)
            return
        for child_name, child in module.named_children():
            visit(f"{path}.{child_name}" if path else child_name, child)
        for n, _ in module.named_parameters(recurse=False):
            full = f"{path}.{n}" if path else n
            groups[owner[full]].append(full)
            covered.add(full)

    visit("", model)
    return groups


def _group_name(paths: list[str], index: int, last: int) -> str:
    if index == 0:
        return "stem"
    if index == last:
        return "head"
    parts = [p.split(".") for p in paths]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) > 1:
            break
        common.append(pieces[0])
    return ".".join(common) if common else "+".join(paths)


@functools.lru_cache(maxsize=None)
def describe(name: str) -> dict:
    """Groups, tunable groups, preprocessing and pretrained tag of one timm model (one random-weight build)."""
    check_name(name)
    try:
        with torch.device("meta"):  # structure only: no memory, no random initialisation (milliseconds)
            model = create(name)
    except (NotImplementedError, RuntimeError):  # timm before 1.0.30: some families' initialisation reads values
        with torch.random.fork_rng(devices=[]):  # a real build, which leaves the caller's random numbers alone
            model = create(name)
    owner = _param_groups(model)
    covers = _cover(model, owner)
    last = len(covers) - 1
    names = []
    for i, paths in enumerate(covers):
        n = _group_name(paths, i, last)
        names.append(n if n not in names else f"{n}#{i}")
    cfg = model.pretrained_cfg
    classifier = cfg.get("classifier") or "head"
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return {
        "groups": tuple((n, tuple(p)) for n, p in zip(names, covers)),
        "tunable": tuple(names[1:-1]),
        "mean": tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        "input_size": tuple(cfg.get("input_size", (3, 224, 224))),
        "crop_pct": cfg.get("crop_pct"),
        "interpolation": cfg.get("interpolation"),
        "tag": cfg.get("tag") or "",
        "hf_hub_id": cfg.get("hf_hub_id") or "",
        "classifier": classifier,
        "fixed_size": hasattr(model, "patch_embed") and not getattr(model.patch_embed, "dynamic_img_size", False),
        "parameters": sum(p.numel() for p in model.parameters()),
        "family": type(model).__name__,
    }


# ------------------------------------------------------------------------------ the cut
class _VitStem(nn.Module):
    """patch_embed, position embedding (with cls token), patch drop, norm_pre: ViT's forward_features before blocks."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        return v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))


class _Head(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(x)


class _Features(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _steps(model: nn.Module, groups: tuple) -> list[tuple[nn.Module, int]] | None:
    """forward_features as (module, group index) in order, opened up until each step lies in one group; None when
    the family is unknown or its steps do not follow the group order."""
    family = type(model).__name__
    if family not in FEATURE_STEPS:
        return None
    owner: dict[int, int] = {}  # id(parameter) -> group
    for index, (_, paths) in enumerate(groups):
        for path in paths:
            try:
                params = list(model.get_submodule(path).parameters())
            except AttributeError:
                params = [model.get_parameter(path)]
            owner.update({id(p): index for p in params})
    steps: list[tuple[nn.Module, int]] = []

    def add(module: nn.Module) -> bool:
        ids = {owner[id(p)] for p in module.parameters()}
        if len(ids) > 1:
            if type(module).__name__ not in SEQUENTIAL_CONTAINERS:
                return False
            return all(add(child) for child in module.children())
        steps.append((module, ids.pop() if ids else (steps[-1][1] if steps else 0)))
        return True

    for attr in FEATURE_STEPS[family]:
        module = _VitStem(model) if attr == "<vit-stem>" else getattr(model, attr)
        if attr == "<vit-stem>":
            stem_ids = {owner[id(p)] for n, p in model.named_parameters() if not n.startswith(("blocks.", "norm."))}
            stem_ids -= {len(groups) - 1}
            if len(stem_ids) > 1:
                return None
            steps.append((module, stem_ids.pop() if stem_ids else 0))
        elif not add(module):
            return None
    order = [g for _, g in steps]
    return steps if order == sorted(order) else None


class _Suffix(nn.Module):
    def __init__(self, body: nn.Sequential, model: nn.Module):
        super().__init__()
        self.body = body
        self.head = _Head(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def split(model: nn.Module, groups: tuple, name: str, cut: int) -> tuple[nn.Module, nn.Module]:
    """(prefix, suffix) with suffix(prefix(x)) == model(x): the prefix runs groups [0, cut)."""
    last = len(groups) - 1
    if cut <= 0:
        return nn.Sequential(), model
    steps = _steps(model, groups)
    if steps is None:
        if cut == last:
            return _Features(model), _Head(model)
        raise ConfigError(
            f"timm/{name} ({type(model).__name__}) can be cut only before its head: use strategy = frozen or full"
        )
    prefix = [m for m, g in steps if g < cut]
    suffix = [m for m, g in steps if g >= cut]
    return nn.Sequential(*prefix), _Suffix(nn.Sequential(*suffix), model)


# ------------------------------------------------------------------------------ weights
def hf_cached_file(name: str) -> str | None:
    """The pretrained weights file in the local Hugging Face cache, or None (never touches the network)."""
    info = describe(name)
    if not info["hf_hub_id"]:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache  # loaded with timm, only for a timm backbone
    except ImportError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(info["hf_hub_id"], filename)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


# ------------------------------------------------------------------------------ the backbone
@dataclass(frozen=True)
class TimmBackbone(Backbone):
    timm_name: str = ""  # the model's name in timm

    source = "timm"

    def build(self, dropout: float = 0.0) -> nn.Module:
        # timm fixes a model's head dropout at construction (drop_rate), where each family's forward_head reads it
        return create(self.timm_name, drop_rate=dropout)

    def make_head(self, model: nn.Module, num_classes: int, kind: str, dropout: float) -> None:
        model.reset_classifier(num_classes)  # timm's own classifier (and pooling), re-initialised

    def split(self, model: nn.Module, cut: int) -> tuple[nn.Module, nn.Module]:
        return split(model, self.groups, self.timm_name, cut)

    def defaults(self) -> dict:
        """timm's pretrained config: its input size, crop_pct and interpolation, and timm's head dropout (0)."""
        cfg = dict(self.preprocessing)
        interpolation = cfg.get("interpolation")
        return {
            "resolution": self.resolution,
            "crop_fraction": float(cfg.get("crop_pct") or 1.0),
            "interpolation": interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
            "dropout": 0.0,
        }

    def pretrained_state(self) -> tuple[dict, str]:
        """timm's pretrained weights from the local Hugging Face cache only: offline, nothing is downloaded."""
        info = describe(self.timm_name)
        found = hf_cached_file(self.timm_name)
        if found is None:
            raise WeightsError(
                f"ImageNet weights for {self.name} ({info['hf_hub_id'] or 'no hub id'}) are not in the local Hugging "
                "Face cache and are not downloaded here",
                "pass {path} to a local state dict or .safetensors file, or {none}",
            )
        return file_state_dict(Path(found)), f"timm {self.timm_name}.{info['tag']} ({found})"

    def pretrained_identity(self) -> str:
        return f"timm:{self.timm_name}.{describe(self.timm_name)['tag']}"

    def pretrained_on_disk(self) -> str:
        return hf_cached_file(self.timm_name) or ""

    def parameter_count(self) -> int:
        return describe(self.timm_name)["parameters"]


@functools.lru_cache(maxsize=None)
def timm_backbone(arch: str) -> TimmBackbone:
    """The backbone `timm/<name>` (one structural build of the model, cached)."""
    name = timm_name(arch)
    info = describe(name)
    return TimmBackbone(
        name=arch,
        groups=info["groups"],
        tunable=info["tunable"],
        mean=info["mean"],
        std=info["std"],
        heads=("linear",),
        head_keys=info["classifier"],
        resolution=info["input_size"][-1],
        fixed_resolution=info["fixed_size"],
        preprocessing=(("crop_pct", info["crop_pct"]), ("interpolation", info["interpolation"])),
        timm_name=name,
    )
