"""The backbones by name: torchvision's registered ones and `timm/<name>` for any of timm's, and what a run's config
takes from its backbone (its defaults, the resolutions it accepts).

timm's `resolve_data_config(model=...)` in spirit: the config never imports models; `resolve(config)` fills in
what the config leaves unset from the backbone's pretrained configuration.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import re

import torch

from ..errors import ConfigError, WeightsError
from .backbone import Backbone
from .timm_backbone import CURATED, PREFIX, timm_backbone
from .torchvision import BACKBONES

REGISTRY: dict[str, Backbone] = {b.name: b for b in BACKBONES}


def get_backbone(name: str) -> Backbone:
    if name.startswith(PREFIX):
        return timm_backbone(name)
    if name not in REGISTRY:
        raise WeightsError(
            f"unknown architecture {name!r}{_did_you_mean(name)}: choose one of {', '.join(sorted(REGISTRY))} "
            "or timm/<name>"
        )
    return REGISTRY[name]


def _did_you_mean(name: str) -> str:
    """The registered name `name` is a spelling of (resnet-18, ResNet18, squeezenet_1_1), or the closest one."""
    plain = {re.sub(r"[^a-z0-9]", "", known): known for known in REGISTRY}
    close = plain.get(re.sub(r"[^a-z0-9]", "", name.lower())) or next(
        iter(difflib.get_close_matches(name.lower(), list(REGISTRY), n=1, cutoff=0.6)), None
    )
    return f" (did you mean {close!r}?)" if close else ""


def backbone_defaults(arch: str) -> dict:
    """What a run uses where it leaves resolution, crop_fraction, interpolation or dropout unset."""
    return get_backbone(arch).defaults()


def resolve(config):
    """The config with its backbone's defaults in the fields it leaves unset (None): resolution, crop_fraction,
    interpolation, dropout. What a run trains with and is identified by."""
    unset = {k: v for k, v in backbone_defaults(config.arch).items() if getattr(config, k) is None}
    return dataclasses.replace(config, **unset) if unset else config


@functools.lru_cache(maxsize=None)
def min_resolution(name: str, start: int = 8, stop: int = 1024) -> int:
    """The smallest input side the backbone's body turns into a feature map (its pooling needs some pixels left);
    found once per process by a forward pass of a randomly initialised body at growing sides (milliseconds)."""
    backbone = get_backbone(name)
    if backbone.fixed_resolution:
        return backbone.resolution
    model = backbone.build(0.0).eval()
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


def list_backbones(pattern: str | None, limit: int) -> tuple[list[Backbone], int, str]:
    """(backbones, how many more timm models match, a note): torchvision's registry, then a curated set of timm models
    (or, with a PATTERN, timm's models matching it, at most `limit`, each described once with random weights)."""

    if pattern and not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    names = [n for n in sorted(REGISTRY) if not pattern or fnmatch.fnmatch(n, pattern)]
    note = ""
    try:
        import timm  # timm takes seconds to import: loaded only when its models are listed
    except ImportError:
        found, note = [], "(timm is not installed: only torchvision's backbones)"
    else:
        found = timm.list_models(pattern.removeprefix(PREFIX)) if pattern else list(CURATED)
    shown = [f"{PREFIX}{n}" for n in found[:limit]]
    return [get_backbone(name) for name in names + shown], len(found) - len(shown), note
