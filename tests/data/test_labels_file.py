"""Labels from a file: `--labels FILE.csv` as a data source beside image folders and CIFAR-10.

- A CSV or TSV (by extension, else sniffed) with a header row; the path and label columns are named by
  --labels-path-column (default `path`) and --labels-label-column (default `label`). Paths are relative to the file's
  folder; absolute paths work too. Class names are the sorted unique labels.
- With a split column (--labels-split-column, default `split` when the file has one; `none` ignores it) the run's
  split.json follows it exactly: every value train/val/test, at least one train and one val row, test may be empty
  (then "no test split"). --limit with a given split is refused (subsampling would no longer be the user's split),
  and so is --folds (the file gives the validation split).
- --labels and a non-default --data together are refused: one data source per run.
- The decode cache is keyed by the file's content and each image's size and modification time: editing either
  decodes again. --skip-bad-images skips (and counts) unreadable or missing images, keeping the given split aligned.
- Every bad input (missing image, empty label, one image under two labels or in two parts of the split, missing
  column, empty file, bad split value, ...) is one line naming the file and the row (header = row 1), exit status 2,
  and no output folder. One image named twice (another spelling of its path, a link) with the same label and part is
  counted once, with a warning saying how many were dropped.
- `evaluate --labels FILE` scores a checkpoint on a labelled set, classes matched by name.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

import pytest
from helpers import assert_one_line_error, train_args

from transferlab.cli import main
from transferlab.data.decode import decode_image
from transferlab.data.sources import load_labels_file
from transferlab.errors import DataError

PARTS = ("train",) * 5 + ("val",) * 2 + ("test",)  # per class, 8 images each


def write_table(path: Path, header, rows, delimiter=",") -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def labelled(make_tree):
    """A tree of 3 classes x 8 images and rows (relative path, label, split) for a CSV beside it."""
    root = make_tree("images", per_class=8, size=16)
    rows = [
        (f"images/{name}/{i:03d}.png", name, PARTS[i]) for name in ("red", "green", "blue") for i in range(len(PARTS))
    ]
    return root.parent, rows


def labels_args(csv_path, out, cache, *extra):
    args = train_args("cifar10", out, cache, *extra)
    at = args.index("--data")
    args[at : at + 2] = ["--labels", str(csv_path)]
    return args


def load(path, cache_dir, **kwargs):
    return load_labels_file(path, cache_dir, progress=False, **kwargs)


# ---------------------------------------------------------------------------- the source
def test_a_labelled_run_follows_the_split_column_exactly(labelled, tmp_path, capsys):
    folder, rows = labelled
    table = write_table(folder / "labels.csv", ["path", "label", "split"], rows)
    out = tmp_path / "run"
    assert main(labels_args(table, out, tmp_path / "cache")) == 0
    assert "best epoch 1" in capsys.readouterr().out
    split = json.loads((out / "split.json").read_text())
    for part in ("train", "val", "test"):
        assert split[part] == [i for i, row in enumerate(rows) if row[2] == part]
    config = json.loads((out / "config.json").read_text())
    assert config["labels"] == str(table) and config["data"] == "cifar10"
    assert json.loads((out / "metrics.json").read_text())["classes"] == ["blue", "green", "red"]
    # its own data: evaluate scores the given test rows by default
    best = str(out / "best.pt")
    assert main(["evaluate", best, "--labels", str(table), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["n"] == 3


def test_without_the_split_column_a_split_is_carved(labelled, tmp_path, capsys):
    folder, rows = labelled
    table = write_table(folder / "labels.csv", ["path", "label", "split"], rows)
    out = tmp_path / "run"
    assert main(labels_args(table, out, tmp_path / "cache", "--labels-split-column", "none")) == 0
    split = json.loads((out / "split.json").read_text())
    assert sorted(split["train"] + split["val"] + split["test"]) == list(range(24))
    assert len(split["val"]) == 5 and len(split["test"]) == 5  # 0.2 of 24, stratified, not the file's 6 and 3


def test_relative_and_absolute_paths_and_classes(labelled, cache_dir):
    folder, rows = labelled
    (folder / "lists").mkdir()
    mixed = [
        (f"../{path}" if i % 2 else str((folder / path).resolve()), label) for i, (path, label, _) in enumerate(rows)
    ]
    table = write_table(folder / "lists" / "labels.csv", ["label", "path"], [(b, a) for a, b in mixed])
    images = load(table, cache_dir)
    assert images.classes == ["blue", "green", "red"] and images.given_split is None
    assert images.images.shape == (24, 16, 16, 3)
    for i, (path, label, _) in enumerate(rows):
        assert (images.images[i] == decode_image(folder / path)).all()
        assert images.classes[images.labels[i]] == label


def test_tsv_and_custom_column_names(labelled, tmp_path, capsys):
    folder, rows = labelled
    table = write_table(folder / "labels.tsv", ["file", "class", "part"], rows, delimiter="\t")
    out = tmp_path / "run"
    columns = ["--labels-path-column", "file", "--labels-label-column", "class", "--labels-split-column", "part"]
    assert main(labels_args(table, out, tmp_path / "cache", *columns)) == 0, capsys.readouterr().err
    split = json.loads((out / "split.json").read_text())
    assert split["test"] == [i for i, row in enumerate(rows) if row[2] == "test"]


def test_delimiter_is_sniffed_for_other_extensions(labelled, cache_dir):
    folder, rows = labelled
    for delimiter, name in (("\t", "labels.txt"), (";", "labels.list"), (",", "labels")):
        images = load(write_table(folder / name, ["path", "label"], [r[:2] for r in rows], delimiter), cache_dir)
        assert len(images) == 24 and images.classes == ["blue", "green", "red"]


def test_editing_the_file_or_an_image_decodes_again(labelled, cache_dir):
    folder, rows = labelled
    table = write_table(folder / "labels.csv", ["path", "label"], [r[:2] for r in rows])
    first = load(table, cache_dir)
    assert load(table, cache_dir).key == first.key  # unchanged: the cache
    write_table(table, ["path", "label"], [(p, "other" if i == 0 else label) for i, (p, label, _) in enumerate(rows)])
    relabelled = load(table, cache_dir)
    assert relabelled.key != first.key and "other" in relabelled.classes
    image = folder / rows[3][0]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert load(table, cache_dir).key != relabelled.key


def test_skip_bad_images_keeps_the_given_split_aligned(labelled, cache_dir):
    folder, rows = labelled
    (folder / rows[0][0]).write_bytes(b"garbage")  # a train row of class red
    rows = [*rows, ("images/absent.png", "red", "val")]
    table = write_table(folder / "labels.csv", ["path", "label", "split"], rows)
    with pytest.raises(DataError, match=r"row 26: cannot read image .*absent.png"):
        load(table, cache_dir)
    with pytest.warns(UserWarning, match="skipped 2 unreadable image"):
        images = load(table, cache_dir, skip_bad=True)
    assert images.skipped == 2 and len(images) == 23
    assert images.given_split.tolist() == [("train", "val", "test").index(r[2]) for r in rows[1:-1]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(table, cache_dir, skip_bad=True).given_split.tolist() == images.given_split.tolist()
    with pytest.raises(DataError, match=r"cannot decode image .*red/000.png"):
        load(write_table(folder / "labels.csv", ["path", "label", "split"], rows[:-1]), cache_dir)


def test_a_missing_image_is_an_error_without_skip_bad_images(labelled, cache_dir):
    folder, rows = labelled
    rows = [("images/absent.png", "red"), *[r[:2] for r in rows]]
    table = write_table(folder / "labels.csv", ["path", "label"], rows)
    with pytest.raises(DataError, match=r"labels.csv, row 2: cannot read image .*absent.png"):
        load(table, cache_dir)


def test_no_test_rows_means_no_test_split(labelled, tmp_path, capsys):
    folder, rows = labelled
    rows = [(p, label, "val" if part == "test" else part) for p, label, part in rows]
    table = write_table(folder / "labels.csv", ["path", "label", "split"], rows)
    out = tmp_path / "run"
    assert main(labels_args(table, out, tmp_path / "cache")) == 0
    capsys.readouterr()
    assert json.loads((out / "split.json").read_text())["test"] == []
    assert main(["evaluate", str(out / "best.pt"), "--labels", str(table), "--split", "test", "--device", "cpu"]) == 2
    assert_one_line_error(capsys.readouterr(), "no test split")


def test_evaluate_a_checkpoint_on_a_labelled_set(trained_run, labelled, capsys):
    folder, rows = labelled
    best = str(trained_run.out_dir / "best.pt")
    table = write_table(folder / "some.csv", ["path", "label"], [r[:2] for r in rows if r[1] != "blue"])
    assert main(["evaluate", best, "--labels", str(table), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "all" and result["n"] == 16 and result["classes"] == ["blue", "green", "red"]
    relabelled = [(path, "zebra" if i < 2 else label) for i, (path, label, _) in enumerate(rows)]
    table = write_table(folder / "zebra.csv", ["path", "label"], relabelled)
    assert main(["evaluate", best, "--labels", str(table), "--json", "--device", "cpu"]) == 2
    assert_one_line_error(capsys.readouterr(), "'zebra' is not one of the checkpoint's classes")


# ---------------------------------------------------------------------------- bad input through the CLI
BAD = {
    # name: (header, rows as a function of the good rows, extra flags, fragments of the error)
    "missing image": (["path", "label"], lambda r: [*r[:3], ("images/nope.png", "red")], [], ["row 5", "nope.png"]),
    "empty label": (["path", "label"], lambda r: [r[0], (r[1][0], " ")], [], ["row 3", "empty label"]),
    "one image, two labels": (
        ["path", "label"],
        lambda r: [*r[:4], ("./" + r[1][0], "green")],
        [],
        ["row 6", "row 3", "another label"],
    ),
    "one image, two parts": (
        ["path", "label", "split"],
        lambda r: [*r[:6], ("./" + r[1][0], r[1][1], "test")],
        [],
        ["row 8", "row 3", "another part of the split"],
    ),
    "missing column": (["file", "label"], lambda r: r, [], ["no column 'path'", "--labels-path-column"]),
    "missing split column": (["path", "label"], lambda r: r, ["--labels-split-column", "part"], ["no column 'part'"]),
    "bad split value": (["path", "label", "split"], lambda r: [*r[:6], (r[6][0], "red", "tst")], [], ["row 8", "tst"]),
    "no val rows": (["path", "label", "split"], lambda r: [(p, lab, "train") for p, lab, _ in r], [], ["'val'"]),
    "short row": (["path", "label", "split"], lambda r: [r[0], r[1][:1]], [], ["row 3", "1 of 3 columns"]),
    "header only": (["path", "label"], lambda r: [], [], ["no rows"]),
    "limit with a given split": (["path", "label", "split"], lambda r: r, ["--limit", "12"], ["limit 12", "--limit"]),
    "folds with a given split": (
        ["path", "label", "split"],
        lambda r: r,
        ["--folds", "3"],
        ["folds 3", "split column"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_labels_file_is_one_line_and_writes_nothing(case, labelled, tmp_path, capsys):
    folder, rows = labelled
    header, change, extra, fragments = BAD[case]
    good = [row[: len(header)] if len(header) < 3 else row for row in rows]
    table = write_table(folder / "labels.csv", header, change(good))
    out = tmp_path / "run"
    assert main(labels_args(table, out, tmp_path / "cache", *extra)) == 2
    assert_one_line_error(capsys.readouterr(), str(table), *fragments)
    assert not out.exists()


@pytest.mark.parametrize("content", ["", "\n\n"], ids=["empty", "blank"])
def test_empty_or_absent_labels_file(content, tmp_path, capsys):
    table = tmp_path / "labels.csv"
    for expected in ("does not exist", "is empty"):
        assert main(labels_args(table, tmp_path / "run", tmp_path / "cache")) == 2
        assert_one_line_error(capsys.readouterr(), str(table), expected)
        assert not (tmp_path / "run").exists()
        table.write_text(content)


def test_labels_and_data_together_are_refused(labelled, image_tree, tmp_path, capsys):
    folder, rows = labelled
    table = write_table(folder / "labels.csv", ["path", "label"], [r[:2] for r in rows])
    args = labels_args(table, tmp_path / "run", tmp_path / "cache", "--data", str(image_tree))
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), "give one data source")
    assert not (tmp_path / "run").exists()


def test_labels_in_a_config_file_and_the_help(labelled, tmp_path, capsys):
    folder, rows = labelled
    table = write_table(folder / "labels.csv", ["path", "label"], [r[:2] for r in rows])
    toml = tmp_path / "run.toml"
    toml.write_text(f'[run]\nlabels = "{table}"\nlabels_split_column = "none"\n')
    assert main(labels_args(table, tmp_path / "run", tmp_path / "cache", "--config", str(toml))) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["labels_split_column"] is None
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "--labels-path-column" in capsys.readouterr().out
