"""The learning-rate range test (lr_find.py, `transferlab lr-find`, a study's lr = "find").

The specification, on synthetic data (coloured-noise images, a frozen random SqueezeNet with a linear head):
  * the rate it suggests lies in the band of rates where training works, found in the test by training at fixed
    rates: too low makes no progress, too high does not converge;
  * the suggestion is the steepest descent of the smoothed loss against log(lr); a curve without a descent gives
    no suggestion and says why; the smoothing is an EMA with bias correction;
  * it stops early when the smoothed loss passes 4x its minimum, or when a loss is not finite;
  * it takes the training step training takes (Trainer.train_step), on training images only, and is deterministic:
    the same seed gives the same curve;
  * `transferlab lr-find --out DIR` writes lr_find.png and lr_find.json and prints the suggestion in one line; bad
    inputs (steps below 10, start >= end, a rate that is not positive) are one line, exit 2.
"""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
import torch
from helpers import make_image_tree, quiet, tiny_config
from test_cli import assert_one_line_error
from test_study import _one_thread  # noqa: F401 (autouse fixture)

import transferlab
from transferlab.cli import main
from transferlab.config import RunConfig
from transferlab.lr_find import LRFindResult, lr_find, smooth, suggest
from transferlab.train import Trainer, train

lr_find_module = importlib.import_module("transferlab.lr_find")  # the package's `lr_find` is the function
PROBLEM = dict(strategy="frozen", head="linear")  # a linear head on frozen random features: colour is linear


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """Three well-separated colour classes, 20 images each, and a cache shared by the module's runs."""
    root = tmp_path_factory.mktemp("lr_find")
    return make_image_tree(root / "images", per_class=20, size=24), root / "cache"


def config(problem, **overrides) -> RunConfig:
    tree, cache = problem
    return tiny_config(tree, cache, **{**PROBLEM, **overrides})


# ---------------------------------------------------------------------------- the suggestion is a good rate
def test_the_suggestion_lies_in_the_band_where_training_works(problem, tmp_path):
    rates = [10.0**e for e in range(-5, 2)]
    final = {}
    for lr in rates:  # 8 epochs of 5 steps: the last epoch's training loss
        result = train(config(problem, lr=lr, epochs=8), tmp_path / f"lr{lr:g}", log=quiet)
        final[lr] = result.history[-1]["train_loss"]
    start = math.log(3)  # cross-entropy of a uniform guess over three classes
    good = [lr for lr in rates if final[lr] < 0.5 * start]
    assert good and min(good) > rates[0] and max(good) < rates[-1], final  # too low and too high both fail here

    found = lr_find(config(problem), log=quiet)
    assert found.suggestion is not None, found.reason
    assert min(good) <= found.suggestion <= max(good), (found.suggestion, final)


