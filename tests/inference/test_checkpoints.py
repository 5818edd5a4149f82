"""Checkpoint and weights files that are not what they should be are one line each.

Empty, text, random bytes, truncated, a directory, a pickle that is not ours (torch's own warnings about it are not
printed), a checkpoint edited to nonsense or holding an impossible value: one stderr line naming the file, exit 2,
never advice to load with weights_only=False. A checkpoint of the previous format still evaluates.
"""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from helpers import (
    assert_one_line_error,
    train_args,
)

from transferlab.cli import main
from transferlab.data.sources import load_image_folder
from transferlab.inference.predict import load_checkpoint


# ---------------------------------------------------------------------------- bad files
@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "empty (0 bytes)"),
        (b"hello\n", "not a file written by torch.save"),
        (bytes(range(256)) * 20, "not a file written by torch.save"),
        (None, "truncated"),
        ("dir", "a directory"),
    ],
    ids=["empty", "text", "random", "truncated", "directory"],
)
def test_bad_checkpoint_and_weights_files(content, fragment, trained_run, image_tree, tmp_path, capsys):
    path = tmp_path / "file.pt"
    if content == "dir":
        path.mkdir()
    elif content is None:
        path.write_bytes((trained_run.out_dir / "best.pt").read_bytes()[:3000])
    else:
        path.write_bytes(content)
    assert main(["evaluate", str(path), "--data", str(image_tree), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured, fragment)
    assert "weights_only" not in captured.err
    assert main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--weights", str(path))) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured, fragment)
    assert "weights_only" not in captured.err


def test_a_checkpoint_of_the_previous_format_still_evaluates(trained_run, image_tree, tmp_path):
    from transferlab.inference.evaluate import evaluate_checkpoint

    old = torch.load(trained_run.out_dir / "best.pt", weights_only=True)
    old["format"] = "transferlab-checkpoint-1"
    for key in ("cut", "feature_dtype", "autocast", "metric", "val_loss", "data", "label_smoothing"):
        del old[key]
    torch.save(old, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt", "cpu")
    assert loaded.feature_dtype is None and loaded.info["metric"] == "val_accuracy"

    data = load_image_folder(image_tree, tmp_path / "cache", progress=False)
    assert evaluate_checkpoint(tmp_path / "old.pt", data, device="cpu")["n"] == len(data)
    del old["resolution"]
    torch.save(old, tmp_path / "broken.pt")
    with pytest.raises(Exception, match="not a complete transferlab checkpoint"):
        load_checkpoint(tmp_path / "broken.pt", "cpu")


def test_a_foreign_pickle_is_exactly_one_line(image_tree, tmp_path, capsys):
    path = tmp_path / "foreign.pt"
    with open(path, "wb") as handle:
        pickle.dump({"a": 1}, handle, protocol=4)
    with warnings.catch_warnings(record=True) as shown:  # what would reach stderr beside the error line
        warnings.simplefilter("always")
        assert main(["evaluate", str(path), "--data", str(image_tree)]) == 2
    assert [str(w.message) for w in shown] == []
    assert_one_line_error(capsys.readouterr(), "foreign.pt", "not loaded for safety")


# ---------------------------------------------------------------------------- tracebacks
@pytest.mark.parametrize("field, value", [("resolution", -32), ("resolution", 0), ("cut", -1), ("stored_side", 0)])
def test_a_checkpoint_with_an_impossible_value_is_one_line(field, value, trained_run, image_tree, tmp_path, capsys):
    raw = torch.load(trained_run.out_dir / "best.pt", weights_only=True)
    raw[field] = value
    torch.save(raw, tmp_path / "bad.pt")
    for args in (["predict", str(tmp_path / "bad.pt"), str(image_tree / "red")],
                 ["evaluate", str(tmp_path / "bad.pt"), "--data", str(image_tree)],
                 ["export", str(tmp_path / "bad.pt"), "--format", "onnx", "-o", str(tmp_path / "m.onnx")]):  # fmt: skip
        assert main(args) == 2
        assert_one_line_error(capsys.readouterr(), field, str(value))


# ---------------------------------------------------------------------------- found by a hostile tester
@pytest.mark.parametrize(
    "field, value",
    [
        ("resolution", 10**9),
        ("stored_side", 10**9),
        ("feature_dtype", "float8"),
        ("autocast", "x"),
        ("dropout", float("nan")),
        ("mean", [0.5, 0.5, float("nan")]),
        ("temperature", 1e-300),
        ("temperature", 1e300),
        ("classes", ["blue", "blue", "red"]),
        ("tta_flip", "yes"),
    ],  # fmt: skip
)
def test_a_checkpoint_edited_to_nonsense_is_refused(field, value, trained_run, image_tree, tmp_path, capsys):
    raw = torch.load(trained_run.out_dir / "best.pt", weights_only=True)
    raw[field] = value
    torch.save(raw, tmp_path / "bad.pt")
    for args in (["predict", str(tmp_path / "bad.pt"), str(image_tree / "red")],
                 ["export", str(tmp_path / "bad.pt"), "--format", "onnx", "-o", str(tmp_path / "m.onnx")]):  # fmt: skip
        assert main(args) == 2
        assert_one_line_error(capsys.readouterr(), field)
