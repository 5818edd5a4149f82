"""timm's model zoo as a backbone source (`--arch timm/<name>`), random weights only (nothing is downloaded).

- Families: ResNet (resnet18), EfficientNet (efficientnet_b0), MobileNetV3 (mobilenetv3_small_100), ConvNeXt
  (convnext_atto), RegNet (regnetx_002), ViT (vit_tiny_patch16_224, fixed 224 px input).
- Layer groups come from timm's fine group matcher: non-empty, in forward order, `stem` first and `head` last; their
  parameters are disjoint and cover the model.
- The cut: for every k, suffix(prefix(x)) == model(x) exactly (eval mode, float32).
- The head is timm's classifier reset for K classes (2 and 1000); `--head mlp` is rejected in one line (the config's
  default 'paper' means the backbone's own classifier), and so is it for torchvision's ResNet.
- Every family trains one epoch in every regime (frozen, partial --unfreeze 2, full): frozen and partial read the
  frozen prefix's cached activations (CNNs at 32 px, ViT at 224 px on a few images); its checkpoint evaluates and
  predicts through the same registry. Cached and uncached training agree.
- BatchNorm in frozen groups stays in eval mode: its running statistics do not move (ResNet, EfficientNet).
- Preprocessing comes from timm's pretrained_cfg (ViT: mean = std = 0.5) and is recorded in the checkpoint.
- Weights: a local .safetensors file loads into the body (head excluded); a file of another model is a one-line
  error; --weights imagenet reads timm's file from the local Hugging Face cache (identity: model name + pretrained
  tag), and without it is a one-line error naming --weights PATH (nothing is downloaded).
- Export (TorchScript) of a timm checkpoint; Grad-CAM's layer is a CNN's last conv before the head, a ViT's last
  block's norm1 with its patch tokens laid on the 14 x 14 grid (a model with neither, MLP-Mixer: none).
- Gradual unfreezing walks timm's blocks.
- Bad input, one line each: an unknown timm name (with a close match), an unsupported head, --unfreeze beyond the
  blocks, a resolution a fixed-size ViT cannot take.
- `transferlab models PATTERN` lists matching timm models with source, parameters and groups.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import make_image_tree, quiet, tiny_config

from transferlab import train
from transferlab.data.sources import load_images
from transferlab.engine.checkpoint import Checkpoint
from transferlab.engine.run import prepare_run
from transferlab.errors import ConfigError, WeightsError
from transferlab.inference.evaluate import evaluate_checkpoint
from transferlab.inference.predict import load_checkpoint, predict_files
from transferlab.models.freezing import group_parameters
from transferlab.models.registry import get_backbone
from transferlab.models.weights import build_model, weights_identity

CNNS = ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto", "regnetx_002"]
FAMILIES = [*CNNS, "vit_tiny_patch16_224"]


def side(name: str) -> int:
    return 224 if name.startswith("vit") else 32


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    """2 classes x 5 images: enough for one epoch of every regime (the ViT runs at 224 px)."""
    return make_image_tree(tmp_path_factory.mktemp("timm") / "images", classes=("red", "blue"), per_class=5)


def config_for(tree, cache, name, **overrides):
    """CNNs at 32 px; the ViT at its default, timm's pretrained input size (224 px)."""
    values = dict(arch=f"timm/{name}", head="paper", flip=False, val_fraction=0.2)
    values["resolution"] = None if name.startswith("vit") else 32
    values.update(overrides)
    return tiny_config(tree, cache, **values)


