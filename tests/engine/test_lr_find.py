"""The learning-rate range test (lr_find.py, `transferlab lr-find`, a study's lr = "find").

The specification, on synthetic data (coloured-noise images, a frozen random SqueezeNet with a linear head):
  * the rate it suggests lies in the band of rates where training works, found in the test by training at fixed
    rates: too low makes no progress, too high does not converge;
  * the suggestion is the steepest descent of the smoothed loss against log(lr); a curve without a descent gives
    no suggestion and says why; the smoothing is an EMA with bias correction;
  * it stops early when the smoothed loss passes 4x its minimum, or when a loss is not finite;
  * it takes the training step training takes (engine.loop.train_step), on training images only, and is deterministic:
    the same seed gives the same curve;
  * `transferlab lr-find --out DIR` writes lr_find.png and lr_find.json and prints the suggestion in one line; bad
    inputs (steps below 10, start >= end, a rate that is not positive, lr = "fnd" in a spec) are one line, exit 2;
    a curve without a descent prints why, in one line, and exits 1;
  * in a study, lr = "find" runs the test once per configuration needing it (here: per regime) before training, the
    trials train at the rate found and their identities hold it; a rerun reuses the finding stored in the study;
    a curve that gives no rate stops the study in one line before anything is queued.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, load_study, make_image_tree, quiet, tiny_config, write_spec

import transferlab
from transferlab.cli import main
from transferlab.config.run import RunConfig
from transferlab.config.study import StudySpec
from transferlab.engine import loop
from transferlab.engine.lr_curve import LRFindResult, smooth, suggest
from transferlab.engine.lr_find import lr_find
from transferlab.engine.train import train
from transferlab.errors import ConfigError
from transferlab.study import worker as worker_module
from transferlab.study.identity import trial_identity
from transferlab.study.records import grid_trials
from transferlab.study.runner import run_study

lr_find_module = importlib.import_module("transferlab.engine.lr_find")  # the package's `lr_find` is the function
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


def test_a_steepest_descent_next_to_the_minimum_is_capped_at_a_tenth_of_it():
    lrs = np.geomspace(1e-6, 1, 100)
    x = np.log10(lrs)
    cliff = (1 / (1 + np.exp(8 * (x + 1.2)))).tolist()  # steepest at 10**-1.2, bottoming out near 1e-1
    cliff = cliff[:90] + [cliff[89] + 0.5 * i for i in range(1, 11)]  # then it turns up (divergence)
    lr, how = suggest(lrs.tolist(), cliff, 100)
    low = lrs[int(np.argmin(cliff))]
    assert lr == pytest.approx(low / 10) and lr < 10**-1.2 and "a tenth" in how


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
    step = loop.train_step
    calls = []

    def scripted(run, idx, factor):
        loss, logits = step(run, idx, factor)
        calls.append(factor)
        return torch.tensor(script[len(calls) - 1]), logits

    monkeypatch.setattr(loop, "train_step", scripted)
    result = lr_find(config(problem), log=quiet)
    expected = smooth(script)
    stop = next(i for i, v in enumerate(expected) if v > 4 * min(expected[: i + 1]))
    assert result.stopped_early and len(result.lrs) == stop + 1 < 100
    assert result.smoothed == pytest.approx(expected[: stop + 1])


def test_it_stops_at_a_loss_that_is_not_finite(problem, monkeypatch):
    step = loop.train_step
    calls = []

    def diverging(run, idx, factor):
        loss, logits = step(run, idx, factor)
        calls.append(factor)
        return (loss * math.nan if len(calls) == 30 else loss), logits

    monkeypatch.setattr(loop, "train_step", diverging)
    result = lr_find(config(problem), log=quiet)
    assert result.stopped_early and len(result.lrs) == 29 and "nan" in result.stop
    assert all(math.isfinite(v) for v in result.losses + result.smoothed)


# ---------------------------------------------------------------------------- how it trains
def test_it_takes_the_training_step_on_training_images_only_at_growing_rates(problem, monkeypatch):
    step = loop.train_step
    seen = []

    def spy(run, idx, factor):
        seen.append((idx.clone(), factor, set(run.split.train.tolist())))
        return step(run, idx, factor)

    monkeypatch.setattr(loop, "train_step", spy)
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


def test_cli_without_a_descent_says_why_exits_1_and_still_writes_the_curve(problem, tmp_path, capsys):
    out = tmp_path / "lr"
    assert (
        main(lr_find_args(problem, "--out", str(out), "--start-lr", "1e-9", "--end-lr", "1e-8", "--steps", "20")) == 1
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no suggested lr: ") and "no descent to read" in lines[0]
    assert json.loads((out / "lr_find.json").read_text())["suggestion"] is None
    assert (out / "lr_find.png").is_file()


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


# ---------------------------------------------------------------------------- lr = "find" in a study
@pytest.mark.parametrize(
    "where",
    ['[run]\nlr = "fnd"', '[grid]\nlr = [0.01, "fnd"]', '[variants]\nv = { lr = "fnd" }\n[grid]\nvariant = ["v"]'],
)
def test_an_lr_neither_a_number_nor_find_is_one_line(tmp_path, where, capsys):
    path = tmp_path / "spec.toml"
    path.write_text(f"{where}\n")
    with pytest.raises(ConfigError, match=r'lr = \'fnd\': expected a number or "find"') as error:
        StudySpec.load(path)
    assert "\n" not in str(error.value)
    assert main(["study", "run", str(path), "--dir", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys.readouterr(), "'fnd'", '"find"')


def test_find_in_run_grid_or_variant_marks_those_points_only(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(
        'name = "s"\n[run]\nlr = "find"\n[variants]\nfixed = { lr = 0.05 }\nplain = {}\n'
        '[grid]\nvariant = ["fixed", "plain"]\nstrategy = ["frozen", "full"]\n'
    )
    spec = StudySpec.load(path)
    finds = {(p["variant"], p["strategy"]): spec.finds_lr(p) for p in spec.points()}
    assert finds == {("fixed", "frozen"): False, ("fixed", "full"): False, ("plain", "frozen"): True,
                     ("plain", "full"): True}  # fmt: skip
    assert spec.config_for({"variant": "fixed", "strategy": "full"}).lr == 0.05
    point = {"variant": "plain", "strategy": "full"}
    with pytest.raises(ConfigError, match="has not chosen its rate yet"):
        spec.config_for(point)  # never a placeholder lr where a rate was to be found
    spec.found_lr[spec.point_id(point)] = 0.0123
    assert spec.config_for(point).lr == 0.0123
    grid = StudySpec.from_dict({"grid": {"lr": ["find", 0.01]}})
    assert [grid.finds_lr(p) for p in grid.points()] == [True, False]
    with pytest.raises(ConfigError, match="given twice"):
        StudySpec.from_dict({"grid": {"lr": ["find", "find"]}})
    epochs = StudySpec.from_dict({"run": {"lr": "find"}, "grid": {"epochs": ["1", 2]}})
    epochs.found_lr.update({epochs.point_id(p): 0.5 for p in epochs.points()})
    assert epochs.config_for({"epochs": 1}).lr == 0.5  # a job's recorded point holds the epochs as a number


def test_study_finds_once_per_regime_trains_at_it_and_reuses_the_finding(problem, tmp_path, monkeypatch):
    tree, cache = problem
    calls = []
    real = worker_module.lr_find

    def counted(config, *args, **kwargs):
        calls.append(config.strategy)
        return real(config, *args, **kwargs)

    monkeypatch.setattr(worker_module, "lr_find", counted)
    spec = write_spec(tmp_path / "spec.toml", tree, cache, {"strategy": ["frozen", "full"], "epochs": [1, 2]},
                      lr="find", head="linear", batch_size=8)  # fmt: skip
    directory = run_study(spec, study_dir=tmp_path / "study")
    assert sorted(calls) == ["frozen", "full"]  # once per regime, whatever its epochs
    study = load_study(directory)
    found = {f["label"]: f["lr"] for f in study.user_attrs["lr_found"]}
    assert set(found) == {"strategy=frozen", "strategy=full"}
    for f in study.user_attrs["lr_found"]:
        assert study.user_attrs[f["key"]]["suggestion"] == f["lr"]
    trials = grid_trials(study)
    assert len(trials) == 4
    for t in trials:
        config = RunConfig.from_dict(t.config)
        assert config.lr == found[f"strategy={config.strategy}"]  # trained at the rate found for its regime
        data_key = json.loads((directory / t.run_dir / "metrics.json").read_text())["data"]
        point = t.point
        as_point = dataclasses.replace(config, epochs=point["epochs"], record_epochs=[])  # a derived trial's too
        assert t.identity == trial_identity(point, as_point, data_key)  # its identity holds that rate
        assert t.identity != trial_identity(point, dataclasses.replace(as_point, lr=1e-3), data_key)
    report = (directory / "report.md").read_text()
    table = report.split('## Learning rates found (lr = "find")')[1].split("\n## ")[0]
    for label, lr in found.items():
        assert f"| {label} | {lr:.3g} |" in table

    before = {t.number for t in study.get_trials(deepcopy=False)}
    run_study(spec, study_dir=tmp_path / "study", report=False)
    assert sorted(calls) == ["frozen", "full"]  # read from the storage: no test run again
    assert {t.number for t in load_study(directory).get_trials(deepcopy=False)} == before  # nothing trained again


def test_a_study_whose_curve_gives_no_rate_stops_in_one_line_before_queueing(problem, tmp_path, monkeypatch, capsys):
    tree, cache = problem
    monkeypatch.setattr(lr_find_module, "suggest", lambda lrs, smoothed, steps: (None, "no descent, as scripted"))
    spec = write_spec(tmp_path / "spec.toml", tree, cache, {"strategy": ["frozen"]}, lr="find", batch_size=8)
    assert main(["study", "run", str(spec), "--dir", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("transferlab: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err  # the study's log lines before it, then one error line
    for fragment in ('lr = "find" (strategy=frozen)', "no descent, as scripted", "set lr to a number"):
        assert fragment in errors[0]
    assert not load_study(tmp_path / "study").get_trials(deepcopy=False)  # nothing queued, nothing trained
