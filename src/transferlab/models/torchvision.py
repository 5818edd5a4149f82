"""torchvision's backbones: SqueezeNet 1.0 / 1.1 and ResNet-18 / 50, their layer groups and heads.

Running a torchvision backbone's groups' modules in order is its forward pass, so a cut is two nn.Sequentials.
Fire modules keep the paper's numbering (fire2..fire9); a max-pool joins the group before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError
from .backbone import Backbone
from .freezing import as_sequential

PRETRAINED_RESOLUTION = 224  # the side torchvision's ImageNet weights were trained and evaluated at (crop_size)


@dataclass(frozen=True)
class TorchvisionBackbone(Backbone):
    constructor: Callable[[], nn.Module] | None = None  # torchvision's builder, no weights
    weights_enum: str = ""  # the weights enum member, e.g. "SqueezeNet1_1_Weights.IMAGENET1K_V1"
    head_maker: Callable[[nn.Module, int, str, float], None] | None = None

    source = "torchvision"

    def build(self, dropout: float = 0.0) -> nn.Module:
        return self.constructor()  # the head, with its dropout, is made by make_head

    def make_head(self, model: nn.Module, num_classes: int, kind: str, dropout: float) -> None:
        self.head_maker(model, num_classes, kind, dropout)

    def split(self, model: nn.Module, cut: int) -> tuple[nn.Module, nn.Module]:
        return as_sequential(model, self, 0, cut), as_sequential(model, self, cut)

    def defaults(self) -> dict:
        """For photos: the pretrained input side (224 px), the image's whole centre square, bilinear, the paper head's
        dropout 0.5. The bundled CIFAR-10 studies set their 32 px explicitly."""
        return {"resolution": self.resolution, "crop_fraction": 1.0, "interpolation": "bilinear", "dropout": 0.5}

    def _weights(self):
        import torchvision  # loaded when a model is built: the registry stays light

        enum_name, member = self.weights_enum.split(".")
        return getattr(torchvision.models, enum_name)[member]

    def pretrained_state(self) -> tuple[dict, str]:
        weights = self._weights()
        hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        try:
            return weights.get_state_dict(progress=False, check_hash=True), f"torchvision {self.weights_enum}"
        except Exception as error:  # noqa: BLE001 - offline, proxy, corrupt download: one piece of advice
            raise WeightsError(
                f"ImageNet weights for {self.name} are not in {hub} and could not be downloaded "
                f"({type(error).__name__})",
                "pass {path} to a local state dict (or set TRANSFERLAB_WEIGHTS), or {none}",
            ) from None

    def pretrained_identity(self) -> str:
        return f"torchvision:{self.weights_enum}"

    def pretrained_on_disk(self) -> str:
        hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(self._weights().url).name
        return str(hub) if hub.is_file() else ""


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


def _squeezenet(version: str, layout: list[tuple[str, list[int]]]) -> TorchvisionBackbone:
    from torchvision import models as tvm  # loaded when a model is built

    groups = tuple((name, tuple(f"features.{i}" for i in idx)) for name, idx in layout) + (("head", ("classifier",)),)
    return TorchvisionBackbone(
        name=f"squeezenet{version}",
        constructor=getattr(tvm, f"squeezenet{version}"),
        weights_enum=f"SqueezeNet{version}_Weights.IMAGENET1K_V1",
        resolution=PRETRAINED_RESOLUTION,
        groups=groups,
        head_maker=_squeezenet_head,
        tunable=tuple(name for name, _ in layout if name.startswith("fire")),
    )


def _resnet(depth: int) -> TorchvisionBackbone:
    from torchvision import models as tvm  # loaded when a model is built

    return TorchvisionBackbone(
        name=f"resnet{depth}",
        constructor=getattr(tvm, f"resnet{depth}"),
        weights_enum=f"ResNet{depth}_Weights.IMAGENET1K_V1",
        resolution=PRETRAINED_RESOLUTION,
        groups=(
            ("stem", ("conv1", "bn1", "relu", "maxpool")),
            ("layer1", ("layer1",)),
            ("layer2", ("layer2",)),
            ("layer3", ("layer3",)),
            ("layer4", ("layer4",)),
            ("head", ("avgpool", "fc")),
        ),
        head_maker=_resnet_head,
        heads=("linear",),
        tunable=("layer1", "layer2", "layer3", "layer4"),
    )


# the registry's torchvision entries (models/registry.py)
BACKBONES = (
    _squeezenet("1_0", [("stem", [0, 1, 2]), ("fire2", [3]), ("fire3", [4]), ("fire4", [5, 6]), ("fire5", [7]),
                        ("fire6", [8]), ("fire7", [9]), ("fire8", [10, 11]), ("fire9", [12])]),
    _squeezenet("1_1", [("stem", [0, 1, 2]), ("fire2", [3]), ("fire3", [4, 5]), ("fire4", [6]), ("fire5", [7, 8]),
                        ("fire6", [9]), ("fire7", [10]), ("fire8", [11]), ("fire9", [12])]),
    _resnet(18),
    _resnet(50),
)  # fmt: skip
