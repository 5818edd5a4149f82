"""What a careless or hostile user's input gets: a one-line error before any work, or the right numbers.

The spec these tests hold:
- A study spec whose `run`, `grid` or `variants` is not a table (in the file or through `--set run=1`), whose `name`
  is not a plain non-empty name (a number, "", "..", a path), or whose `storage` is not a URL string is refused in
  one line (exit 2, no traceback), and nothing is created.
- Grid values are compared as the trial sees them: `lr = [0.1, "0.1"]` is one value given twice, and an axis spelt
  twice (`batch-size` and `batch_size`) is refused; otherwise one grid point could never be complete.
- An empty string is no value: `--set data=` or `--set weights=` is refused rather than read as the current folder.
- record_epochs holds positive integers, not booleans (`[true]` is not epoch 1).
- `study worker` joins a study `study run` created: with none in the storage (or no storage) it is one line and
  creates nothing (no study.db, no empty study).
- A --cache-dir inside the data folder is refused like such an --out, before it is created: an empty "cache"
  folder there would be read as a class without images and break every later run on that data.
- evaluate on the folder a run trained on: --skip-bad-images defaults to the run's own setting (so it is the run's data
  and the default is its test split); when the folder's content differs from the run's, a split (the default or
  named) is refused in one line rather than scoring images it trained on; --split all still works, with the note.
- `train --config FILE`: run options sit in a [run] table or at the top level, not both: a key beside [run] would be
  silently ignored, so it is refused in one line.
- A --resolution the backbone cannot take (SqueezeNet 1.1 below 17 px: its pooling runs out of pixels) is refused in
  one line before any data is read, not a PyTorch traceback mid-run; in a study grid, before any trial is queued.
- Seeds are 0 .. 2**32 - 1 (split_seed one less: validation uses split_seed + 1): a larger one is a config error, not
  an overflow traceback from torch or a split error from scikit-learn.
- A storage password typed with a raw "@" (user:p@ss@host) would be parsed as a shorter password and a host or
  database holding its tail, which every error shows: it is refused in one line, all of it up to the last "@" hidden.
- A pickle that is not ours fails in exactly one stderr line: torch's own warnings about it are not printed.
- A float image (mode "F", e.g. a 32-bit TIFF) holding 0..1 decodes to its grey levels, not to black.
"""

from __future__ import annotations

import json
import pickle
import shutil
import tomllib
import warnings

import numpy as np
import optuna
import pytest
from helpers import make_image_tree
from PIL import Image
from test_cli import assert_one_line_error, train_args

from transferlab.cli import main
from transferlab.config.study import StudySpec
from transferlab.data.decode import decode_image
from transferlab.errors import ConfigError
from transferlab.models.registry import min_resolution
from transferlab.urls import redact

SPEC = """name = "s"
[run]
data = "{data}"
weights = "none"
resolution = 32
progress = false
cache_dir = "{cache}"
device = "cpu"
test_fraction = 0.2
val_fraction = 0.2
batch_size = 8
[grid]
epochs = [1]
"""


@pytest.fixture
def spec_file(image_tree, tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(SPEC.format(data=image_tree, cache=tmp_path / "cache"))
    return path


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
def test_bad_spec_values_are_one_line(sets, fragment, spec_file, tmp_path, capsys):
    study_dir = tmp_path / "study"
    args = ["study", "run", str(spec_file), "--dir", str(study_dir), "--no-report"]
    for text in sets:
        args += ["--set", text]
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), fragment)
    assert not study_dir.exists()


def test_top_level_non_tables_in_the_file(tmp_path):
    for text in ("variants = 5\n", "run = 1\n", 'storage = ""\n'):
        with pytest.raises(ConfigError):
            StudySpec.from_dict(tomllib.loads(text + "[grid]\nepochs = [1]\n"))


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


def test_a_foreign_pickle_is_exactly_one_line(image_tree, tmp_path, capsys):
    path = tmp_path / "foreign.pt"
    with open(path, "wb") as handle:
        pickle.dump({"a": 1}, handle, protocol=4)
    with warnings.catch_warnings(record=True) as shown:  # what would reach stderr beside the error line
        warnings.simplefilter("always")
        assert main(["evaluate", str(path), "--data", str(image_tree)]) == 2
    assert [str(w.message) for w in shown] == []
    assert_one_line_error(capsys.readouterr(), "foreign.pt", "not loaded for safety")


def test_float_images_are_scaled(tmp_path):
    path = tmp_path / "half.tif"
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(path)
    assert Image.open(path).mode == "F"
    assert int(decode_image(path).max()) == 128
    path = tmp_path / "levels.tif"
    Image.fromarray(np.full((8, 8), 200.0, dtype=np.float32)).save(path)
    assert int(decode_image(path).max()) == 200


