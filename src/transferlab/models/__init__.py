"""Models: backbones (torchvision, timm) with their layer groups as data, pretrained weights, freezing."""

from ..errors import WeightsError
from .backbone import Backbone, check_head
from .freezing import (
    active_groups,
    apply_freezing,
    as_sequential,
    frozen_prefix_length,
    group_modules,
    group_parameters,
    parameter_groups,
    set_train_mode,
    trainable_groups,
)
from .registry import REGISTRY, backbone_defaults, check_resolution, get_backbone, min_resolution, resolve
from .weights import build_model, load_backbone_weights, resolve_weights, weights_identity

__all__ = [
    "REGISTRY", "Backbone", "WeightsError", "active_groups", "apply_freezing", "as_sequential", "backbone_defaults",
    "build_model", "check_head", "check_resolution", "frozen_prefix_length", "get_backbone", "group_modules",
    "group_parameters", "load_backbone_weights", "min_resolution", "parameter_groups", "resolve", "resolve_weights",
    "set_train_mode", "trainable_groups", "weights_identity",
]  # fmt: skip
