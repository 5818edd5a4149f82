"""Error analysis of a checkpoint on labelled images, for the study report and `transferlab analyze`: the most
confident mistakes as small PNG thumbnails, Grad-CAM maps of a few of them, and the split's calibration.

`analyze_split` is the one place both compute it. The selection stores it in the study's storage, so the report
needs neither the model nor the data again; it stays small (at most GALLERY thumbnails of at most THUMBNAIL px, and
GRADCAM greyscale maps of the same size).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..data.decode import png_base64
from ..engine.preprocess import Preprocess
from ..errors import one_line
from ..models.backbone import Backbone
from ..models.registry import get_backbone
from ..scoring.calibration import TEMPERATURE_RANGE, view_probabilities
from .evaluate import EvaluationImages, evaluate_logits
from .predict import LoadedModel

GALLERY = 16  # misclassified images kept, most confident first
GRADCAM = 4  # of which this many get a Grad-CAM map
THUMBNAIL = 48  # largest side of a stored thumbnail, px


def _is_vit(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("patch_embed", "blocks", "num_prefix_tokens"))


def gradcam_layer(model: nn.Module, backbone: Backbone) -> tuple[str, nn.Module]:
    """The layer Grad-CAM weights: the last Conv2d of the backbone's last group before the head, by the registry's
    layer groups (squeezenet: fire9's expand3x3; resnet: layer4's last block's last conv; timm CNNs: their last
    block's or conv_head); a ViT: its last block's first norm, whose patch tokens `token_grid` lays back on the patch
    grid. ValueError when there is none (error_analysis then skips Grad-CAM and says why)."""
    if _is_vit(model):
        last = len(model.blocks) - 1
        return f"blocks.{last}.norm1", model.blocks[last].norm1
    _, paths = backbone.groups[-2]
    for path in reversed(paths):
        if path.rpartition(".")[2] in model.get_submodule(path.rpartition(".")[0])._parameters:
            continue  # a bare parameter
        convs = [(n, m) for n, m in model.get_submodule(path).named_modules() if isinstance(m, nn.Conv2d)]
        if convs:
            name, module = convs[-1]
            return f"{path}.{name}" if name else path, module
    raise ValueError(f"{backbone.name}: group {backbone.groups[-2][0]} holds no Conv2d for Grad-CAM")


def token_grid(model: nn.Module):
    """For a ViT: (N, tokens, C) -> (N, C, h, w), the patch tokens (class and register tokens dropped) on the patch
    grid, so that Grad-CAM can pool their gradients per channel as it does a conv's; None for a CNN."""
    if not _is_vit(model):
        return None

    def to_map(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, model.num_prefix_tokens :]
        h, w = model.patch_embed.grid_size
        if h * w != patches.shape[1]:  # a dynamic-size ViT at another resolution: a square grid
            h = w = math.isqrt(patches.shape[1])
        return patches.reshape(patches.shape[0], h, w, patches.shape[-1]).permute(0, 3, 1, 2)

    return to_map


def grad_cam(
    model: nn.Module, backbone: Backbone, preprocess: Preprocess, images: np.ndarray, targets: list[int]
) -> tuple[np.ndarray, str, list[int]]:
    """Grad-CAM (pytorch_grad_cam) of uint8 (N, H, W, 3) images for the given classes -> ((N, H, W) float32 maps in
    [0, 1], the target layer's name, its feature map's [h, w]). Runs on a float32 copy of the model in eval mode,
    on the model's device, CPU included."""
    from pytorch_grad_cam import GradCAM  # optional extra: only Grad-CAM needs it
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # as above

    if len(images) == 0:
        return np.zeros((0, *images.shape[1:3]), np.float32), gradcam_layer(model, backbone)[0], []
    model = copy.deepcopy(model).float().eval()
    for module in model.modules():
        if getattr(module, "inplace", False):  # the hooked conv output must not be overwritten by an in-place ReLU
            module.inplace = False
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    name, layer = gradcam_layer(model, backbone)
    to_map = token_grid(model)
    shape: list[int] = []

    def record(_module, _inputs, out):
        shape[:] = list((to_map(out) if to_map else out).shape[-2:])

    hook = layer.register_forward_hook(record)
    device = next(model.parameters()).device
    x = preprocess(torch.as_tensor(np.ascontiguousarray(images)).to(device))
    with GradCAM(model=model, target_layers=[layer], reshape_transform=to_map) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    hook.remove()
    maps = torch.as_tensor(maps)[:, None]
    maps = F.interpolate(maps, size=images.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    return maps.clamp(0, 1).numpy(), name, shape


def thumbnail(image: np.ndarray, side: int = THUMBNAIL) -> np.ndarray:
    """An image no larger than `side` px on its longer side (never enlarged)."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def error_analysis(
    model: nn.Module,
    backbone: Backbone,
    preprocess: Preprocess,
    images: np.ndarray,
    labels: torch.Tensor,
    probs: torch.Tensor,
    calibrated: torch.Tensor,
    *,
    gallery: int = GALLERY,
    gradcam: int = GRADCAM,
) -> dict:
    """The misclassified images, most confident first (ties: earlier first): their position among `images`, true and
    predicted class, confidence before and after calibration and a thumbnail; Grad-CAM maps of the predicted class
    on the first `gradcam` of them."""
    confidence, predicted = probs.max(1)
    wrong = (predicted != labels).nonzero().flatten()
    chosen = wrong[torch.argsort(-confidence[wrong], stable=True)][:gallery].tolist()
    mistakes = [
        {
            "index": i,
            "true": int(labels[i]),
            "predicted": int(predicted[i]),
            "confidence": confidence[i].item(),
            "confidence_calibrated": calibrated[i, predicted[i]].item(),
            "thumbnail": png_base64(thumbnail(images[i])),
        }
        for i in chosen
    ]
    cam_rows = chosen[:gradcam]
    try:
        gradcam_layer(model, backbone)
    except ValueError as error:  # no convolutional feature map to weight: Grad-CAM is skipped with the reason
        maps, layer, shape = [], f"none ({error})", []
    else:
        try:
            maps, layer, shape = grad_cam(model, backbone, preprocess, images[cam_rows], predicted[cam_rows].tolist())
        except ImportError as error:  # grad-cam missing or broken: skipped, the reason said, the rest stands
            maps, layer, shape = [], f"none (pytorch_grad_cam cannot be imported: {one_line(error)})", []
    for mistake, cam in zip(mistakes, maps):
        mistake["gradcam"] = png_base64(thumbnail(np.round(cam * 255).astype(np.uint8)))
    return {
        "n_mistakes": len(wrong),
        "n": len(labels),
        "mistakes": mistakes,
        "gradcam_layer": layer,
        "gradcam_map_size": shape,
    }


def analyze_split(loaded: LoadedModel, images: np.ndarray, labels, logits: torch.Tensor) -> dict:
    """A checkpoint's figures on one split, as the study's selection records them and `analyze` shows them:
    {"scores": evaluate_logits, "calibration": before and after temperature scaling with the reliability bins,
    "errors": error_analysis}, of uint8 (N, H, W, 3) images, their labels (the checkpoint's class indices) and their
    (V, N, K) logits (loaded.view_logits)."""
    labels = torch.as_tensor(labels)
    result = evaluate_logits(loaded, logits, labels)
    calibration = {
        "temperature": result["temperature"],
        "ece": result["ece"],
        "ece_calibrated": result["ece_calibrated"],
        "nll": result["nll"],
        "nll_calibrated": result["nll_calibrated"],
        "reliability": result["reliability"],
        "reliability_calibrated": result["reliability_calibrated"],
        "temperature_range": list(TEMPERATURE_RANGE),  # the fit's bounds: a T at one says the search stopped there
        "fit": result["calibration"],  # how T was chosen on validation: fitted, or 1 and why (None: not recorded)
    }
    errors = error_analysis(
        loaded.model, get_backbone(loaded.info["arch"]), loaded.preprocess, images, labels,
        view_probabilities(logits), view_probabilities(logits, loaded.temperature),
    )  # fmt: skip
    return {"scores": result, "calibration": calibration, "errors": errors}


def analyze_images(chosen: EvaluationImages) -> dict:
    """`transferlab analyze`: analyze_split of the images evaluate would score, with what a reader must know (the
    checkpoint, the data, the split, notes), as plain values the report renders (report/analysis.py)."""
    figures = analyze_split(chosen.loaded, chosen.images, chosen.labels, chosen.loaded.view_logits(chosen.images))
    return {
        "checkpoint": str(chosen.checkpoint),
        "data": chosen.source,
        "split": chosen.split,
        "notes": chosen.notes,
        "seen_in_training": chosen.seen_in_training,
        "arch": chosen.loaded.info["arch"],
        "epoch": chosen.loaded.info["epoch"],
        **figures,
    }
