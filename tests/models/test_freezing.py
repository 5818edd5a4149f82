"""Freezing strategies: which groups train, the frozen prefix, and frozen weights that never move."""

from __future__ import annotations

import pytest
import torch
from helpers import quiet, tiny_config

from transferlab.engine.hooks import Hook
from transferlab.engine.train import run_training
from transferlab.models.freezing import (
    active_groups,
    apply_freezing,
    frozen_prefix_length,
    parameter_groups,
    set_train_mode,
    trainable_groups,
)
from transferlab.models.registry import get_backbone
from transferlab.models.weights import build_model

SQUEEZE = get_backbone("squeezenet1_1")


@pytest.mark.parametrize(
    "strategy, unfreeze, expected, prefix",
    [
        ("frozen", 2, ["head"], 9),
        ("partial", 2, ["fire8", "fire9", "head"], 7),
        ("partial", 1, ["fire9", "head"], 8),
        ("partial", 8, ["fire2", "fire3", "fire4", "fire5", "fire6", "fire7", "fire8", "fire9", "head"], 1),
        ("full", 2, ["stem", "fire2", "fire3", "fire4", "fire5", "fire6", "fire7", "fire8", "fire9", "head"], 0),
    ],
)
def test_trainable_groups_and_frozen_prefix(strategy, unfreeze, expected, prefix):
    trainable = trainable_groups(SQUEEZE, strategy, unfreeze)
    assert trainable == expected
    assert frozen_prefix_length(SQUEEZE, trainable) == prefix


def test_partial_cannot_unfreeze_more_than_there_is():
    with pytest.raises(ValueError, match="only 8 groups to unfreeze"):
        trainable_groups(SQUEEZE, "partial", 9)


def test_requires_grad_follows_the_groups():
    model, _ = build_model("squeezenet1_1", 3, weights="none")
    apply_freezing(model, SQUEEZE, trainable_groups(SQUEEZE, "partial", 2))
    trainable = {
        name.split(".")[0] + "." + name.split(".")[1] for name, p in model.named_parameters() if p.requires_grad
    }
    assert trainable == {"features.11", "features.12", "classifier.1"}  # fire8, fire9, the head's conv


def test_frozen_groups_stay_in_eval_mode():
    model, _ = build_model("squeezenet1_1", 3, weights="none")
    trainable = trainable_groups(SQUEEZE, "frozen")
    set_train_mode(model, SQUEEZE, trainable)
    assert model.classifier.training and not model.features.training and not model.features[12].training


def test_discriminative_learning_rates():
    model, _ = build_model("squeezenet1_1", 3, weights="none")
    trainable = trainable_groups(SQUEEZE, "partial", 2)
    apply_freezing(model, SQUEEZE, trainable)
    groups = parameter_groups(model, SQUEEZE, trainable, lr=1.0, decay=0.5)
    assert [(g["name"], g["lr"]) for g in groups] == [("head", 1.0), ("fire9", 0.5), ("fire8", 0.25)]


class Before(Hook):
    """Keeps the run, and its weights as they were before the first step (`before`)."""

    def on_fit_start(self, run, state) -> None:
        self.run = run
        self.before = {k: v.detach().clone() for k, v in run.model.state_dict().items()}


def train_recording(config, out) -> Before:
    recorded = Before()
    run_training(config, out, log=quiet, hooks=[recorded])
    return recorded


@pytest.mark.parametrize(
    "strategy, moved", [("frozen", {"classifier"}), ("partial", {"features.11", "features.12", "classifier"})]
)
def test_training_moves_only_trainable_parameters(image_tree, tmp_path, strategy, moved):
    """A real optimiser step (AdamW with weight decay): frozen tensors stay bit-identical."""
    config = tiny_config(image_tree, tmp_path / "cache", strategy=strategy, epochs=1, lr=1e-2, weight_decay=0.1)

    trainer = train_recording(config, tmp_path / "run")
    before, after = trainer.before, trainer.run.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    prefixes = tuple(p + "." for p in moved)
    assert changed, "nothing trained"
    assert all(k.startswith(prefixes) for k in changed), sorted(changed)
    # every trainable weight tensor moved
    assert all(k in changed for k in before if k.startswith(prefixes) and k.endswith("weight"))


def test_active_groups_unfreeze_one_more_group_every_n_epochs():
    trainable = ["fire8", "fire9", "head"]
    assert [active_groups(trainable, e, 2) for e in (1, 2, 3, 5, 9)] == [
        ["head"],
        ["head"],
        ["fire9", "head"],
        ["fire8", "fire9", "head"],
        ["fire8", "fire9", "head"],
    ]
    assert active_groups(trainable, 1, 0) == trainable  # off


@pytest.mark.parametrize(
    "epochs, moved",
    [(1, {"classifier"}), (2, {"features.12", "classifier"}), (3, {"features.11", "features.12", "classifier"})],
)
def test_gradual_unfreezing_moves_deeper_groups_only_once_unfrozen(image_tree, tmp_path, epochs, moved):
    """partial + gradual_unfreeze=1: epoch 1 trains the head, epoch 2 adds fire9, epoch 3 fire8."""
    config = tiny_config(
        image_tree, tmp_path / "cache", strategy="partial", epochs=epochs, lr=1e-2, weight_decay=0.1, gradual_unfreeze=1
    )

    trainer = train_recording(config, tmp_path / "run")
    after = trainer.run.model.state_dict()
    changed = {
        ".".join(k.split(".")[:2])
        if k.startswith("features")
        else "classifier"  # features.12.squeeze.weight -> features.12
        for k in trainer.before
        if not torch.equal(trainer.before[k], after[k])
    }
    assert changed == moved
