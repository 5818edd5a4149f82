"""Backbone x regime studies: each run's cost recorded, and an accuracy-vs-cost section in the report.

The specification, as tests on synthetic data (3 classes x 12 coloured-noise PNGs, 32 px, 1 epoch, CPU):
  * a study over arch = [squeezenet1_1, resnet18] x strategy = [frozen, full] (no pretrained weights) runs end to
    end; every trial records its run's cost (user attr "cost"): parameters (all and trainable), FLOPs of one
    forward pass of one image at the run's resolution, training and inference images per second, the device
    and batch of the inference timing; FLOPs are positive and resnet18's exceed squeezenet1_1's; a frozen run
    trains fewer parameters than a full run of the same backbone; derived trials reuse their run's record;
  * the report has a "Backbones" section: one row per backbone x regime whose numbers equal the storage's
    (its best trial's), a sentence naming the most accurate one, and the accuracy-vs-cost figure;
  * `pareto_front` keeps exactly the points no other point dominates (cheaper or equal and at least as accurate);
  * a single-backbone study has no Backbones section;
  * studies/backbones.toml is a backbone x regime grid at 64 px;
  * measuring a cost leaves the global random state as it was (the study's seeds are unaffected).
"""

from __future__ import annotations

import re

import pytest
from helpers import load_study, section, study_tree, tables_in, write_spec

from transferlab.report.load import load_study_data
from transferlab.report.tables import backbone_points, pareto_front
from transferlab.scoring.stats import percent, percent_with_interval
from transferlab.study.records import StudyRecord, grid_trials
from transferlab.study.runner import run_study

ARCHS = ["squeezenet1_1", "resnet18"]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    tree = study_tree(root / "images")
    spec_path = write_spec(
        root / "backbones.toml",
        tree,
        root / "cache",
        {"arch": ARCHS, "strategy": ["frozen", "full"], "epochs": [1, 2]},
        name="backbones",
        head="linear",
        lr=0.01,
        batch_size=8,
    )
    directory = run_study(spec_path, study_dir=root / "out", report=True)
    return directory, (directory / "report.md").read_text()


def _costs(directory, epochs: int = 2) -> dict[tuple[str, str], dict]:
    """(arch, strategy) -> its trial of `epochs` epochs (2: the runs; 1: trials derived from them)."""
    trials = [t for t in grid_trials(load_study(directory)) if t.point["epochs"] == epochs]
    return {(t.point["arch"], t.point["strategy"]): t for t in trials}


def _best(directory) -> dict[tuple[str, str], object]:
    """(arch, strategy) -> its trial of best validation accuracy (lowest number on a tie), as the report picks."""
    out = {}
    for t in sorted(grid_trials(load_study(directory)), key=lambda t: t.number):
        key = (t.point["arch"], t.point["strategy"])
        if key not in out or t.best["val_accuracy"] > out[key].best["val_accuracy"]:
            out[key] = t
    return out


def test_each_trial_records_its_runs_cost(backbones):
    directory, _ = backbones
    trials = _costs(directory)
    assert set(trials) == {(a, s) for a in ARCHS for s in ("frozen", "full")}
    for (arch, strategy), t in trials.items():
        cost = t.cost
        assert cost["arch"] == arch and cost["strategy"] == strategy and cost["resolution"] == 32
        assert cost["flops"] > 0 and cost["params"] >= cost["trainable_params"] > 0
        assert cost["train_images_per_second"] > 0 and cost["inference_images_per_second"] > 0
        assert cost["inference_device"] == "cpu" and cost["inference_batch"] == 64
        n_train, history = cost["n_train"], t.history
        expected = n_train * len(history) / sum(r["seconds"] for r in history)
        assert cost["train_images_per_second"] == pytest.approx(expected)
    for strategy in ("frozen", "full"):  # the same resolution: the larger network costs more
        assert trials[("resnet18", strategy)].cost["flops"] > trials[("squeezenet1_1", strategy)].cost["flops"]
    for arch in ARCHS:
        frozen, full = (trials[(arch, s)].cost for s in ("frozen", "full"))
        assert frozen["trainable_params"] < full["trainable_params"] == full["params"] == frozen["params"]
        assert frozen["flops"] == full["flops"]  # the forward pass does not depend on what trains
    derived = _costs(directory, epochs=1)
    for key, t in derived.items():  # measured once per run: a derived trial holds its run's record
        assert t.kind == "derived" and t.cost == trials[key].cost


