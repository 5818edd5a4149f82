"""`predict` at scale: files, folders and patterns; csv / json / text output, to stdout or a file; batches.

- Arguments: a file is taken as given; a folder gives its images at any depth (image extensions only, hidden names
  skipped, as data folders are read); an argument with * ? [ that is not a path is a glob (** recursive). Each file is
  predicted once however often it is named.
- An argument that names nothing (a missing path, a pattern matching no image) is one error line for that argument;
  the rest is still predicted and the exit status is 1, as for an unreadable file.
- --format text (default: "file: class p, ..." per readable file), csv (file,class,probability, then
  top2_class,top2_probability,... up to --top, capped at the number of classes, and an error column), json (a list
  of {file, top} or {file, error}); --json is --format json. --output FILE writes there atomically instead of
  stdout; an existing folder or a missing parent folder is refused (exit 2) before anything is predicted.
- Images of one decoded shape go through the model together, with the same probabilities as one at a time.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from helpers import (
    CLASS_COLOURS,
    assert_one_line_error,
    noise_image,
)
from PIL import Image

from transferlab.cli import main
from transferlab.inference import predict as predict_module
from transferlab.inference.predict import expand_inputs, predict_files


@pytest.fixture
def photos(tmp_path):
    """photos/ with nested images of two sizes, a non-square one, and files that are not to be predicted."""
    rng = np.random.default_rng(5)
    root = tmp_path / "photos"
    for rel, size in (("a/1.png", 24), ("a/b/2.jpg", 24), ("3.png", (20, 30)), ("c/4.PNG", 24), ("5.png", 24)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise_image(CLASS_COLOURS["red"], size, rng)).save(root / rel)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes((root / "5.png").read_bytes())
    (root / ".git").mkdir()
    (root / ".git" / "x.png").write_bytes((root / "5.png").read_bytes())
    return root


def predict(trained_run, *args):
    return main(["predict", str(trained_run.out_dir / "best.pt"), *map(str, args), "--device", "cpu"])


def read_csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


IMAGES = ["3.png", "5.png", "a/1.png", "a/b/2.jpg", "c/4.PNG"]


# ---------------------------------------------------------------------------- inputs
def test_a_folder_gives_its_images_at_any_depth(photos):
    paths, errors = expand_inputs([str(photos), str(photos / "5.png")])
    assert paths == [str(photos / name) for name in IMAGES] and errors == []  # 5.png once


def test_a_pattern_is_expanded_recursively(photos, trained_run, capsys):
    paths, errors = expand_inputs([str(photos / "**" / "*.png"), str(photos / "*.txt")])
    assert paths == [str(photos / name) for name in ("3.png", "5.png", "a/1.png")]  # glob matches case-sensitively
    assert errors == [{"file": str(photos / "*.txt"), "error": f"no image file or folder matches {photos / '*.txt'}"}]
    assert predict(trained_run, photos / "a" / "*", "--format", "json") == 0
    assert [r["file"] for r in json.loads(capsys.readouterr().out)] == [
        str(photos / f) for f in ("a/1.png", "a/b/2.jpg")
    ]


def test_missing_paths_and_corrupt_files_are_error_rows(photos, tmp_path, trained_run, capsys):
    (photos / "broken.png").write_bytes(b"garbage")
    (tmp_path / "empty").mkdir()
    args = [photos / "5.png", tmp_path / "absent.jpg", photos / "broken.png", tmp_path / "empty", photos / "a"]
    assert predict(trained_run, *args, "--format", "csv") == 1
    captured = capsys.readouterr()
    rows = read_csv(captured.out)
    assert [r["file"] for r in rows] == [
        str(photos / "5.png"),
        str(photos / "broken.png"),
        str(photos / "a/1.png"),
        str(photos / "a/b/2.jpg"),
        str(tmp_path / "absent.jpg"),
        str(tmp_path / "empty"),
    ]
    errors = {r["file"]: r["error"] for r in rows if r["error"]}
    assert "cannot decode image" in errors[str(photos / "broken.png")]
    assert errors[str(tmp_path / "absent.jpg")] == f"{tmp_path / 'absent.jpg'} does not exist"
    assert "holds no images" in errors[str(tmp_path / "empty")]
    assert all(r["class"] == "" for r in rows if r["error"]) and all(r["class"] for r in rows if not r["error"])
    lines = captured.err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("transferlab: error: ") for line in lines)
    assert "Traceback" not in captured.err


# ---------------------------------------------------------------------------- formats
def test_csv_and_json_parse_back_and_agree(photos, trained_run, capsys):
    assert predict(trained_run, photos, "--format", "csv", "--top", "2") == 0
    rows = read_csv(capsys.readouterr().out)
    assert list(rows[0]) == ["file", "class", "probability", "top2_class", "top2_probability", "tie", "error"]
    assert predict(trained_run, photos, "--json", "--top", "2") == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in rows] == [r["file"] for r in results] == [str(photos / f) for f in IMAGES]
    for row, result in zip(rows, results):
        assert [row["class"], row["top2_class"]] == [t["class"] for t in result["top"]]
        assert float(row["probability"]) == result["top"][0]["probability"] >= float(row["top2_probability"])
    assert predict(trained_run, photos, "--top", "1") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(photos / f) for f in IMAGES]
    assert [line.split(": ")[1].split()[0] for line in lines] == [r["class"] for r in rows]


def test_top_bigger_than_the_classes(photos, trained_run, capsys):
    assert predict(trained_run, photos / "5.png", "--format", "csv", "--top", "10") == 0
    (row,) = read_csv(capsys.readouterr().out)
    assert list(row) == ["file", "class", "probability", "top2_class", "top2_probability", "top3_class",
                         "top3_probability", "tie", "error"]  # fmt: skip
    assert sorted([row["class"], row["top2_class"], row["top3_class"]]) == ["blue", "green", "red"]
    assert sum(float(row[k]) for k in ("probability", "top2_probability", "top3_probability")) == pytest.approx(1)


def test_output_file(photos, tmp_path, trained_run, capsys):
    out = tmp_path / "predictions.csv"
    assert predict(trained_run, photos, "--format", "csv", "--output", out) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert [r["file"] for r in read_csv(out.read_text())] == [str(photos / f) for f in IMAGES]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    for target, fragment in ((tmp_path, "is a folder"), (tmp_path / "nowhere" / "p.csv", "does not exist")):
        assert predict(trained_run, photos, "--output", target) == 2
        assert_one_line_error(capsys.readouterr(), "--output", fragment)
    assert not (tmp_path / "nowhere").exists()


# ---------------------------------------------------------------------------- batches
def test_images_of_one_shape_are_predicted_together(photos, trained_run, monkeypatch):
    files = [str(photos / f) for f in IMAGES]
    alone = [predict_files(trained_run.out_dir / "best.pt", [f], device="cpu")[0] for f in files]
    calls = []
    original = predict_module.LoadedModel.probabilities

    def counted(self, images, *args, **kwargs):
        calls.append(len(images))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(predict_module.LoadedModel, "probabilities", counted)
    together = predict_files(trained_run.out_dir / "best.pt", files, device="cpu", progress=True)
    # every file is stored at the run's side (24 px), the 20x30 image's 20 px square enlarged, as training would have
    # stored it: one batch
    assert calls == [5]
    for a, b in zip(alone, together):
        assert a["file"] == b["file"] and [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert [t["probability"] for t in a["top"]] == pytest.approx([t["probability"] for t in b["top"]], abs=1e-5)


# ---------------------------------------------------------------------------- bad files
@pytest.mark.parametrize("top", ["0", "-2"])
def test_predict_top_must_be_positive(top, trained_run, image_tree, capsys):
    image = next((image_tree / "red").iterdir())
    assert main(["predict", str(trained_run.out_dir / "best.pt"), str(image), "--top", top, "--device", "cpu"]) == 2
    assert_one_line_error(capsys.readouterr(), f"--top {top}")


def test_predict_reports_a_bad_file_and_predicts_the_good_ones(trained_run, image_tree, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    good = next((image_tree / "red").iterdir())
    assert main(["predict", str(trained_run.out_dir / "best.pt"), str(bad), str(good), "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(str(good) + ": ")
    assert_one_line_error(captured, "bad.jpg")


# ---------------------------------------------------------------------------- ties
def test_predict_flags_classes_it_cannot_tell_apart(trained_run, image_tree, tmp_path, capsys):
    raw = torch.load(trained_run.out_dir / "best.pt", weights_only=True)
    for key in [k for k in raw["model"] if k.startswith("fc.") or k.startswith("classifier.")]:
        raw["model"][key] = torch.zeros_like(raw["model"][key])  # every class scores the same
    torch.save(raw, tmp_path / "flat.pt")
    image = str(next((image_tree / "red").iterdir()))
    (result,) = predict_files(tmp_path / "flat.pt", [image], top=1, device="cpu")
    assert sorted(result["tie"]) == ["blue", "green", "red"]
    assert main(["predict", str(tmp_path / "flat.pt"), image]) == 0
    assert "(a tie: " in capsys.readouterr().out
    (result,) = predict_files(trained_run.out_dir / "best.pt", [image], top=1, device="cpu")
    assert "tie" not in result
