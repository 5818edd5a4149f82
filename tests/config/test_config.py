"""RunConfig / StudySpec: every key validated, one-line errors that name the key."""

from __future__ import annotations

import pytest
from helpers import assert_one_line_error, train_args

from transferlab.cli import main
from transferlab.config.run import RunConfig
from transferlab.config.study import StudySpec
from transferlab.config.toml import parse_override
from transferlab.errors import ConfigError
from transferlab.models.registry import resolve


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


def test_defaults_are_valid():
    config = RunConfig()
    config.validate()
    assert config.strategy == "frozen" and config.resolution is None and config.arch == "squeezenet1_1"
    assert resolve(config).resolution == 224 and resolve(config).dropout == 0.5  # photos: the pretrained side


def test_unknown_key_is_one_line_with_suggestion():
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({"epochz": 3})
    text = one_line(error)
    assert "'epochz'" in text and "did you mean 'epochs'" in text


def test_unknown_key_with_dashes_is_suggested_too():
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({"batch-sise": 3})
    assert "did you mean 'batch_size'" in one_line(error)


def test_dashed_keys_are_accepted():
    assert RunConfig.from_dict({"batch-size": 16}).batch_size == 16


def test_bad_choice_lists_the_choices():
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({"strategy": "half"})
    text = one_line(error)
    assert "strategy" in text and "frozen" in text and "partial" in text and "full" in text


@pytest.mark.parametrize(
    "key, value, bound",
    [
        ("epochs", 0, ">= 1"),
        ("resolution", 4, ">= 8"),
        ("resolution", 4096, "<= 1024"),
        ("dropout", 1.0, "<= 0.99"),
        ("lr", -1.0, ">= 0.0"),
        ("limit", 5, ">= 10"),
    ],
)
def test_out_of_range(key, value, bound):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({key: value})
    text = one_line(error)
    assert key in text and bound in text


def test_fractions_that_leave_nothing_to_train_on():
    with pytest.raises(ConfigError, match="too little to train on"):
        RunConfig.from_dict({"test_fraction": 0.5, "val_fraction": 0.5})


@pytest.mark.parametrize(
    "key, value", [("epochs", "three"), ("epochs", 2.5), ("epochs", True), ("lr", "fast"), ("flip", "maybe")]
)
def test_wrong_type(key, value):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({key: value})
    assert key in one_line(error)


def test_record_epochs_must_be_positive_integers():
    assert RunConfig.from_dict({"record_epochs": "1, 2 3"}).record_epochs == [1, 2, 3]
    with pytest.raises(ConfigError, match="record_epochs"):
        RunConfig.from_dict({"record_epochs": [0]})


def test_strings_from_the_command_line_are_coerced():
    config = RunConfig.from_dict({"epochs": "3", "lr": "0.01", "flip": "yes", "limit": "none", "data_dir": "null"})
    assert (config.epochs, config.lr, config.flip, config.limit, config.data_dir) == (3, 0.01, True, None, None)


def test_base_config_is_kept_and_overridden():
    base = RunConfig.from_dict({"epochs": 5, "lr": 0.1})
    config = RunConfig.from_dict({"lr": 0.2}, base=base)
    assert (config.epochs, config.lr) == (5, 0.2)
    assert base.lr == 0.1


def test_where_prefixes_the_message():
    with pytest.raises(ConfigError, match=r"^spec.toml: unknown key"):
        RunConfig.from_dict({"nope": 1}, where="spec.toml: ")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("epochs=3", ("epochs", 3)),
        ("lr=1e-3", ("lr", 0.001)),
        ("lr=0.5", ("lr", 0.5)),
        ("flip=true", ("flip", True)),
        ("flip=false", ("flip", False)),
        ("strategy=partial", ("strategy", "partial")),  # not TOML: kept as a string
        ('strategy="full"', ("strategy", "full")),
        ("data=/tmp/a b=c", ("data", "/tmp/a b=c")),  # split on the first '='
        ("record_epochs=[1, 2]", ("record_epochs", [1, 2])),
        (" epochs =4", ("epochs", 4)),
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