@pytest.mark.parametrize("name", FAMILIES)
def test_prefix_then_suffix_is_the_forward_pass_at_every_cut(name):
    backbone = get_backbone(f"timm/{name}")
    torch.manual_seed(0)
    model, _ = build_model(backbone.name, 3, head="linear")
    model.eval()
    x = torch.randn(2, 3, side(name), side(name))
    names = backbone.group_names
    assert names[0] == "stem" and names[-1] == "head" and len(names) == len(set(names)) >= 5
    groups = group_parameters(model, backbone)
    assert all(params for _, params in groups)
    ids = [id(p) for _, params in groups for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # disjoint, and they cover the model
    with torch.no_grad():
        expected = model(x)
        for cut in range(len(names)):
            prefix, suffix = backbone.split(model, cut)
            assert torch.equal(suffix(prefix(x)), expected), cut


@pytest.mark.parametrize("name", FAMILIES)
def test_head_is_timms_classifier_for_any_number_of_classes(name):
    for classes in (2, 1000):
        model, _ = build_model(f"timm/{name}", classes, head="paper")  # the default: the backbone's own classifier
        model.eval()
        with torch.no_grad():
            assert model(torch.zeros(1, 3, side(name), side(name))).shape == (1, classes)
    with pytest.raises(ConfigError, match=r"head = 'mlp': timm/.* supports only 'linear'"):
        build_model(f"timm/{name}", 2, head="mlp")


def test_torchvision_resnet_rejects_heads_it_does_not_build():
    with pytest.raises(ConfigError, match="head = 'mlp': resnet18 supports only 'linear'"):
        build_model("resnet18", 2, head="mlp")
    model, _ = build_model("resnet18", 2, head="linear")
    assert model.fc[-1].out_features == 2


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("strategy", ["frozen", "partial", "full"])
def test_every_family_trains_in_every_regime(small_tree, tmp_path, name, strategy):
    config = config_for(small_tree, tmp_path / "cache", name, strategy=strategy, unfreeze=2)
    result = train(config, tmp_path / "run", log=quiet)
    assert result.feature_path == ("images" if strategy == "full" else "cached")
    assert len(result.history) == 1
    ckpt = Checkpoint.load(tmp_path / "run" / "best.pt")
    assert ckpt.arch == f"timm/{name}"
    expected_mean = (0.5, 0.5, 0.5) if name.startswith("vit") else (0.485, 0.456, 0.406)
    assert tuple(ckpt.mean) == pytest.approx(expected_mean)
    assert ckpt.head == "linear"
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["preprocessing"]
    assert recorded["resolution"] == side(name) and recorded["pretrained"]["resolution"] == 224
    # timm's crop fraction and interpolation are applied, not only recorded
    assert recorded["interpolation"] == recorded["pretrained"]["interpolation"] == ckpt.interpolation == "bicubic"
    assert recorded["crop_fraction"] == recorded["pretrained"]["crop_pct"] == ckpt.crop_fraction < 1
    if strategy == "partial":  # the checkpoint evaluates and predicts through the same registry
        scores = evaluate_checkpoint(tmp_path / "run" / "best.pt", load_images(config), device="cpu")
        assert 0.0 <= scores["accuracy"] <= 1.0
        image = sorted((small_tree / "red").iterdir())[0]
        rows = predict_files(tmp_path / "run" / "best.pt", [image], top=2, device="cpu")
        assert "error" not in rows[0] and len(rows[0]["top"]) == 2


@pytest.mark.parametrize("name, strategy", [("resnet18", "partial"), ("vit_tiny_patch16_224", "frozen")])
def test_cached_features_match_the_uncached_path(small_tree, tmp_path, name, strategy):
    common = dict(strategy=strategy, unfreeze=2, epochs=2)
    cached = train(config_for(small_tree, tmp_path / "cache", name, **common), tmp_path / "cached", log=quiet)
    plain = train(
        config_for(small_tree, tmp_path / "cache", name, cache_features="off", **common), tmp_path / "plain", log=quiet
    )
    assert (cached.feature_path, plain.feature_path) == ("cached", "images")
    for a, b in zip(cached.history, plain.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-3)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-3)
    a = load_checkpoint(tmp_path / "cached" / "best.pt", "cpu")
    b = load_checkpoint(tmp_path / "plain" / "best.pt", "cpu")
    images = load_images(config_for(small_tree, tmp_path / "cache", name)).images[:4]
    assert torch.allclose(a.view_logits(images), b.view_logits(images), atol=1e-3)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_frozen_batchnorm_statistics_do_not_move(small_tree, tmp_path, name):
    config = config_for(small_tree, tmp_path / "cache", name, strategy="partial", unfreeze=1, cache_features="off")
    train(config, tmp_path / "run", log=quiet)
    state = Checkpoint.load(tmp_path / "run" / "best.pt").model
    backbone = get_backbone(f"timm/{name}")
    stem = [k for k in state if k.endswith("running_mean") and k.startswith(backbone.groups[0][1])]
    last = [k for k in state if k.endswith("running_mean") and k.startswith(backbone.groups[-2][1])]
    assert stem and last
    assert all(torch.equal(state[k], torch.zeros_like(state[k])) for k in stem)  # random init: still zeros
    assert any(not torch.equal(state[k], torch.zeros_like(state[k])) for k in last)  # the trained group's moved


def test_weights_from_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source, _ = build_model("timm/regnetx_002", 5, head="linear")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model, described = build_model("timm/regnetx_002", 2, weights=str(tmp_path / "w.safetensors"))
    assert described == str(tmp_path / "w.safetensors")
    assert torch.equal(model.stem.conv.weight, source.stem.conv.weight)
    assert weights_identity("timm/regnetx_002", str(tmp_path / "w.safetensors")).startswith("file:")
    with pytest.raises(WeightsError, match="do not fit timm/resnet18: .* missing"):
        build_model("timm/resnet18", 2, weights=str(tmp_path / "w.safetensors"))