def test_suggest_reads_the_steepest_descent_against_log_lr():
    lrs = np.geomspace(1e-6, 1, 100)
    x = np.log10(lrs)
    falling = (1 / (1 + np.exp(3 * (x + 3)))).tolist()  # a logistic fall, steepest at 1e-3
    lr, how = suggest(lrs.tolist(), falling, 100)
    assert lr == pytest.approx(1e-3, rel=0.15) and "steepest" in how
    rising = (falling[::-1])[: len(falling) // 2]  # lowest at the start: nothing to read
    assert suggest(lrs.tolist()[:50], rising, 100)[0] is None
    flat = [1.0 - 1e-4 * i for i in range(100)]  # falls by 1%: noise, not a descent
    lr, why = suggest(lrs.tolist(), flat, 100)
    assert lr is None and "falls by only" in why
    assert suggest(lrs.tolist()[:5], falling[:5], 100)[0] is None  # stopped before there was a curve


def test_smoothing_is_a_bias_corrected_moving_average():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards the zero it starts from
    assert smooth([1.0, 3.0]) == pytest.approx([1.0, (0.98 * 0.02 * 1 + 0.02 * 3) / (1 - 0.98**2)])


# ---------------------------------------------------------------------------- stopping
def test_it_stops_once_the_smoothed_loss_passes_four_times_its_minimum(problem):
    result = lr_find(config(problem, optimizer="sgd"), end_lr=1e4, log=quiet)
    assert result.stopped_early and len(result.lrs) < 100 and "4 x its minimum" in result.stop
    assert result.smoothed[-1] > 4 * min(result.smoothed)
    assert all(s <= 4 * min(result.smoothed[: i + 1]) for i, s in enumerate(result.smoothed[:-1]))


def test_the_stop_compares_with_the_running_minimum_of_the_smoothed_loss(problem, monkeypatch):
    script = [1.0] * 10 + [0.02] * 50 + [1.0] * 40  # falls far below its start, then back: never 4x the start
    step = Trainer.train_step
    calls = []

    def scripted(self, idx, factor):
        loss, logits = step(self, idx, factor)
        calls.append(factor)
        return torch.tensor(script[len(calls) - 1]), logits

    monkeypatch.setattr(Trainer, "train_step", scripted)
    result = lr_find(config(problem), log=quiet)
    expected = smooth(script)
    stop = next(i for i, v in enumerate(expected) if v > 4 * min(expected[: i + 1]))
    assert result.stopped_early and len(result.lrs) == stop + 1 < 100
    assert result.smoothed == pytest.approx(expected[: stop + 1])


def test_it_stops_at_a_loss_that_is_not_finite(problem, monkeypatch):
    step = Trainer.train_step
    calls = []

    def diverging(self, idx, factor):
        loss, logits = step(self, idx, factor)
        calls.append(factor)
        return (loss * math.nan if len(calls) == 30 else loss), logits

    monkeypatch.setattr(Trainer, "train_step", diverging)
    result = lr_find(config(problem), log=quiet)
    assert result.stopped_early and len(result.lrs) == 29 and "nan" in result.stop
    assert all(math.isfinite(v) for v in result.losses + result.smoothed)


# ---------------------------------------------------------------------------- how it trains
def test_it_takes_the_training_step_on_training_images_only_at_growing_rates(problem, monkeypatch):
    step = Trainer.train_step
    seen = []

    def spy(self, idx, factor):
        seen.append((idx.clone(), factor, set(self.split.train.tolist())))
        return step(self, idx, factor)

    monkeypatch.setattr(Trainer, "train_step", spy)
    result = lr_find(config(problem), steps=40, start_lr=1e-5, end_lr=1.0, log=quiet)
    assert len(seen) == len(result.lrs) == 40  # 36 training images in batches of 8: cycled over
    assert [f for _, f, _ in seen] == pytest.approx(np.geomspace(1e-5, 1.0, 40).tolist())
    assert result.lrs == pytest.approx(np.geomspace(1e-5, 1.0, 40).tolist())
    for idx, _, train_rows in seen:
        assert set(idx.tolist()) <= train_rows


def test_the_same_seed_gives_the_same_curve(problem):
    first = lr_find(config(problem), steps=30, log=quiet)
    again = lr_find(config(problem), steps=30, log=quiet)
    assert (first.lrs, first.losses, first.smoothed, first.suggestion) == (
        again.lrs,
        again.losses,
        again.smoothed,
        again.suggestion,
    )
    other = lr_find(config(problem, seed=1), steps=30, log=quiet)
    assert other.losses != first.losses


def test_the_library_exports_it():
    assert transferlab.lr_find is lr_find and transferlab.LRFindResult is LRFindResult
    assert lr_find_module.lr_find is lr_find


# ---------------------------------------------------------------------------- the command line
def lr_find_args(problem, *extra):
    tree, cache = problem
    return ["lr-find", "--data", str(tree), "--cache-dir", str(cache), "--weights", "none", "--resolution", "32",
            "--batch-size", "8", "--device", "cpu", "--test-fraction", "0.2", "--val-fraction", "0.2",
            "--strategy", "frozen", "--head", "linear", "--no-progress", *extra]  # fmt: skip


def test_cli_writes_the_plot_and_the_curve_and_prints_the_suggestion(problem, tmp_path, capsys):
    out = tmp_path / "lr"
    assert main(lr_find_args(problem, "--out", str(out), "--steps", "60")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("suggested lr ")
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "lr_find.json").read_text())
    assert f"{record['suggestion']:.3g}" in lines[0]
    assert len(record["lrs"]) == len(record["losses"]) == len(record["smoothed"]) <= record["steps"] == 60
    assert record["config"]["strategy"] == "frozen" and record["config"]["data"] == str(problem[0])


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--steps", "0"], "steps = 0"),
        (["--steps", "9"], "at least 10"),
        (["--start-lr", "1", "--end-lr", "0.1"], "must be below end_lr"),
        (["--start-lr", "0.1", "--end-lr", "0.1"], "must be below end_lr"),
        (["--start-lr", "-1"], "start_lr = -1.0: expected a positive"),
        (["--end-lr", "nan"], "end_lr = nan"),
        (["--steps", "many"], "--steps"),
    ],
)
def test_cli_bad_range_is_one_line_exit_2_and_writes_nothing(problem, tmp_path, capsys, extra, fragment):
    out = tmp_path / "lr"
    try:
        status = main(lr_find_args(problem, "--out", str(out), *extra))
    except SystemExit as exit:  # argparse's own checks (a --steps that is no number)
        status = exit.code
    assert status == 2
    assert_one_line_error(capsys.readouterr(), fragment)
    assert not out.exists()
