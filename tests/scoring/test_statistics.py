"""Replicates and the statistics that tell configurations apart.

The specification these tests hold:
- stats.wilson_interval(k, n) is the Wilson score 95% interval (the published values of Newcombe, 1998); it stays
  in [0, 1], is symmetric in k <-> n - k, and refuses counts that are not 0 <= k <= n, n >= 1.
- stats.decimals_for(half_width): the last digit printed is the largest power of ten no greater than a third of the
  95% half-width, between whole points and hundredths (3 points or more: whole; 0.3 to 3: one decimal; below: two).
  percent_with_interval prints "67.4% (95% CI 65.3-69.4)" for 1,348 of 2,000 and never more than two decimals.
- stats.paired_difference(a, b): the mean of the per-replicate differences with the half-width of its 95% t interval
  (t with n - 1 degrees of freedom: about 95% coverage, where a normal quantile would cover less); the verdict names
  the winner ("partial beats frozen by 6.1 ± 1.2 points"), says "no measurable difference" when the interval holds 0,
  and that one replicate cannot measure it.
- Folds (RunConfig folds, fold; data.make_split): the images left after the test split are cut into `folds`
  stratified folds shuffled with split_seed; fold `fold` is the validation split. The folds' validation sets are
  disjoint, cover every non-test image, keep the class proportions, and the test split is exactly the one without
  folds. fold is part of a trial's identity. A class with fewer images than folds, and folds with a labels file's
  own split column, are one-line errors.
- A study's `repeat = K` adds the replicate axis seed = base seed .. + K - 1, `folds = K` the axis fold = 0 .. K - 1
  (each trial with folds = K); a [grid] seed axis is a replicate axis too. Bad values (repeat 0 or not a whole
  number, folds = 1, fold >= folds, fold without folds, repeat with a [grid] seed, top-level folds with folds or fold
  in a table, repeat with a variant's seed) are one line, exit status 2 from the CLI.
- A study with replicates selects the configuration (grid point without seed / fold) of best mean validation
  metric, tests the checkpoint of its best replicate once, and its report shows mean ± std with n, the test accuracy
  with its Wilson interval, and the paired differences with their verdicts.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import assert_one_line_error, load_study, places, study_tree, tiny_config, write_spec

from transferlab.cli import main
from transferlab.config.run import RunConfig
from transferlab.config.study import StudySpec, point_key
from transferlab.data.imageset import ImageSet
from transferlab.data.split import make_split, split_for
from transferlab.errors import ConfigError, DataError
from transferlab.scoring.stats import (
    Difference,
    decimals_for,
    difference_verdict,
    format_difference,
    paired_difference,
    percent_with_interval,
    wilson_interval,
)
from transferlab.study.identity import trial_identity
from transferlab.study.records import StudyRecord, grid_trials
from transferlab.study.runner import run_study
from transferlab.study.select import best_configuration

T_975_2 = 4.302652729749464  # the 97.5% quantile of Student's t with 2 degrees of freedom (tables)


# ---------------------------------------------------------------------------- the Wilson interval
@pytest.mark.parametrize(
    "k, n, low, high",
    # Newcombe (1998), Statistics in Medicine 17:857-872, table I, method 3 (score interval without continuity)
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_interval_matches_published_values(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_is_inside_0_1_and_symmetric():
    for n in (1, 7, 2000):
        for k in {0, 1, n // 3, n - 1, n}:
            low, high = wilson_interval(k, n)
            assert 0.0 <= low <= k / n <= high <= 1.0 and high > low
            mirror = wilson_interval(n - k, n)
            assert (1 - mirror[1], 1 - mirror[0]) == pytest.approx((low, high), abs=1e-12)


@pytest.mark.parametrize("k, n", [(11, 10), (-1, 10), (1, 0), (1.5, 10), (True, 10)])
def test_wilson_interval_refuses_impossible_counts(k, n):
    with pytest.raises(ValueError, match="wilson_interval"):
        wilson_interval(k, n)


# ---------------------------------------------------------------------------- the precision rule
@pytest.mark.parametrize(
    "half_width, decimals",
    [(50.0, 0), (3.0, 0), (2.999, 1), (2.05, 1), (0.3, 1), (0.2999, 2), (0.01, 2), (0.0, 2)],
)
def test_decimals_follow_a_third_of_the_half_width(half_width, decimals):
    assert decimals_for(half_width) == decimals


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_decimals_refuse_a_negative_or_undefined_half_width(bad):
    with pytest.raises(ValueError):
        decimals_for(bad)


@pytest.mark.parametrize(
    "k, n, text",
    [
        (1348, 2000, "67.4% (95% CI 65.3-69.4)"),  # a 2,000-image test set: one decimal, not four
        (9, 10, "90% (95% CI 60-98)"),  # half-width of several points: whole points
        (45000, 50000, "90.00% (95% CI 89.73-90.26)"),  # 50,000 images: hundredths
        (0, 20, "0% (95% CI 0-16)"),
    ],
)
def test_percent_with_interval(k, n, text):
    assert percent_with_interval(k, n) == text


@pytest.mark.parametrize("n", [1, 10, 100, 2000, 10**6, 10**9])
def test_never_more_than_two_decimals(n):
    text = percent_with_interval(n // 3, n)
    assert re.fullmatch(r"\d+(\.\d{1,2})?% \(95% CI \d+(\.\d{1,2})?-\d+(\.\d{1,2})?\)", text), text


# ---------------------------------------------------------------------------- paired differences
def test_paired_difference_of_constructed_data():
    frozen = [60.0, 62.0, 61.0]
    partial = [f + 6.1 + e for f, e in zip(frozen, (-0.5, 0.0, 0.5))]  # differences 5.6, 6.1, 6.6: sd 0.5
    d = paired_difference(partial, frozen)
    assert d.n == 3 and d.mean == pytest.approx(6.1)
    assert d.half_width == pytest.approx(T_975_2 * 0.5 / math.sqrt(3))  # 1.242
    assert d.measurable and d.interval == pytest.approx((6.1 - 1.2420, 6.1 + 1.2420), abs=1e-4)
    assert difference_verdict("partial", "frozen", d) == "partial beats frozen by 6.1 ± 1.2 points"
    assert format_difference(d) == "+6.1 ± 1.2"
    # the other way round: the same verdict, the winner named first
    assert difference_verdict("frozen", "partial", paired_difference(frozen, partial)) == (
        "partial beats frozen by 6.1 ± 1.2 points"
    )


def test_an_interval_holding_zero_is_no_measurable_difference():
    d = paired_difference([70.0, 75.0, 71.0, 76.0], [72.0, 73.0, 73.0, 74.0])  # differences -2, 2, -2, 2
    assert d.mean == pytest.approx(0.0) and d.half_width > 0 and not d.measurable
    assert difference_verdict("full", "partial", d) == "no measurable difference"
    wide = paired_difference([65.0, 67.0, 66.0], [60.0, 60.0, 60.0])  # +5, +7, +6: mean 6 ± t(2) 4.30 x 1 / sqrt 3
    assert wide.half_width == pytest.approx(4.3027 / 3**0.5, abs=1e-4) and wide.measurable
    noisy = paired_difference([65.0, 67.0, 50.0], [60.0, 60.0, 60.0])  # +5, +7, -10
    assert not noisy.measurable and difference_verdict("a", "b", noisy) == "no measurable difference"
    assert format_difference(Difference(-0.2, 5.0, 3)) == "+0 ± 5"  # rounded to whole points: no "-0"


def test_two_replicates_state_no_interval():
    """Two seeds whose differences agree would claim "16.67 ± 0.00": a t interval from one degree of freedom. Below
    three replicates no interval is stated, and the verdict says why."""
    d = paired_difference([80.0, 90.0], [63.33, 73.33])
    assert d.n == 2 and d.half_width is None and not d.measurable
    assert format_difference(d) == "+16.7" and "±" not in format_difference(d)
    assert difference_verdict("a", "b", d).startswith("cannot be measured from 2 replicates")
    wide = paired_difference([65.0, 67.0], [60.0, 60.0])
    assert wide.half_width is None and "3 or more" in difference_verdict("a", "b", wide)


def test_one_replicate_cannot_measure_a_difference():
    d = paired_difference([70.0], [64.0])
    assert d == Difference(6.0, None, 1) and d.interval is None and not d.measurable
    assert "cannot be measured from one replicate" in difference_verdict("partial", "frozen", d)
    assert format_difference(d) == "+6.0"


def test_paired_difference_refuses_unpaired_values():
    with pytest.raises(ValueError, match="one of each"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no replicates"):
        paired_difference([], [])


def test_the_t_interval_covers_the_true_difference_95_times_in_100():
    """Simulated: 4,000 studies of 4 replicates, true difference 1.0. The t interval covers it about 95% of the time
    (a normal quantile, 1.96 instead of t(3) = 3.18, would cover about 86%)."""
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(4000):
        b = rng.normal(0.0, 1.0, 4)
        a = b + 1.0 + rng.normal(0.0, 0.7, 4)
        low, high = paired_difference(list(a), list(b)).interval
        covered += low <= 1.0 <= high
    assert 0.935 <= covered / 4000 <= 0.965, covered / 4000


# ---------------------------------------------------------------------------- folds
LABELS = np.asarray(([0] * 6 + [1] * 3 + [2]) * 10, dtype=np.int64)  # 60 / 30 / 10 images, interleaved


@pytest.mark.parametrize("limit", [None, 80])
def test_folds_are_disjoint_stratified_and_cover_the_non_test_images(limit):
    plain = make_split(LABELS, test_fraction=0.2, val_fraction=0.1, seed=3, limit=limit)
    folds = [make_split(LABELS, test_fraction=0.2, val_fraction=0.1, seed=3, limit=limit, folds=4, fold=f)
             for f in range(4)]  # fmt: skip
    rest = np.concatenate([plain.train, plain.val])
    for split in folds:
        np.testing.assert_array_equal(split.test, plain.test)  # the same test images, with or without folds
        assert len(np.intersect1d(split.train, split.val)) == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([split.train, split.val])), np.sort(rest))
        expected = np.bincount(LABELS[rest], minlength=3) / 4
        assert np.all(np.abs(np.bincount(LABELS[split.val], minlength=3) - expected) <= 1)
    vals = np.concatenate([s.val for s in folds])
    assert len(np.unique(vals)) == len(vals) == len(rest)  # each non-test image validates in exactly one fold


def test_folds_are_seeded_by_the_split_seed():
    a = make_split(LABELS, test_fraction=0.2, val_fraction=0.1, seed=3, folds=3, fold=1)
    b = make_split(LABELS, test_fraction=0.2, val_fraction=0.1, seed=3, folds=3, fold=1)
    c = make_split(LABELS, test_fraction=0.2, val_fraction=0.1, seed=4, folds=3, fold=1)
    np.testing.assert_array_equal(a.val, b.val)
    assert not np.array_equal(a.val, c.val)


def test_folds_with_the_official_test_split_cut_all_the_images():
    split = make_split(LABELS, test_fraction=0.2, val_fraction=0.1, seed=0, official_test=True, folds=5, fold=0)
    assert split.official_test and len(split.test) == 0 and (len(split.train), len(split.val)) == (80, 20)


def test_a_class_smaller_than_the_folds_is_one_line():
    with pytest.raises(DataError) as error:
        make_split(LABELS, test_fraction=0.2, val_fraction=0.1, seed=0, folds=9, classes=["a", "b", "c"])
    message = str(error.value)
    assert "\n" not in message and "class 'c' has 8 images" in message and "9 stratified folds" in message


def test_folds_with_a_given_split_column_are_refused(tmp_path):
    images = ImageSet(np.zeros((9, 4, 4, 3), np.uint8), np.arange(9) % 3, ["a", "b", "c"], "k",
                      given_split=np.asarray([0, 0, 0, 1, 1, 1, 2, 2, 2], np.int8))  # fmt: skip
    config = tiny_config(tmp_path / "x.csv", tmp_path, folds=3)
    with pytest.raises(DataError, match="folds 3: .* gives its own validation split .*--labels-split-column none"):
        split_for(images, config)


def test_fold_is_part_of_the_trial_identity(tmp_path):
    config = tiny_config(tmp_path, tmp_path, folds=3)
    identities = {trial_identity({"fold": f}, RunConfig.from_dict({"fold": f}, base=config), "d") for f in range(3)}
    assert len(identities) == 3
    # the same point name with a different fold in the config is a different trial too
    assert trial_identity({}, config, "d") != trial_identity({}, RunConfig.from_dict({"fold": 1}, base=config), "d")
    assert trial_identity({}, config, "d") != trial_identity({}, RunConfig.from_dict({"folds": 4}, base=config), "d")


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"folds": 1}, "folds = 1: cross-validation needs at least 2 folds"),
        ({"folds": 3, "fold": 3}, "fold = 3: with folds = 3 the folds are 0 .. 2"),
        ({"fold": 1}, "fold = 1 without folds"),
        ({"folds": 2.5}, "folds = 2.5: expected int"),
        ({"folds": -1}, "folds = -1: must be >= 0"),
    ],
)
def test_bad_fold_options_are_one_line(values, fragment):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict(values)
    assert "\n" not in str(error.value) and fragment in str(error.value)


# ---------------------------------------------------------------------------- repeat and folds in a study spec
GRID = {"strategy": ["frozen", "full"], "epochs": [1]}


def spec_tree(top=None, run=None, grid=None, variants=None) -> dict:
    tree = {"name": "s", "run": {"weights": "none", **(run or {})}, "grid": {**GRID, **(grid or {})}, **(top or {})}
    if variants is not None:
        tree["variants"] = variants
        tree["grid"]["variant"] = list(variants)
    return tree


def test_repeat_adds_a_seed_axis_from_the_base_seed():
    spec = StudySpec.from_dict(spec_tree({"repeat": 3}, run={"seed": 5}))
    assert spec.grid["seed"] == [5, 6, 7] and list(spec.grid)[-1] == "seed" and spec.replicates == ["seed"]
    assert len(spec.points()) == 6 and [p["seed"] for p in spec.points()[:3]] == [5, 6, 7]
    assert {spec.config_for(p).seed for p in spec.points()} == {5, 6, 7}
    assert StudySpec.from_dict(spec_tree({"repeat": 1})).grid == GRID  # 1: as without it
    assert StudySpec.from_dict(spec_tree(grid={"seed": [0, 4]})).replicates == ["seed"]  # a given seed axis


def test_folds_add_a_fold_axis_and_set_folds_in_every_trial():
    spec = StudySpec.from_dict(spec_tree({"folds": 3, "repeat": 2}))
    assert spec.grid["fold"] == [0, 1, 2] and spec.replicates == ["seed", "fold"] and len(spec.points()) == 12
    configs = [spec.config_for(p) for p in spec.points()]
    assert {(c.folds, c.fold) for c in configs} == {(3, 0), (3, 1), (3, 2)}
    assert len({point_key(p) for p in spec.points()}) == 12


@pytest.mark.parametrize(
    "tree, fragment",
    [
        (spec_tree({"repeat": 0}), "repeat = 0: expected 1 or more"),
        (spec_tree({"repeat": 2.5}), "repeat = 2.5: expected a whole number"),
        (spec_tree({"repeat": "3"}), "repeat = '3': expected a whole number"),
        (spec_tree({"repeat": True}), "repeat = True: expected a whole number"),
        (spec_tree({"folds": 1}), "folds = 1: cross-validation needs 2 or more folds"),
        (spec_tree({"folds": -3}), "folds = -3"),
        (spec_tree({"repeat": 2}, grid={"seed": [0, 1]}), "give the seeds one way"),
        (spec_tree({"folds": 3}, run={"folds": 3}), "leave folds and fold out of [run]"),
        (spec_tree({"folds": 3}, grid={"fold": [0, 1]}), "leave folds and fold out of [run]"),
        (spec_tree({"repeat": 2}, variants={"a": {"seed": 3}, "b": {}}), "leave seed out of [variants]"),
        (spec_tree({"repeat": 3}, run={"seed": 2**32 - 2}), "seed = 4294967296: must be <= 4294967295"),
        (spec_tree(run={"folds": 2}, grid={"fold": [0, 2]}), "fold = 2: with folds = 2 the folds are 0 .. 1"),
    ],
)
def test_bad_replicate_options_are_one_line(tree, fragment):
    with pytest.raises(ConfigError) as error:
        StudySpec.from_dict(tree)
    assert "\n" not in str(error.value) and fragment in str(error.value)


@pytest.mark.parametrize("override", ["repeat=0", "folds=1", "repeat=1.5", "run.fold=2"])
def test_bad_replicate_options_exit_2_from_the_cli(tmp_path, capsys, override):
    spec = write_spec(tmp_path / "s.toml", tmp_path / "images", tmp_path / "cache", GRID)
    assert main(["study", "run", str(spec), "--dir", str(tmp_path / "out"), "--set", override]) == 2
    assert_one_line_error(capsys.readouterr(), override.split("=")[0].split(".")[-1])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- a study with replicates
@pytest.fixture(scope="module")
def repeated(tmp_path_factory):
    """Two regimes x two seeds, one epoch each, on the synthetic tree."""
    root = tmp_path_factory.mktemp("repeated")
    spec_path = write_spec(
        root / "repeated.toml", study_tree(root / "images"), root / "cache",
        {"strategy": ["frozen", "full"], "epochs": [1]}, name="repeated", top={"repeat": 2},
        head="linear", lr=0.01, batch_size=8,
    )  # fmt: skip
    return StudySpec.load(spec_path), run_study(spec_path, study_dir=root / "out", report=True)


def fake_trial(number: int, value: float, **point):
    return SimpleNamespace(number=number, value=value, point=point, best={}, history=[])


@pytest.mark.parametrize("metric", ["val_accuracy", "val_loss"])
def test_best_configuration_is_the_best_mean_not_the_best_single_trial(metric):
    """a: 0.9 and 0.5 (mean 0.7, the best trial alone); b: 0.8 and 0.8 (mean 0.8). By accuracy b is chosen, and its
    lower-numbered replicate on the tie; by loss (lower is better) a, and its replicate of 0.5."""
    spec = SimpleNamespace(metric=metric, replicates=["seed"])
    trials = [fake_trial(0, 0.9, strategy="a", seed=0), fake_trial(1, 0.5, strategy="a", seed=1),
              fake_trial(2, 0.8, strategy="b", seed=0), fake_trial(3, 0.8, strategy="b", seed=1)]  # fmt: skip
    tested, replicates, tie = best_configuration(trials, spec)
    assert tie is None
    if metric == "val_accuracy":
        assert tested.number == 2 and [t.number for t in replicates] == [2, 3]
    else:
        assert tested.number == 1 and [t.number for t in replicates] == [0, 1]
    # without replicate axes every trial is its own configuration: the best trial
    tested, replicates, tie = best_configuration(trials, SimpleNamespace(metric=metric, replicates=[]))
    assert tested.number == (0 if metric == "val_accuracy" else 1) and replicates == [tested] and tie is None


def test_selection_is_the_best_mean_configuration_and_its_best_replicate(repeated):
    spec, directory = repeated
    study = load_study(directory)
    trials = grid_trials(study)
    assert len(trials) == 4 and sorted(t.point["seed"] for t in trials) == [0, 0, 1, 1]
    means: dict[str, list] = {}
    for t in sorted(trials, key=lambda t: t.number):
        means.setdefault(t.point["strategy"], []).append(t)

    # the argmax of the per-configuration means, recomputed from the storage (ties: the lower mean validation loss)
    def loss(trials):
        return statistics.fmean(t.best["val_loss"] for t in trials)

    winner = max(means, key=lambda s: (statistics.fmean(t.value for t in means[s]), -loss(means[s])))
    best_mean = statistics.fmean(t.value for t in means[winner])
    (record,) = StudyRecord.of(study).test_evaluations
    chosen = means[winner]
    tested = max(chosen, key=lambda t: (t.value, -t.best["val_loss"], -t.number))
    assert record["trial"] == tested.number and record["point"]["strategy"] == winner
    conf = record["configuration"]
    assert conf["key"] == point_key({"strategy": winner, "epochs": 1}) and conf["replicate_axes"] == ["seed"]
    assert sorted(conf["trials"]) == sorted(t.number for t in chosen)
    assert conf["mean"] == pytest.approx(best_mean)


def test_the_report_shows_mean_std_n_intervals_and_paired_differences(repeated):
    spec, directory = repeated
    study = load_study(directory)
    text = (directory / "report.md").read_text()
    record = StudyRecord.of(study).selected
    k, n = round(record["test_accuracy"] * record["n_test"]), record["n_test"]
    shown = percent_with_interval(k, n)
    assert f"test accuracy {shown} on {n} test images" in text  # the summary
    assert f"| test accuracy | {shown} |" in text  # the selection table
    assert f"configuration {record['configuration']['key']}" in text
    assert "its replicate of best val_accuracy" in text
    by_strategy: dict[str, list] = {}
    for t in grid_trials(study):
        by_strategy.setdefault(t.point["strategy"], []).append(t)
    configurations = text.split("## Configurations: mean over replicates")[1].split("\n## ")[0]
    assert "2 replicates (seed 0, 1)" in configurations
    assert "seeds on one fixed split" in configurations  # what the spread covers
    for strategy, ts in by_strategy.items():
        values = [t.best["val_accuracy"] for t in ts]
        d = places(values, min(t.n_val for t in ts), values)
        cell = f"{100 * statistics.mean(values):.{d}f} ± {100 * statistics.stdev(values):.{d}f}%"
        assert re.search(rf"\| {strategy} \| 1 \| 2 \| {re.escape(cell)} \|", configurations), (cell, configurations)
    paired = text.split("## Paired differences")[1].split("\n## ")[0]
    assert "95% t interval" in paired and "contains 0" in paired
    full = {t.point["seed"]: 100 * t.best["val_accuracy"] for t in by_strategy["full"]}
    frozen = {t.point["seed"]: 100 * t.best["val_accuracy"] for t in by_strategy["frozen"]}
    d = paired_difference([full[s] for s in (0, 1)], [frozen[s] for s in (0, 1)])
    verdict = difference_verdict("full", "frozen", d)
    row = f"| strategy | epochs = 1 | full - frozen | 2 | {format_difference(d)} | {verdict} |"
    assert row in paired, paired
    summary = text.split("## Summary")[1].split("\n## ")[0]
    assert ", n = 2" in summary and "the mean ± std over 2 replicates (seed 0, 1)" in summary


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    root = tmp_path_factory.mktemp("folded")
    spec_path = write_spec(
        root / "folded.toml", study_tree(root / "images"), root / "cache", {"strategy": ["frozen"], "epochs": [1]},
        name="folded", top={"folds": 3}, head="linear", lr=0.01, batch_size=8,
    )  # fmt: skip
    return run_study(spec_path, study_dir=root / "out", report=True)


def test_a_folded_study_validates_on_each_fold_and_tests_on_one_split(folded):
    study = load_study(folded)
    trials = sorted(grid_trials(study), key=lambda t: t.point["fold"])
    assert [t.point["fold"] for t in trials] == [0, 1, 2]
    splits = [json.loads((folded / t.run_dir / "split.json").read_text()) for t in trials]
    assert all(s["test"] == splits[0]["test"] for s in splits)
    vals = [i for s in splits for i in s["val"]]
    assert len(vals) == len(set(vals)) == len(splits[0]["train"]) + len(splits[0]["val"])
    record = StudyRecord.of(study).selected
    assert record["configuration"]["replicate_axes"] == ["fold"] and len(record["configuration"]["trials"]) == 3
    assert "3 replicates (fold 0, 1, 2)" in (folded / "report.md").read_text()