def test_parse_override_needs_an_equals_sign():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("epochs")


def test_override_values_feed_from_dict():
    config = RunConfig.from_dict(dict(parse_override(t) for t in ("epochs=3", "lr=0.5", "flip=true", "strategy=full")))
    assert (config.epochs, config.lr, config.flip, config.strategy) == (3, 0.5, True, "full")


# ---------------------------------------------------------------------------- studies
def test_study_spec_from_dict():
    spec = StudySpec.from_dict(
        {"name": "s", "run": {"epochs": 2}, "grid": {"strategy": ["frozen", "full"], "lr": [0.1, 0.01]}}
    )
    assert spec.base.epochs == 2 and spec.metric == "val_accuracy"
    points = spec.points()
    assert len(points) == 4 and {"strategy": "frozen", "lr": 0.1} in points
    assert spec.config_for(points[0]).epochs == 2


def test_study_grid_scalar_becomes_one_value_axis():
    spec = StudySpec.from_dict({"grid": {"epochs": 3}})
    assert spec.grid == {"epochs": [3]}


def test_study_grid_unknown_axis():
    with pytest.raises(ConfigError) as error:
        StudySpec.from_dict({"grid": {"stratgy": ["frozen"]}})
    text = one_line(error)
    assert "[grid]" in text and "did you mean 'strategy'" in text


def test_study_grid_bad_value():
    with pytest.raises(ConfigError) as error:
        StudySpec.from_dict({"grid": {"strategy": ["frozen", "sideways"]}})
    text = one_line(error)
    assert "[grid]" in text and "sideways" in text


def test_study_grid_out_of_range_value():
    with pytest.raises(ConfigError, match=r"\[grid\] epochs = 0"):
        StudySpec.from_dict({"grid": {"epochs": [1, 0]}})


def test_study_grid_empty_axis():
    with pytest.raises(ConfigError, match="empty list"):
        StudySpec.from_dict({"grid": {"epochs": []}})


def test_study_unknown_top_level_key_and_bad_run_key():
    with pytest.raises(ConfigError, match="did you mean 'grid'"):
        StudySpec.from_dict({"gird": {}})
    with pytest.raises(ConfigError, match=r"\[run\] unknown key 'epoch'"):
        StudySpec.from_dict({"run": {"epoch": 1}})


def test_study_metric_is_checked():
    with pytest.raises(ConfigError, match="metric"):
        StudySpec.from_dict({"metric": "accuracy"})


def test_feature_shift_needs_frozen_groups():
    assert RunConfig.from_dict({"strategy": "partial", "feature_shift": 1}).feature_shift == 1
    with pytest.raises(ConfigError, match="feature_shift = 1: strategy 'full' freezes nothing"):
        RunConfig.from_dict({"strategy": "full", "feature_shift": 1})


@pytest.mark.parametrize("sets, fragment", [(["weights="], "weights may not be empty"), (["data= "], "data")])
def test_empty_strings_are_not_the_current_folder(sets, fragment, image_tree, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = train_args(image_tree, tmp_path / "run", tmp_path / "cache")
    for text in sets:
        args += ["--set", text]
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), fragment, "may not be empty")
    assert not (tmp_path / "run" / "best.pt").exists()


def test_record_epochs_are_not_booleans(image_tree, tmp_path, capsys):
    args = train_args(image_tree, tmp_path / "run", tmp_path / "cache") + ["--set", "record_epochs=[true]"]
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), "record_epochs")


@pytest.mark.parametrize(
    "flag, value", [("--seed", "99999999999999999999999"), ("--seed", "-1"), ("--split-seed", "4294967295")]
)
def test_seeds_out_of_range_are_config_errors(flag, value, image_tree, tmp_path, capsys):
    assert main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", flag, value)) == 2
    assert_one_line_error(capsys.readouterr(), flag[2:].replace("-", "_") + " = ")
