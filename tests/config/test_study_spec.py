"""Study specs refuse, in one line (exit 2, nothing created), what could not work or would be silently ignored.

- A spec whose `run`, `grid` or `variants` is not a table, whose `name` is not a plain non-empty name, or whose
  `storage` is not a URL string is refused; so is a `train --config` key beside its [run] table.
- Grid values are compared as the trial sees them: a value given twice (1 and 1.0, 0.1 and "0.1") is one line naming
  the axis and the value; an axis spelt twice is refused.
- Settings given in two places, one of which would silently win, are refused: a variant key or [run] key beside a
  [grid] axis, `--set KEY=...` beside a grid axis, variant or searched option; the refusal suggests a fix that works.
- `metric` is set once, at the top of a spec.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from helpers import (
    assert_one_line_error,
    study_tree,
    train_args,
    write_spec,
)

from transferlab.cli import main
from transferlab.config.study import StudySpec
from transferlab.errors import ConfigError

SMALL = {"strategy": ["frozen"], "batch_size": [8], "epochs": [1]}


@pytest.fixture
def tree(tmp_path) -> Path:
    return study_tree(tmp_path / "images")


GRID_SPEC = """name = "s"
[run]
data = "cifar10"
{run}
[grid]
epochs = [1, 2]
{grid}
{variants}
"""


# ---------------------------------------------------------------------------- 4. a grid value given twice
@pytest.mark.parametrize("values, shown", [([0.001, 0.001], "0.001"), ([1, 1.0], "1.0"), (["a", "b", "a"], "'a'")])
def test_a_grid_value_given_twice_is_one_line_naming_axis_and_value(tmp_path, values, shown):
    axis = "seed" if values == [1, 1.0] else "lr" if isinstance(values[0], float) else "variant"
    spec = write_spec(tmp_path / "s.toml", tmp_path, tmp_path, {**SMALL, axis: values})
    if axis == "variant":
        spec.write_text(spec.read_text() + "\n[variants]\na = {lr = 0.1}\nb = {lr = 0.2}\n")
    with pytest.raises(ConfigError) as error:
        StudySpec.load(spec)
    message = str(error.value)
    assert "\n" not in message and f"[grid] {axis}" in message and shown in message and "twice" in message


# ---------------------------------------------------------------------------- 6. no test split
@pytest.mark.parametrize("table", ["run", "grid"])
def test_metric_is_set_once_at_the_top_of_a_spec(tree, tmp_path, table):
    text = f'name = "s"\n[{table}]\nmetric = ' + ('["val_loss"]' if table == "grid" else '"val_loss"') + "\n"
    (tmp_path / "s.toml").write_text(text)
    with pytest.raises(ConfigError, match="set it once at the top level"):
        StudySpec.load(tmp_path / "s.toml")


@pytest.mark.parametrize(
    "sets, fragment",
    [
        (["run=1"], "run = 1: expected a table"),
        (["grid=3"], "grid = 3: expected a table"),
        (["variants=5"], "variants = 5: expected a table"),
        (["name=3"], "name = 3"),
        (["name="], "name = ''"),
        (["name=.."], "name = '..'"),
        (['name="a/b"'], "name = 'a/b'"),
        (["storage=5"], "storage = 5: expected a storage URL"),
        (['grid.lr=[0.1, "0.1"]'], "lr: value '0.1' is given twice"),
        (["grid.batch-size=[4]", "grid.batch_size=[2]"], "the axis 'batch_size' is given twice"),
        (["data="], "data may not be empty"),
    ],
)
def test_bad_spec_values_are_one_line(sets, fragment, one_point_spec, tmp_path, capsys):
    study_dir = tmp_path / "study"
    args = ["study", "run", str(one_point_spec), "--dir", str(study_dir), "--no-report"]
    for text in sets:
        args += ["--set", text]
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), fragment)
    assert not study_dir.exists()


def test_top_level_non_tables_in_the_file(tmp_path):
    for text in ("variants = 5\n", "run = 1\n", 'storage = ""\n'):
        with pytest.raises(ConfigError):
            StudySpec.from_dict(tomllib.loads(text + "[grid]\nepochs = [1]\n"))


@pytest.mark.parametrize(
    "text, fragment",
    [("epochs = 5\n[run]\nlr = 0.1\n", "key 'epochs' outside the [run] table"), ("run = 3\n", "run, which is not")],
)
def test_train_config_keys_beside_run_are_not_ignored(text, fragment, image_tree, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(text)
    assert main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--config", str(toml))) == 2
    assert_one_line_error(capsys.readouterr(), fragment)


# ---------------------------------------------------------------------------- settings silently ignored
@pytest.mark.parametrize(
    "run, grid, variants, fragment",
    [
        ("epochs = 3", "", "", "[run] epochs and the [grid] axis epochs"),
        ("", 'variant = ["z"]', "[variants]\nz = { epochs = 3 }", "[variants.z] epochs and the [grid] axis epochs"),
    ],
)
def test_a_setting_the_grid_overrides_is_refused(run, grid, variants, fragment, tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(GRID_SPEC.format(run=run, grid=grid, variants=variants))
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        StudySpec.load(path)


@pytest.mark.parametrize(
    "grid, variants, override, setter",
    [
        ("lr = [0.1, 0.2]", "", "lr=0.5", "the [grid] axis lr"),
        ('variant = ["a"]', "[variants]\na = { lr = 0.1 }", "lr=0.5", "[variants.a]"),
    ],
)
def test_set_beside_what_overrides_it_is_refused_in_one_line(grid, variants, override, setter, tmp_path, capsys):
    path = tmp_path / "spec.toml"
    path.write_text(GRID_SPEC.format(run="", grid=grid, variants=variants))
    assert main(["study", "run", str(path), "--dir", str(tmp_path / "out"), "--set", override]) == 2
    assert_one_line_error(capsys.readouterr(), f"--set {override}", setter, "ignored")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- found by a hostile tester
@pytest.mark.parametrize(
    "extra, override, fix",
    [
        ('variant = ["a"]', "[variants]\na = { lr = 0.1 }", "--set variants.a.lr=..."),
        ("", "[search]\nn_trials = 1\n[search.space]\nlr = [0.1, 0.2]", "--set search.space.lr=..."),
    ],
)
def test_set_refusals_suggest_a_fix_that_works(extra, override, fix, tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(GRID_SPEC.format(run="", grid=extra, variants=override))
    with pytest.raises(ConfigError, match=re.escape(fix)):
        StudySpec.load(path, ["lr=0.5"])
