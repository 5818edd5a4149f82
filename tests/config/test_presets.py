"""Presets: a whole recipe in one flag, every option still the user's.

- `--preset fast | fine-tune | best` fills the options its recipe names (config/presets.py) that the run leaves unset
  where the preset is given: flags, a --config file or a spec's [run]; anything given there wins.
- The run is identified by the values it resolves to: a preset and the same options spelt out are one run.
- An unknown preset is one line (exit 2); a preset in [grid] or [variants], where it would silently override [run],
  is refused in one line.
"""

from __future__ import annotations

import json

import pytest
from helpers import assert_one_line_error, quiet, tiny_config, train_args

from transferlab.cli import _run_config, build_parser, main
from transferlab.config.identity import fingerprint, identity
from transferlab.config.presets import PRESETS
from transferlab.config.run import RunConfig
from transferlab.config.study import StudySpec
from transferlab.engine.train import run_training
from transferlab.errors import ConfigError
from transferlab.study.identity import trial_identity


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_sets_its_recipe_and_what_is_given_beside_it_wins(name):
    config = RunConfig.from_dict({"data": "photos", "preset": name})
    assert {k: getattr(config, k) for k in PRESETS[name]} == PRESETS[name]
    assert config.resolution is None  # left to the backbone: its pretrained input size
    mine = RunConfig.from_dict({"data": "photos", "preset": name, "epochs": 3, "batch_size": 16})
    assert (mine.epochs, mine.batch_size, mine.strategy) == (3, 16, PRESETS[name]["strategy"])


def test_the_recipes_differ_where_they_should():
    regimes = {name: recipe["strategy"] for name, recipe in PRESETS.items()}
    assert regimes == {"fast": "frozen", "fine-tune": "partial", "best": "full"}
    assert PRESETS["fine-tune"]["gradual_unfreeze"] == 1 and PRESETS["fine-tune"]["lr_group_decay"] < 1


def test_flags_and_a_config_file_beside_a_preset_win(tmp_path):
    common = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    config = _run_config(build_parser().parse_args(common + ["--preset", "best", "--epochs", "2", "--lr", "0.01"]))
    assert (config.strategy, config.epochs, config.lr) == ("full", 2, 0.01)
    toml = tmp_path / "run.toml"
    toml.write_text('[run]\npreset = "fine-tune"\nepochs = 4\n')
    config = _run_config(build_parser().parse_args(common + ["--config", str(toml), "--batch-size", "8"]))
    assert (config.strategy, config.epochs, config.batch_size, config.lr_group_decay) == ("partial", 4, 8, 0.8)


def test_a_preset_and_its_options_spelt_out_are_one_run():
    preset = RunConfig.from_dict({"data": "photos", "preset": "fast"})
    spelt = RunConfig.from_dict({"data": "photos", **PRESETS["fast"]})
    assert identity(preset) == identity(spelt)


def test_a_preset_and_its_options_spelt_out_are_one_run_folder_and_one_trial(image_tree, tmp_path):
    given = {"epochs": 1, "batch_size": 8}  # beside the preset, they win
    preset = tiny_config(image_tree, tmp_path / "cache", preset="fast", **given)
    spelt = tiny_config(image_tree, tmp_path / "cache", **{**PRESETS["fast"], **given})
    assert preset.preset == "fast" and spelt.preset is None
    recorded = ("result", "record")  # what a run folder's identity holds
    assert "preset" not in identity(preset, roles=recorded)  # a name of the options, not an option
    assert fingerprint(identity(preset, roles=recorded)) == fingerprint(identity(spelt, roles=recorded))
    assert trial_identity({}, preset, "data") == trial_identity({}, spelt, "data")
    out = tmp_path / "run"
    first = run_training(preset, out, log=quiet)
    recorded = json.loads((out / "metrics.json").read_text())["identity"]
    assert "preset" not in recorded["config"]
    messages = []
    again = run_training(spelt, out, log=messages.append)  # the same run: found finished, not refused
    assert any("already finished" in m for m in messages), messages
    assert again.history == first.history
    assert json.loads((out / "config.json").read_text())["preset"] == "fast"  # still recorded with the run


def test_an_unknown_preset_is_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="preset = 'finetune': expected one of fast, fine-tune, best"):
        RunConfig.from_dict({"preset": "finetune"})
    with pytest.raises(SystemExit) as stop:
        main(train_args(tmp_path, tmp_path / "run", tmp_path / "cache", "--preset", "finetune"))
    assert stop.value.code == 2
    assert_one_line_error(capsys.readouterr(), "--preset", "'finetune'")


@pytest.mark.parametrize("value, toml", [(["fast"], '["fast"]'), ({"a": 1}, "{a = 1}"), (True, "true")])
def test_a_preset_that_is_no_name_is_one_line(value, toml, tmp_path, capsys):
    with pytest.raises(ConfigError, match="preset = .*: expected one of fast, fine-tune, best") as error:
        RunConfig.from_dict({"preset": value})
    assert "\n" not in str(error.value)
    config = tmp_path / "run.toml"
    config.write_text(f"[run]\npreset = {toml}\n")
    assert main(train_args(tmp_path, tmp_path / "run", tmp_path / "cache", "--config", str(config))) == 2
    assert_one_line_error(capsys.readouterr(), "preset = ", "expected one of fast, fine-tune, best")
    with pytest.raises(ConfigError, match="preset = .*: expected one of fast, fine-tune, best"):
        StudySpec.from_dict({"run": {"weights": "none", "preset": value}})  # a study's [run]


@pytest.mark.parametrize(
    "tree, fragment",
    [
        ({"grid": {"preset": ["fast", "best"]}}, "[grid] preset: a preset goes in [run]"),
        ({"variants": {"a": {"preset": "best"}}, "grid": {"variant": ["a"]}}, "[variants.a] preset"),
    ],
)
def test_a_preset_in_the_grid_or_a_variant_is_refused(tree, fragment):
    with pytest.raises(ConfigError) as error:
        StudySpec.from_dict({"run": {"weights": "none"}, **tree})
    assert fragment in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_run_with_each_preset_trains_and_records_it(name, image_tree, tmp_path, capsys):
    args = train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--preset", name, "--epochs", "2")
    assert main(args) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["preset"] == name and config["strategy"] == PRESETS[name]["strategy"] and config["head"] == "mlp"
    assert (config["epochs"], config["batch_size"]) == (2, 8)  # given beside it (train_args sets batch size 8)
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2]