def test_imagenet_weights_offline_without_cache_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    assert weights_identity("timm/resnet18", "imagenet") == "timm:resnet18.a1_in1k"
    with pytest.raises(WeightsError, match=r"not in the local Hugging Face cache .* --weights PATH") as error:
        build_model("timm/resnet18", 2, weights="imagenet")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(arch="timm/resnet_18"), r"unknown timm model 'resnet_18' \(did you mean 'timm/resnet18'\?\)"),
        (dict(arch="timm/resnet18", head="mlp"), "head = 'mlp': timm/resnet18 supports only 'linear'"),
        (dict(arch="timm/resnet18", strategy="partial", unfreeze=9), "unfreeze = 9: timm/resnet18 has only 8 groups"),
        (dict(arch="timm/vit_tiny_patch16_224", resolution=32), "resolution = 32: .* takes only 224 px"),
    ],
)
def test_bad_input_is_one_line(small_tree, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        prepare_run(tiny_config(small_tree, tmp_path / "cache", **overrides), tmp_path / "run")
    assert "\n" not in str(error.value)


def test_models_lists_timm_matches(capsys):
    from transferlab.cli import main

    assert main(["models", "regnetx_00*", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "timm/regnetx_002: groups stem, s1, s2" in out
    assert "timm, 2.7M parameters, pretrained at 224 px" in out
    assert "more timm models match" in out


def test_checkpoints_export_and_grad_cam_layers(small_tree, tmp_path):
    from transferlab.inference.analysis import gradcam_layer
    from transferlab.inference.export import export_checkpoint

    config = config_for(small_tree, tmp_path / "cache", "mobilenetv3_small_100", strategy="partial", unfreeze=2)
    train(config, tmp_path / "run", log=quiet)
    assert export_checkpoint(tmp_path / "run" / "best.pt", "torchscript", tmp_path / "m.pt").is_file()
    expected = {"resnet18": "layer4.1.conv2", "efficientnet_b0": "conv_head", "regnetx_002": "s4.b7.conv3.conv"}
    for name, layer in expected.items():
        model, _ = build_model(f"timm/{name}", 2)
        assert gradcam_layer(model, get_backbone(f"timm/{name}"))[0] == layer
    model, _ = build_model("timm/mixer_s16_224", 2)  # tokens without a ViT's patch grid: no layer to weight
    with pytest.raises(ValueError, match="no Conv2d"):  # error_analysis then skips Grad-CAM and says why
        gradcam_layer(model, get_backbone("timm/mixer_s16_224"))


def test_vit_grad_cam_lays_patch_tokens_on_the_grid():
    from transferlab.engine.preprocess import Preprocess
    from transferlab.inference.analysis import grad_cam, gradcam_layer

    torch.manual_seed(0)
    model, _ = build_model("timm/vit_tiny_patch16_224", 3)
    backbone = get_backbone("timm/vit_tiny_patch16_224")
    assert gradcam_layer(model.eval(), backbone)[0] == "blocks.11.norm1"
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 36, 3), dtype=np.uint8)
    maps, name, size = grad_cam(model, backbone, Preprocess(backbone.mean, backbone.std, 224), images, [0, 2])
    assert name == "blocks.11.norm1" and size == [14, 14]  # 224 / 16 patches a side, the class token dropped
    assert maps.shape == (2, 40, 36) and 0 <= maps.min() and maps.max() <= 1 and maps.std() > 0.05  # not uniform


def test_gradual_unfreezing_of_timm_blocks(small_tree, tmp_path):
    config = config_for(small_tree, tmp_path / "cache", "resnet18", strategy="partial", unfreeze=2, epochs=2,
                        gradual_unfreeze=1)  # fmt: skip
    result = train(config, tmp_path / "run", log=quiet)
    assert len(result.history) == 2 and result.feature_path == "cached"


def test_imagenet_weights_from_the_local_hugging_face_cache(monkeypatch, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    published, _ = build_model("timm/regnetx_002", 1000)
    repo = tmp_path / "hf" / "models--timm--regnetx_002.pycls_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(published.state_dict(), str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    model, described = build_model("timm/regnetx_002", 3, weights="imagenet")
    assert described.startswith("timm regnetx_002.pycls_in1k")
    assert torch.equal(model.s4.b7.conv3.conv.weight, published.s4.b7.conv3.conv.weight)
    assert model.head.fc.out_features == 3
