"""Pretrained weights: where they come from, what they are (their identity), and loading them into a body.

`--weights` is 'imagenet' (the backbone's own published weights: models/torchvision.py, models/timm_backbone.py),
a local state-dict or .safetensors file, or 'none' (random initialisation); TRANSFERLAB_WEIGHTS stands in for
'imagenet' on offline machines. The head is never loaded: it is always re-initialised for the run's classes.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from torch import nn

from ..errors import WeightsError
from .backbone import Backbone, check_head
from .files import file_state_dict
from .registry import get_backbone


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
        return get_backbone(arch).pretrained_identity()
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
    if weights == "imagenet":
        state, source = backbone.pretrained_state()
    else:
        state, source = file_state_dict(Path(weights).expanduser()), str(weights)
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
    dropout = backbone.defaults()["dropout"] if dropout is None else dropout
    head = check_head(backbone, head)
    model = backbone.build(dropout)
    source = load_backbone_weights(model, backbone, weights)
    backbone.make_head(model, num_classes, head, dropout)
    return model, source
