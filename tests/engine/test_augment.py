"""Training augmentations beyond crops and flips (engine/augment.py): RandomResizedCrop, RandAugment /
TrivialAugment, mixup / cutmix. Batched, drawn from the run's seed alone, training only, off the feature cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_one_line_error, built_run, quiet, tiny_config, train_args

from transferlab import RunConfig, train
from transferlab.cli import main
from transferlab.engine.augment import Mixing, apply_policy, policy, random_resized_crop
from transferlab.engine.preprocess import Preprocess
from transferlab.engine.run import loss_function
from transferlab.errors import ConfigError


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ramp(n: int = 6, side: int = 40) -> torch.Tensor:
    """(n, 1, side, side) images whose value is the column index: a crop's columns say where it was taken."""
    return torch.arange(side, dtype=torch.float32).expand(n, 1, side, side).clone()


def test_random_resized_crop_takes_a_box_inside_each_image_resized():
    x = ramp()
    out = random_resized_crop(x, 16, 0.08, generator())
    assert out.shape == (6, 1, 16, 16)
    assert out.min() >= 0 and out.max() <= 39  # sampled inside the image: no padding, no extrapolation
    lefts = out[:, 0, :, 0].mean(1)
    assert len(set(lefts.round().tolist())) > 1  # each image its own box
    spans = out[:, 0, 0, -1] - out[:, 0, 0, 0]
    assert (spans > 0).all() and (spans <= 39).all()


def test_random_resized_crop_at_scale_one_keeps_at_least_three_quarters_of_each_side():
    spans = random_resized_crop(ramp(64), 16, 1.0, generator())[:, 0, 0]
    # area 1 with aspect in [3/4, 4/3], clipped to the image: the box spans at least sqrt(3/4) of the width
    assert ((spans[:, -1] - spans[:, 0]) >= 0.75 * 39 * 15 / 16 - 1).all()


def test_a_policy_is_the_seeds_alone_and_leaves_torchs_generator_alone():
    pixels = torch.randint(0, 256, (16, 24, 24, 3), dtype=torch.uint8)
    state = torch.get_rng_state()
    a = apply_policy(pixels, policy("randaugment"), generator(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, apply_policy(pixels, policy("randaugment"), generator(1)))
    assert a.shape == pixels.shape and a.dtype == torch.uint8 and not torch.equal(a, pixels)
    assert policy("none") is None


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixing_blends_labels_into_probabilities_reproducibly(mixup, cutmix):
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    mixed, targets = Mixing(mixup, cutmix, 4)(x, y, generator(2))
    again, same = Mixing(mixup, cutmix, 4)(x, y, generator(2))
    assert torch.equal(mixed, again) and torch.equal(targets, same)
    assert targets.shape == (8, 4) and torch.allclose(targets.sum(1), torch.ones(8))
    assert not torch.equal(mixed, x)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_the_loss_of_one_hot_probabilities_is_the_loss_of_the_labels(loss):
    config = RunConfig(loss=loss, label_smoothing=0.1 if loss == "ce" else 0.0)
    criterion = loss_function(config, 5)
    logits, y = torch.randn(7, 5), torch.tensor([0, 1, 2, 3, 4, 0, 1])
    assert torch.allclose(criterion(logits, y), criterion(logits, F.one_hot(y, 5).float()), atol=1e-6)


def test_evaluation_preprocessing_ignores_the_training_augmentations():
    pixels = torch.randint(0, 256, (4, 40, 40, 3), dtype=torch.uint8)
    plain = Preprocess((0.5,) * 3, (0.25,) * 3, 32)
    augmented = Preprocess((0.5,) * 3, (0.25,) * 3, 32, random_resized_crop=0.08, auto_augment="trivialaugment")
    assert torch.equal(plain(pixels), augmented(pixels))
    assert plain.identity() == augmented.identity()  # the feature cache and inference see the same inputs
    assert augmented(pixels, train=True, generator=generator()).shape == (4, 3, 32, 32)


@pytest.mark.parametrize(
    "option",
    [{"random_resized_crop": 0.5}, {"auto_augment": "trivialaugment"}, {"mixup": 0.4}, {"cutmix": 1.0}],
)
def test_an_augmentation_before_the_frozen_prefix_turns_the_feature_cache_off(image_tree, tmp_path, option):
    run = built_run(tiny_config(image_tree, tmp_path / "cache", **option), tmp_path / "run")
    assert run.inputs.path == "images"


def test_a_run_with_every_augmentation_trains_and_repeats_exactly(image_tree, tmp_path):
    options = dict(random_resized_crop=0.3, auto_augment="randaugment", mixup=0.4, cutmix=1.0, epochs=2)
    first = train(tiny_config(image_tree, tmp_path / "cache", **options), tmp_path / "a", log=quiet)
    second = train(tiny_config(image_tree, tmp_path / "cache", **options), tmp_path / "b", log=quiet)
    plain = train(tiny_config(image_tree, tmp_path / "cache", epochs=2), tmp_path / "c", log=quiet)
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(first.history) == strip(second.history)  # the seed alone decides every draw
    assert strip(first.history) != strip(plain.history)
    assert all(row["train_loss"] == row["train_loss"] for row in first.history)  # finite, not NaN


def test_mixing_with_class_weights_is_refused():
    with pytest.raises(ConfigError, match="mixup / cutmix with class_weights"):
        RunConfig.from_dict({"mixup": 0.2, "class_weights": "balanced"})


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--auto-augment", "randaug"], "auto-augment"),
        (["--mixup", "-1"], "mixup"),
        (["--random-resized-crop", "1.5"], "random_resized_crop"),
        (["--cutmix", "lots"], "cutmix"),
        (["--mixup", "0.2", "--class-weights", "balanced"], "class_weights"),
        (["--mixup", "1e-300"], "mixup = 1e-300: below 0.01 it mixes nothing"),
        (["--cutmix", "0.001"], "cutmix = 0.001"),
    ],
)
def test_bad_augmentation_options_are_one_line_usage_errors(image_tree, tmp_path, capsys, flags, fragment):
    try:
        code = main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", *flags))
    except SystemExit as stop:  # argparse's own choices and types
        code = stop.code
    assert code == 2
    assert_one_line_error(capsys.readouterr(), fragment)
    assert not (tmp_path / "run").exists()


def test_a_run_folder_of_other_augmentation_names_the_value_it_holds(image_tree, tmp_path, capsys):
    assert main(train_args(image_tree, tmp_path / "run", tmp_path / "cache")) == 0
    capsys.readouterr()
    assert main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--mixup", "0.5")) == 2
    assert_one_line_error(capsys.readouterr(), "mixup 0.0 there, 0.5 here")
