"""Backbones: torchvision architecture, pretrained body from a file (or torchvision), re-initialised head."""

from __future__ import annotations

from urllib.error import URLError

import pytest
import torch
from helpers import (
    assert_one_line_error,
    train_args,
    write_spec,
)
from torch import nn

from transferlab.cli import main
from transferlab.errors import WeightsError
from transferlab.models.freezing import as_sequential
from transferlab.models.registry import REGISTRY, get_backbone, min_resolution
from transferlab.models.weights import build_model


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("arch", ["squeezenet1_0", "squeezenet1_1"])
def test_squeezenet_with_random_weights(arch):
    model, source = build_model(arch, 7, weights="none")
    assert "none" in source
    head = list(model.classifier)
    assert [type(m) for m in head] == [nn.Dropout, nn.Conv2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten]
    conv = head[1]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (512, 7, (1, 1))
    assert head[0].p == 0.5 and head[3].output_size == 1
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_linear_head_and_dropout():
    model, _ = build_model("squeezenet1_1", 4, weights="none", head="linear", dropout=0.25)
    assert [type(m) for m in model.classifier] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Linear]
    assert model.classifier[2].p == 0.25 and model.classifier[3].out_features == 4


def test_mlp_head():
    model, _ = build_model("squeezenet1_1", 5, weights="none", head="mlp", dropout=0.1)
    assert [type(m) for m in model.classifier] == [
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.ReLU,
        nn.AdaptiveAvgPool2d,
        nn.Flatten,
        nn.Dropout,
        nn.Linear,
    ]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_registry_groups_cover_the_forward_pass():
    backbone = get_backbone("squeezenet1_1")
    assert backbone.group_names == [
        "stem",
        "fire2",
        "fire3",
        "fire4",
        "fire5",
        "fire6",
        "fire7",
        "fire8",
        "fire9",
        "head",
    ]
    model, _ = build_model("squeezenet1_1", 3, weights="none")
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(as_sequential(model, backbone)(x), model(x))
        cut = 5
        middle = as_sequential(model, backbone, 0, cut)(x)
        torch.testing.assert_close(as_sequential(model, backbone, cut)(middle), model(x))
    assert {"squeezenet1_0", "squeezenet1_1", "resnet18", "resnet50"} <= set(REGISTRY)


def test_unknown_architecture():
    with pytest.raises(WeightsError, match="unknown architecture 'vgg'"):
        build_model("vgg", 3)


def test_features_only_state_dict_is_loaded(features_weights):
    expected = torch.load(features_weights, weights_only=True)
    model, source = build_model("squeezenet1_1", 3, weights=str(features_weights))
    assert source == str(features_weights)
    own = model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(own[key], value, rtol=0, atol=0)
    assert own["classifier.1.weight"].shape == (3, 512, 1, 1)


def test_full_state_dict_and_checkpoint_wrapper_are_accepted(tmp_path):
    from torchvision.models import squeezenet1_1

    state = squeezenet1_1().state_dict()  # with a 1000-class classifier: the head is replaced anyway
    torch.save(state, tmp_path / "full.pth")
    torch.save({"model": state, "epoch": 3}, tmp_path / "wrapped.pth")
    for name in ("full.pth", "wrapped.pth"):
        model, _ = build_model("squeezenet1_1", 2, weights=str(tmp_path / name))
        torch.testing.assert_close(model.state_dict()["features.0.weight"], state["features.0.weight"], rtol=0, atol=0)


def test_state_dict_of_another_architecture(tmp_path):
    from torchvision.models import squeezenet1_0

    path = tmp_path / "v10.pth"
    torch.save({k: v for k, v in squeezenet1_0().state_dict().items() if k.startswith("features.")}, path)
    with pytest.raises(WeightsError) as error:
        build_model("squeezenet1_1", 3, weights=str(path))
    assert "do not fit squeezenet1_1" in one_line(error)


def test_state_dict_with_wrong_shapes(tmp_path, features_weights):
    state = torch.load(features_weights, weights_only=True)
    state["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, tmp_path / "shapes.pth")
    with pytest.raises(WeightsError, match="features.0.weight has shape"):
        build_model("squeezenet1_1", 3, weights=str(tmp_path / "shapes.pth"))


def test_text_file_as_weights(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_text("these are not weights\nsecond line\n")
    with pytest.raises(WeightsError) as error:
        build_model("squeezenet1_1", 3, weights=str(path))
    assert str(path) in one_line(error)


def test_pickle_that_is_not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="not a state dict"):
        build_model("squeezenet1_1", 3, weights=str(tmp_path / "list.pth"))


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError) as error:
        build_model("squeezenet1_1", 3, weights=str(tmp_path / "absent.pth"))
    assert "does not exist" in one_line(error)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and a network that fails: no test ever downloads anything."""
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def no_network(*args, **kwargs):
        raise URLError("network is unreachable (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    return hub


def test_imagenet_weights_offline_is_one_line_with_advice(offline_hub):
    with pytest.raises(WeightsError) as error:
        build_model("squeezenet1_1", 3, weights="imagenet")
    text = one_line(error)
    assert "--weights PATH" in text and "TRANSFERLAB_WEIGHTS" in text and "URLError" in text
    assert str(offline_hub) in text  # says where the file was looked for
    assert list(offline_hub.rglob("*.pth")) == []


def test_transferlab_weights_environment_replaces_imagenet(offline_hub, features_weights, monkeypatch):
    monkeypatch.setenv("TRANSFERLAB_WEIGHTS", str(features_weights))
    model, source = build_model("squeezenet1_1", 3, weights="imagenet")
    assert source == str(features_weights)
    expected = torch.load(features_weights, weights_only=True)["features.0.weight"]
    torch.testing.assert_close(model.state_dict()["features.0.weight"], expected, rtol=0, atol=0)


def test_a_resolution_the_backbone_cannot_take_is_one_line(image_tree, tmp_path, capsys):
    args = train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--resolution", "8")
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), "resolution = 8", "squeezenet1_1", "at least 17 px")
    assert not (tmp_path / "cache").exists()
    assert min_resolution("resnet18") == 8


def test_a_grid_resolution_the_backbone_cannot_take_is_refused_before_training(one_point_spec, tmp_path, capsys):
    study_dir = tmp_path / "study"
    one_point_spec.write_text(
        one_point_spec.read_text().replace("resolution = 32\n", "")
    )  # the grid axis sets it alone
    args = ["study", "run", str(one_point_spec), "--dir", str(study_dir), "--set", "grid.resolution=[32, 8]"]
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), "resolution = 8", "at least 17 px")
    assert not (study_dir / "trials").exists()


# ---------------------------------------------------------------------------- tracebacks
def test_a_studys_missing_weights_advice_is_the_studys(make_tree, tmp_path, capsys):
    spec = write_spec(tmp_path / "s.toml", make_tree("images", per_class=12, size=16), tmp_path / "cache",
                      {"epochs": [1]}, weights=str(tmp_path / "missing.pth"))  # fmt: skip
    assert main(["study", "run", str(spec), "--dir", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured, "missing.pth", "--set weights=", "in [run]")
    assert "pass --weights" not in captured.err
    error = WeightsError("ImageNet weights for x are not in y", "pass {path} to a local state dict, or {none}")
    assert "pass --weights PATH" in str(error) and "--set weights=PATH" in str(error.for_study())