def test_a_worker_joins_only_an_existing_study(spec_file, tmp_path, capsys):
    study_dir = tmp_path / "study"
    assert main(["study", "worker", str(spec_file), "--dir", str(study_dir)]) == 2
    assert_one_line_error(capsys.readouterr(), "no study storage")
    assert not study_dir.exists()
    storage = tmp_path / "other.db"
    url = f"sqlite:///{storage}"
    optuna.create_study(study_name="another", storage=url)
    assert main(["study", "worker", str(spec_file), "--dir", str(study_dir), "--storage", url]) == 2
    assert_one_line_error(capsys.readouterr(), "no study 's'", "study run")
    assert optuna.get_all_study_names(url) == ["another"]


def test_a_cache_inside_the_data_folder_is_refused_before_it_is_created(tmp_path, capsys):
    data = make_image_tree(tmp_path / "data", per_class=12, size=16)
    assert main(train_args(data, tmp_path / "run", data / "cache")) == 2
    assert_one_line_error(capsys.readouterr(), "--cache-dir", "inside the data folder")
    assert sorted(p.name for p in data.iterdir()) == ["blue", "green", "red"]


def test_evaluate_knows_the_runs_own_folder(tmp_path, capsys):
    data = make_image_tree(tmp_path / "data", per_class=12, size=16)
    (data / "red" / "broken.png").write_bytes(b"garbage")
    out, cache = tmp_path / "run", tmp_path / "cache"
    with pytest.warns(UserWarning, match="skipped 1"):
        assert main(train_args(data, out, cache, "--skip-bad-images")) == 0
    n_test = json.loads((out / "metrics.json").read_text())["n_test"]
    best = str(out / "best.pt")
    capsys.readouterr()
    assert main(["evaluate", best, "--data", str(data), "--json", "--device", "cpu"]) == 0  # the run's setting
    result = json.loads(capsys.readouterr().out)
    assert (result["split"], result["n"]) == ("test", n_test)
    (data / "red" / "broken.png").unlink()  # a skipped file gone: the same images, so the same split
    assert main(["evaluate", best, "--data", str(data), "--json", "--device", "cpu"]) == 0
    assert (json.loads(capsys.readouterr().out)["n"]) == n_test
    shutil.copy(data / "red" / "000.png", data / "red" / "0005.png")  # a new image shifts the rows: the split is off
    for extra in ([], ["--split", "test"]):
        assert main(["evaluate", best, "--data", str(data), "--json", "--device", "cpu", *extra]) == 2
        assert_one_line_error(capsys.readouterr(), "the folder the run trained on", "--split all")
    assert main(["evaluate", best, "--data", str(data), "--json", "--device", "cpu", "--split", "all"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 37 and "includes the images it was trained on" in captured.err


@pytest.mark.parametrize(
    "text, fragment",
    [("epochs = 5\n[run]\nlr = 0.1\n", "key 'epochs' outside the [run] table"), ("run = 3\n", "run, which is not")],
)
def test_train_config_keys_beside_run_are_not_ignored(text, fragment, image_tree, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(text)
    assert main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--config", str(toml))) == 2
    assert_one_line_error(capsys.readouterr(), fragment)


def test_a_resolution_the_backbone_cannot_take_is_one_line(image_tree, tmp_path, capsys):
    args = train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--resolution", "8")
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), "resolution = 8", "squeezenet1_1", "at least 17 px")
    assert not (tmp_path / "cache").exists()
    assert min_resolution("resnet18") == 8


@pytest.mark.parametrize(
    "flag, value", [("--seed", "99999999999999999999999"), ("--seed", "-1"), ("--split-seed", "4294967295")]
)
def test_seeds_out_of_range_are_config_errors(flag, value, image_tree, tmp_path, capsys):
    assert main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", flag, value)) == 2
    assert_one_line_error(capsys.readouterr(), flag[2:].replace("-", "_") + " = ")


def test_a_grid_resolution_the_backbone_cannot_take_is_refused_before_training(spec_file, tmp_path, capsys):
    study_dir = tmp_path / "study"
    spec_file.write_text(spec_file.read_text().replace("resolution = 32\n", ""))  # the grid axis sets it alone
    args = ["study", "run", str(spec_file), "--dir", str(study_dir), "--set", "grid.resolution=[32, 8]"]
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), "resolution = 8", "at least 17 px")
    assert not (study_dir / "trials").exists()


@pytest.mark.parametrize("password", ["Zq9@tail", "Zq9@ta/il"])
def test_a_raw_at_in_a_storage_password_shows_no_part_of_it(password, spec_file, tmp_path, capsys):
    url = f"postgresql+psycopg2://someone:{password}@127.0.0.1:1/db"
    study_dir = tmp_path / "study"
    assert main(["study", "run", str(spec_file), "--dir", str(study_dir), "--storage", url]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured, "someone:***@127.0.0.1:1/db", "URL-quote it")
    assert "Zq9" not in captured.err and "tail" not in captured.err and "ta/il" not in captured.err
    assert not study_dir.exists()
    assert redact(url) == "postgresql+psycopg2://someone:***@127.0.0.1:1/db"
