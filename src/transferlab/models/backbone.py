"""A backbone: its layer groups as data, its preprocessing, and how to build, cut and load it.

A backbone's layer groups are an ordered table `group name -> module paths` (or bare parameter paths), in forward
order, ending with the group `head`. Freezing strategies, discriminative learning rates and the frozen-prefix cache
all read the same table (models/freezing.py), and `split` cuts a model between two groups into a prefix and a suffix
whose composition is the forward pass. What differs between sources (torchvision, timm) is behaviour: each is a
subclass (models/torchvision.py, models/timm.py); nothing outside them asks which source a backbone is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    name: str
    groups: tuple[tuple[str, tuple[str, ...]], ...]  # forward order; the last group is "head"
    tunable: tuple[str, ...] = field(default=())  # groups that `partial` counts back from (Fire modules, ResNet stages)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    heads: tuple[str, ...] = ("paper", "linear", "mlp")  # --head values it builds; the config default 'paper' means
    # the backbone's own classifier where it has no paper head (ResNet, timm)
    head_keys: tuple[str, ...] = ()  # state-dict prefixes pretrained weights skip; default: the head group's paths
    resolution: int | None = None  # the input side its pretrained weights were trained at (timm's input_size)
    fixed_resolution: bool = False  # takes only `resolution` (ViT's patch grid and position embedding)
    preprocessing: tuple[tuple[str, object], ...] = ()  # further pretrained_cfg entries, recorded (crop_pct, ...)

    source = "?"  # "torchvision" or "timm": shown by `transferlab models`, never dispatched on

    @property
    def group_names(self) -> list[str]:
        return [name for name, _ in self.groups]

    # -------------------------------------------------------------- what each source implements
    def build(self, dropout: float) -> nn.Module:
        """The architecture with random weights and its own classifier (dropout: what a source fixes at build)."""
        raise NotImplementedError

    def make_head(self, model: nn.Module, num_classes: int, kind: str, dropout: float) -> None:
        """Replace the classifier by a re-initialised head of `kind` for `num_classes`, in place."""
        raise NotImplementedError

    def split(self, model: nn.Module, cut: int) -> tuple[nn.Module, nn.Module]:
        """(prefix, suffix) sharing the model's modules, with suffix(prefix(x)) == model(x); the prefix runs the
        groups [0, cut)."""
        raise NotImplementedError

    def defaults(self) -> dict:
        """What a run uses where it leaves resolution, crop_fraction, interpolation or dropout unset."""
        raise NotImplementedError

    def pretrained_state(self) -> tuple[dict, str]:
        """(ImageNet state dict, where it came from), or a one-line WeightsError saying how to give one."""
        raise NotImplementedError

    def pretrained_identity(self) -> str:
        """What the ImageNet weights are, for cache keys and trial identities (no download, no file read)."""
        raise NotImplementedError

    def pretrained_on_disk(self) -> str:
        """Where the ImageNet weights already lie on this machine ('' when they do not)."""
        raise NotImplementedError

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.build(0.0).parameters())


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
