"""Layer groups in use: a model's modules and parameters per group, freezing strategies (which groups train), where
the frozen prefix ends, discriminative learning rates and gradual unfreezing.

frozen   only the re-initialised head trains
partial  the last `unfreeze` tunable groups (Fire modules for SqueezeNet, ResNet stages, timm blocks) and the head train
full     everything trains
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..errors import ConfigError

if TYPE_CHECKING:
    from .backbone import Backbone


def trainable_groups(backbone: Backbone, strategy: str, unfreeze: int = 2) -> list[str]:
    names = backbone.group_names
    if strategy == "frozen":
        return ["head"]
    if strategy == "full":
        return list(names)
    if strategy == "partial":
        if unfreeze > len(backbone.tunable):
            raise ConfigError(
                f"unfreeze = {unfreeze}: {backbone.name} has only {len(backbone.tunable)} groups to unfreeze "
                f"({', '.join(backbone.tunable)}); use strategy = full to train everything"
            )
        first = names.index(backbone.tunable[-unfreeze])
        return names[first:]
    raise ConfigError(f"unknown strategy {strategy!r}: frozen, partial or full")


def frozen_prefix_length(backbone: Backbone, trainable: list[str]) -> int:
    """Number of leading groups that are all frozen (their output can be cached)."""
    names = backbone.group_names
    return min(names.index(n) for n in trainable)


def apply_freezing(model: nn.Module, backbone: Backbone, trainable: list[str]) -> None:
    """requires_grad follows the strategy; frozen groups also stay in eval mode (BatchNorm statistics)."""
    for name, params in group_parameters(model, backbone):
        for param in params:
            param.requires_grad_(name in trainable)


def set_train_mode(model: nn.Module, backbone: Backbone, trainable: list[str]) -> None:
    """model.train() for trainable groups only: frozen BatchNorm keeps its ImageNet statistics."""
    model.eval()
    for name, modules in group_modules(model, backbone):
        if name in trainable:
            for module in modules:
                module.train()


def parameter_groups(model: nn.Module, backbone: Backbone, trainable: list[str], lr: float, decay: float) -> list[dict]:
    """One optimiser group per trainable layer group; with decay < 1 earlier groups learn more slowly.

    The head gets `lr`, the group before it `lr * decay`, the one before that `lr * decay**2`, ...
    """
    groups = []
    ordered = [(n, ps) for n, ps in group_parameters(model, backbone) if n in trainable]
    for depth, (name, group) in enumerate(reversed(ordered)):
        params = [p for p in group if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr * decay**depth, "name": name})
    return groups


def active_groups(trainable: list[str], epoch: int, every: int) -> list[str]:
    """Gradual unfreezing: the groups that train in `epoch` (1-based) when one more unfreezes every `every` epochs.

    The head trains from the start; the strategy's deeper groups join one at a time, last group first.
    """
    if every <= 0:
        return trainable
    count = min(len(trainable), 1 + (epoch - 1) // every)
    return trainable[len(trainable) - count :]


# ------------------------------------------------------------------------------ a model's groups
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