def test_report_backbones_table_equals_the_storage(backbones):
    directory, text = backbones
    part = section(text, "Backbones")
    ((_, rows),) = tables_in(part)
    header, body = rows[0], rows[1:]
    assert [(r[0], r[1]) for r in body] == [(a, s) for a in sorted(ARCHS) for s in ("frozen", "full")]
    trials = _best(directory)
    col = {name: i for i, name in enumerate(header)}
    for row in body:
        t = trials[(row[0], row[1])]
        cost = t.cost
        assert row[col["trial"]] == str(t.number)
        assert int(row[col["parameters"]].replace(",", "")) == cost["params"]
        assert int(row[col["trainable parameters"]].replace(",", "")) == cost["trainable_params"]
        assert float(row[col["GFLOPs/image"]]) == pytest.approx(cost["flops"] / 1e9, rel=1e-3)
        for name, key in (
            ("training img/s", "train_images_per_second"),
            ("inference img/s", "inference_images_per_second"),
        ):
            assert float(row[col[name]].replace(",", "")) == pytest.approx(cost[key], abs=0.051)
        n = t.n_val  # at the precision its validation images allow
        assert row[col["best val accuracy"]] == percent(round(t.best["val_accuracy"] * n), n)
    selected = StudyRecord.of(load_study(directory)).selected
    tested = [r for r in body if r[col["test accuracy (selected)"]]]
    assert len(tested) == 1
    assert (
        tested[0][col["test accuracy (selected)"]]
        == f"{percent_with_interval(round(selected['test_accuracy'] * selected['n_test']), selected['n_test'])} "
        f"(trial {selected['trial']})"
    )
    assert "Accuracy against cost" in part or "against GFLOPs/image" in part
    assert re.search(r"!\[Best validation accuracy against GFLOPs/image[^\]]*\]\(report_files/figure\d+\.png\)", part)
    best = max(body, key=lambda r: (float(r[col["best val accuracy"]].rstrip("%")), -int(r[col["trial"]])))
    assert f"On this study's data, {best[0]} in regime {best[1]} is the most accurate" in part
    html = (directory / "report.html").read_text()
    assert "<h2>Backbones</h2>" in html and "against GFLOPs/image" in html


def test_backbone_points_are_each_backbone_and_regimes_best_trial(backbones):
    directory, _ = backbones
    data = load_study_data(directory)
    points = backbone_points(data)
    assert len(points) == 4
    for p in points:
        mine = [t for t in data.trials if t.point["arch"] == p.arch and t.point["strategy"] == p.regime]
        assert p.accuracy == max(t.best["val_accuracy"] for t in mine)
        assert p.cost == p.trial.cost


def test_pareto_front_keeps_the_undominated_points_by_cost():
    points = [
        (1.0, 0.60, "a"),  # cheapest: on the front
        (2.0, 0.55, "b"),  # dominated by a (dearer, less accurate)
        (2.0, 0.70, "c"),  # on the front
        (3.0, 0.70, "d"),  # dominated by c (same accuracy, dearer)
        (5.0, 0.90, "e"),  # most accurate: on the front
        (1.0, 0.50, "f"),  # dominated by a (same cost, less accurate)
    ]
    assert [p[2] for p in pareto_front(points)] == ["a", "c", "e"]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 0.5)]) == [(1.0, 0.5)]
    assert pareto_front([(2.0, 0.5), (2.0, 0.5)]) == [(2.0, 0.5), (2.0, 0.5)]  # equal points: neither dominates


def test_single_backbone_study_has_no_backbones_section(tmp_path):
    tree = study_tree(tmp_path / "images")
    spec_path = write_spec(
        tmp_path / "one.toml", tree, tmp_path / "cache", {"strategy": ["frozen"], "epochs": [1]}, name="one",
        head="linear", batch_size=8,
    )  # fmt: skip
    directory = run_study(spec_path, study_dir=tmp_path / "out", report=True)
    text = (directory / "report.md").read_text()
    assert "## Backbones" not in text and "## Results per regime" in text
    (t,) = grid_trials(load_study(directory))
    assert t.cost["flops"] > 0  # the cost is recorded all the same


def test_bundled_backbones_spec_is_a_backbone_by_regime_grid():
    from helpers import REPO_ROOT

    from transferlab.config.study import StudySpec

    spec = StudySpec.load(REPO_ROOT / "studies" / "backbones.toml", ["weights=none"])
    assert len(spec.grid["arch"]) >= 2 and spec.grid["strategy"] == ["frozen", "partial", "full"]
    assert {spec.config_for(p).resolution for p in spec.points()} == {64}


def test_measuring_a_cost_leaves_the_random_state_as_it_was():
    import torch

    from transferlab.config.run import RunConfig
    from transferlab.inference.cost import measure_cost

    config = RunConfig.from_dict({"arch": "squeezenet1_1", "strategy": "partial", "resolution": 32, "device": "cpu"})
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    cost = measure_cost(config, 3, 10, [{"seconds": 2.0}, {"seconds": 3.0}])
    assert torch.equal(torch.rand(3), expected)
    assert cost["train_images_per_second"] == pytest.approx(10 * 2 / 5.0)
    assert 0 < cost["trainable_params"] < cost["params"] and cost["flops"] > 0
