"""Study variants: named bundles of run options, picked by the grid axis `variant` (ablations, per-regime recipes).

* every variant is validated like [run]; an undefined variant named in the grid is one line naming it;
* a grid point's config is [run], then its variant, then its other axes;
* the report of a study with variants has a table: variants x regimes, best validation accuracy.
"""

from __future__ import annotations

import re

import pytest
from helpers import load_study, study_tree, write_spec

from transferlab.config.study import StudySpec
from transferlab.errors import ConfigError
from transferlab.report.load import load_study_data
from transferlab.scoring.stats import percent
from transferlab.study.records import grid_trials
from transferlab.study.runner import run_study

VARIANTS = "\n[variants]\nplain = {}\nflipped = { flip = true, lr = 0.01 }\n"


def spec_with_variants(tmp_path, variants=VARIANTS, grid=None):
    tree = study_tree(tmp_path / "data")
    path = write_spec(
        tmp_path / "spec.toml",
        tree,
        tmp_path / "cache",
        grid or {"strategy": ["frozen", "full"], "variant": ["plain", "flipped"]},
        epochs=1,
        batch_size=8,
    )
    path.write_text(path.read_text() + variants)
    return path


def test_point_config_applies_run_then_variant_then_axes(tmp_path):
    spec = StudySpec.load(spec_with_variants(tmp_path))
    assert len(spec.points()) == 4
    config = spec.config_for({"strategy": "full", "variant": "flipped"})
    assert (config.strategy, config.flip, config.lr, config.batch_size) == ("full", True, 0.01, 8)
    assert spec.config_for({"strategy": "frozen", "variant": "plain"}).flip is False


def test_undefined_variant_is_one_line_naming_it(tmp_path):
    path = spec_with_variants(tmp_path, grid={"variant": ["plain", "fliped"]})
    with pytest.raises(ConfigError) as error:
        StudySpec.load(path)
    assert "'fliped'" in str(error.value) and "did you mean 'flipped'" in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_key_inside_a_variant_is_one_line_naming_it(tmp_path):
    path = spec_with_variants(tmp_path, variants="\n[variants]\nplain = {}\nflipped = { flipp = true }\n")
    with pytest.raises(ConfigError, match=r"\[variants.flipped\] unknown key 'flipp'"):
        StudySpec.load(path)


def test_variants_without_a_variant_axis_are_rejected(tmp_path):
    path = spec_with_variants(tmp_path, grid={"strategy": ["frozen"]})
    with pytest.raises(ConfigError, match="no 'variant' axis"):
        StudySpec.load(path)


def test_study_with_variants_runs_and_reports_the_variant_table(tmp_path):
    directory = run_study(spec_with_variants(tmp_path), study_dir=tmp_path / "study")
    study = load_study(directory)
    trials = grid_trials(study)
    assert sorted(t.key for t in trials) == sorted(
        f"strategy={s},variant={v}" for s in ("frozen", "full") for v in ("plain", "flipped")
    )
    for t in trials:  # the variant's options reached the trained run
        assert t.config["flip"] is (t.point["variant"] == "flipped")
    data = load_study_data(directory)
    report = (directory / "report.md").read_text()
    table = report.split("## Variants: best validation accuracy per regime")[1].split("##")[0]
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| variant")
    }
    for t in data.trials:
        column = ["frozen", "full"].index(t.point["strategy"])
        n = t.n_val  # at the precision its validation images allow
        assert rows[t.point["variant"]][column] == percent(round(t.best["val_accuracy"] * n), n)
    assert re.search(r"\| plain \| [0-9.]+% \| [0-9.]+% \|", table)
