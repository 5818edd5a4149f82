"""A backbone's preprocessing and head dropout are its defaults unless the run sets them.

- Unset (None) resolution, crop_fraction, interpolation and dropout resolve per backbone, for photos: torchvision
  backbones take their pretrained input side (224 px) with the whole square, bilinear, and the paper head's dropout
  0.5; timm models take their pretrained_cfg (input size, crop_pct, interpolation) and timm's default head dropout
  (0). A value the run sets is kept (the bundled CIFAR-10 studies set 32 px).
- A run is identified by the resolved values: leaving resolution unset on SqueezeNet is the same run as 224.
- In a study, resolution unset in [run] resolves per trial: a grid over arch gives each backbone its own size.
- Images are stored large enough for the centre crop: timm's 224 px at crop_pct 0.95 stores 236 px squares.
- The crop and the interpolation are applied on the device (centre crop, then resize), in training and in evaluate
  (they travel in the checkpoint and an export's metadata; a checkpoint written before them reads as the whole
  square, bilinear), and they are part of the feature cache's key.
- --dropout reaches timm's heads (drop_rate), in every family.
- Bad values are one line, exit 2: --crop-fraction 0 or 1.5, --interpolation nearest.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import TEST_DEVICE, assert_one_line_error, make_image_tree, quiet, tiny_config, train_args

from transferlab import RunConfig, train
from transferlab.cli import main
from transferlab.config.identity import identity
from transferlab.config.study import StudySpec
from transferlab.data.sources import load_images, storage_size_for
from transferlab.data.split import split_for
from transferlab.engine.checkpoint import Checkpoint
from transferlab.engine.features import feature_key
from transferlab.engine.preprocess import Preprocess
from transferlab.inference.evaluate import evaluate_checkpoint
from transferlab.inference.export import metadata
from transferlab.inference.predict import load_checkpoint
from transferlab.models.registry import resolve
from transferlab.models.weights import build_model
from transferlab.study.plan import config_for


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("squeezenet1_1", dict(resolution=224, crop_fraction=1.0, interpolation="bilinear", dropout=0.5)),
        ("resnet18", dict(resolution=224, crop_fraction=1.0, interpolation="bilinear", dropout=0.5)),
        ("resnet50", dict(resolution=224, crop_fraction=1.0, interpolation="bilinear", dropout=0.5)),
        ("timm/resnet18", dict(resolution=224, crop_fraction=0.95, interpolation="bicubic", dropout=0.0)),
        ("timm/vit_tiny_patch16_224", dict(resolution=224, crop_fraction=0.9, interpolation="bicubic", dropout=0.0)),
    ],
)
def test_unset_preprocessing_resolves_to_the_backbones(arch, expected):
    resolved = resolve(RunConfig(arch=arch))
    assert {k: getattr(resolved, k) for k in expected} == expected
    assert resolve(resolved) == resolved
    chosen = resolve(RunConfig(arch=arch, resolution=96, crop_fraction=1.0, interpolation="bilinear", dropout=0.3))
    assert (chosen.resolution, chosen.crop_fraction, chosen.interpolation, chosen.dropout) == (96, 1.0, "bilinear", 0.3)


def test_a_run_is_identified_by_its_resolved_values():
    def trains(config: RunConfig) -> dict:
        return identity(resolve(config))

    assert trains(RunConfig()) == trains(RunConfig(resolution=224, dropout=0.5))
    assert trains(RunConfig()) != trains(RunConfig(resolution=32))
    assert trains(RunConfig(arch="timm/resnet18"))["crop_fraction"] == 0.95


def test_a_study_resolves_each_trials_backbone_defaults():
    tree = {"run": {"weights": "none"}, "grid": {"arch": ["squeezenet1_1", "timm/vit_tiny_patch16_224"]}}
    spec = StudySpec.from_dict(tree)
    inputs = {p["arch"]: (config_for(spec, p).crop_fraction, config_for(spec, p).interpolation) for p in spec.points()}
    assert inputs == {"squeezenet1_1": (1.0, "bilinear"), "timm/vit_tiny_patch16_224": (0.9, "bicubic")}  # each its own
    fixed = StudySpec.from_dict({**tree, "run": {"weights": "none", "resolution": 64}, "grid": {"arch": ["resnet18"]}})
    assert config_for(fixed, fixed.points()[0]).resolution == 64


def test_images_are_stored_large_enough_for_the_centre_crop():
    assert storage_size_for(resolve(RunConfig())) == 224
    assert storage_size_for(resolve(RunConfig(arch="timm/resnet18"))) == 236  # ceil(224 / 0.95)
    assert storage_size_for(resolve(RunConfig(arch="timm/resnet18", storage_size=300))) == 300
    assert storage_size_for(resolve(RunConfig(resolution=100, crop_fraction=0.5))) == 200


def test_the_centre_crop_keeps_the_centre_and_bicubic_stays_in_range():
    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[:, 8:24, 8:24] = (0, 255, 0)  # a green centre in a black frame
    identity = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resolution=16)
    whole = Preprocess(**identity)(torch.from_numpy(image))
    centre = Preprocess(**identity, crop_fraction=0.5)(torch.from_numpy(image))
    assert whole[0, 1].min() == 0 and torch.allclose(centre[0, 1], torch.ones(16, 16))
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8))
    bicubic = Preprocess(**identity, interpolation="bicubic")(noise)
    assert not torch.allclose(bicubic, Preprocess(**identity)(noise))
    assert bicubic.min() >= 0 and bicubic.max() <= 1


def test_the_feature_cache_key_holds_the_crop_and_the_interpolation():
    def key(**preprocess):
        return feature_key(data="data", rows=np.arange(4), arch="squeezenet1_1", weights="none", cut=3,
                           preprocess=Preprocess((0.5,) * 3, (0.5,) * 3, 32, **preprocess), mirror=False,
                           autocast=False, device=torch.device("cpu"))  # fmt: skip

    assert key(crop_fraction=0.875) != key() != key(interpolation="bicubic")
    assert key(crop_padding=4, flip=True) == key()  # training augmentations never reach cached features


def test_evaluate_repeats_the_crop_and_interpolation_of_training(tmp_path):
    tree = make_image_tree(tmp_path / "images", per_class=10, size=40)
    # stored at 40 px, the centre 24 px resized to 20 px: both the crop and the interpolation change the input
    config = tiny_config(tree, tmp_path / "cache", resolution=20, crop_fraction=0.6, interpolation="bicubic",
                         storage_size=40, strategy="full", epochs=2, head="linear", lr=0.001)  # fmt: skip
    result = train(config, tmp_path / "run", log=quiet)
    ckpt = Checkpoint.load(tmp_path / "run" / "best.pt")
    assert (ckpt.crop_fraction, ckpt.interpolation, ckpt.resolution) == (0.6, "bicubic", 20)
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["preprocessing"]
    assert (recorded["crop_fraction"], recorded["interpolation"]) == (0.6, "bicubic")
    exported = metadata(ckpt)  # what an exported model's user is told to do to an image
    assert (exported["crop_fraction"], exported["interpolation"], exported["resolution"]) == (0.6, "bicubic", 20)
    images = load_images(config)
    val = split_for(images, config).val
    scores = evaluate_checkpoint(tmp_path / "run" / "best.pt", images, indices=val, device=TEST_DEVICE)
    best = result.history[ckpt.epoch - 1]
    assert scores["accuracy"] == best["val_accuracy"]  # the same images seen the same way: the same loss too
    assert scores["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    loaded = load_checkpoint(tmp_path / "run" / "best.pt", TEST_DEVICE)
    x = torch.as_tensor(images.images[val])
    as_trained = loaded.view_logits(x)
    loaded.preprocess.crop_fraction = 1.0
    assert not torch.allclose(loaded.view_logits(x), as_trained, atol=1e-3)  # the crop matters here
    loaded.preprocess.crop_fraction, loaded.preprocess.interpolation = 0.6, "bilinear"
    assert not torch.allclose(loaded.view_logits(x), as_trained, atol=1e-3)  # and so does the interpolation


def test_a_checkpoint_from_before_the_crop_reads_as_the_whole_square(tmp_path):
    tree = make_image_tree(tmp_path / "images", per_class=6)
    train(tiny_config(tree, tmp_path / "cache"), tmp_path / "run", log=quiet)
    raw = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    del raw["crop_fraction"], raw["interpolation"]
    torch.save(raw, tmp_path / "old.pt")
    old = Checkpoint.load(tmp_path / "old.pt")
    assert (old.crop_fraction, old.interpolation) == (1.0, "bilinear")


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto",
                                  "regnetx_002", "vit_tiny_patch16_224"])  # fmt: skip
def test_dropout_reaches_timm_heads(name):
    side = 224 if name.startswith("vit") else 32
    x = torch.rand(4, 3, side, side)

    def two_head_passes(dropout):
        torch.manual_seed(0)
        model, _ = build_model(f"timm/{name}", 3, dropout=dropout)
        with torch.no_grad():
            features = model.eval().forward_features(x)
            model.train()
            return model.forward_head(features), model.forward_head(features)

    assert not torch.equal(*two_head_passes(0.9))  # dropped units differ between passes
    assert torch.equal(*two_head_passes(0.0))
    assert torch.equal(*two_head_passes(None))  # timm's default: no head dropout


@pytest.mark.parametrize(
    "flag, value, fragment",
    [("--crop-fraction", "0", "crop_fraction = 0.0: must be >= 0.1"),
     ("--crop-fraction", "1.5", "crop_fraction = 1.5: must be <= 1.0"),
     ("--interpolation", "nearest", "invalid choice: 'nearest'")],
)  # fmt: skip
def test_bad_preprocessing_values_are_one_line(flag, value, fragment, tmp_path, capsys):
    tree = make_image_tree(tmp_path / "images", per_class=4)
    try:
        status = main(train_args(tree, tmp_path / "run", tmp_path / "cache", flag, value))
    except SystemExit as exit:  # argparse's choices
        status = exit.code
    assert status == 2
    assert_one_line_error(capsys.readouterr(), fragment)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
