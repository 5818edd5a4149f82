"""`transferlab analyze`: a checkpoint's interpretation on a split, as one self-contained HTML page and its PNGs; the
images evaluate would score; killed runs and moved data said in one line."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil

import pytest
from helpers import assert_one_line_error, make_image_tree, quiet, tiny_config
from PIL import Image

from transferlab import RunConfig
from transferlab.cli import main
from transferlab.engine.train import run_training


@pytest.fixture(scope="module")
def weak_run(image_tree, tmp_path_factory):
    """A 1-epoch run at a tiny lr: it misclassifies some of its 9 test images, so every figure is drawn; read-only."""
    root = tmp_path_factory.mktemp("weak")
    run_training(tiny_config(image_tree, root / "cache", lr=1e-5), root / "run", log=quiet)
    return root / "run"


@pytest.fixture
def run_copy(weak_run, tmp_path):
    """The weak run's folder, for a test that writes into it."""
    return shutil.copytree(weak_run, tmp_path / "run")


def page_figures(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r"<img src='data:image/png;base64,([^']+)'", page)]


def test_analyze_writes_one_self_contained_page_and_its_figures(run_copy, capsys):
    assert main(["analyze", str(run_copy), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    folder = run_copy / "analysis"
    page, md, figures = folder / "analysis.html", folder / "analysis.md", folder / "analysis_files"
    assert captured.out.splitlines() == [str(page), str(md), str(figures)]  # where it wrote, a line each
    assert "no --data: scoring the data the run recorded" in captured.err
    html = page.read_text()
    sources = re.findall(r"src=['\"]?([^'\" >]{0,22})", html)
    assert sources == ["data:image/png;base64,"] * html.count("<img") == ["data:image/png;base64,"] * 4
    assert "href=" not in html and "<script" not in html and "<link" not in html  # nothing outside the page
    pngs = sorted(figures.glob("*.png"))
    # the confusion matrix, the mistakes, their Grad-CAM maps, the reliability diagrams
    assert [p.name for p in pngs] == [f"figure{i}.png" for i in range(1, 5)]
    assert page_figures(html) == [p.read_bytes() for p in pngs]
    for png in pngs:
        assert Image.open(io.BytesIO(png.read_bytes())).size > (10, 10)
    n_test = len(json.loads((run_copy / "split.json").read_text())["test"])
    assert "test (its test split)" in html and f"<td>images</td><td>{n_test}</td>" in html
    for text in ("Error analysis (test split)", "Calibration (test split)", "most confident mistakes",
                 "Grad-CAM of the predicted class", "precision (95% CI)", "accuracy (95% CI)"):  # fmt: skip
        assert text in html, text
    assert "(analysis_files/figure4.png)" in md.read_text()
    assert {p.name for p in run_copy.iterdir()} >= {"best.pt", "metrics.json", "split.json", "analysis"}


def test_analyze_on_other_data_scores_all_of_it(weak_run, make_tree, tmp_path, capsys):
    other = make_tree("other", per_class=4, size=20, seed=7)
    out = tmp_path / "out"
    (out / "analysis_files").mkdir(parents=True)
    (out / "analysis_files" / "figure9.png").write_bytes(b"an earlier analysis's")  # removed: not this page's
    (out / "analysis_files" / "notes.txt").write_text("mine")  # kept: not analyze's
    assert main(["analyze", str(weak_run / "best.pt"), "--data", str(other), "--out", str(out), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == str(out / "analysis.html")
    html = (out / "analysis.html").read_text()
    assert "all (every image of the data)" in html and "<td>images</td><td>12</td>" in html
    assert "Error analysis (all images)" in html and "test split" not in html
    assert html.count("<img") == len(list((out / "analysis_files").glob("*.png")))
    assert (out / "analysis_files" / "notes.txt").is_file()


def test_a_checkpoint_file_is_analysed_beside_itself(weak_run, tmp_path, capsys):
    model = shutil.copy(weak_run / "best.pt", tmp_path / "model.pt")
    other = make_image_tree(tmp_path / "other", per_class=2, size=20)
    assert main(["analyze", str(model), "--data", str(other), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == str(tmp_path / "model-analysis" / "analysis.html")


def test_bad_inputs_are_one_line(weak_run, image_tree, tmp_path, capsys):
    cases = [
        (["analyze", str(tmp_path / "absent")], ["does not exist"]),
        (["analyze", str(weak_run), "--out", str(weak_run / "best.pt")], ["is a file", "name a folder"]),
        (["analyze", str(weak_run), "--out", str(image_tree / "red" / "analysis")], ["inside the data"]),
        (["analyze", str(weak_run), "--data", str(image_tree), "--out", str(image_tree)], ["inside the data"]),
        (["analyze", str(weak_run), "--split", "val", "--data", str(tmp_path / "nowhere")], ["nowhere"]),
    ]
    for argv, fragments in cases:
        assert main([*argv, "--device", "cpu"]) == 2, argv
        assert_one_line_error(capsys.readouterr(), *fragments)
    assert not (image_tree / "red" / "analysis").exists() and not (image_tree / "analysis.html").exists()


# ---------------------------------------------------------------------------- killed runs
def test_a_run_killed_before_its_first_epoch_has_no_checkpoint_yet(tmp_path, capsys):
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / ".lock").touch()  # what `train` leaves of a run killed during its first epoch
    for command in ("evaluate", "analyze", "predict"):
        argv = [command, str(killed)] + ([str(tmp_path / "x.png")] if command == "predict" else [])
        assert main(argv) == 2
        assert_one_line_error(capsys.readouterr(), "the run has no checkpoint yet", "killed before its first epoch")


def test_evaluate_analyze_predict_and_export_say_a_run_did_not_finish(image_tree, tmp_path, capsys):
    out = tmp_path / "run"
    stopped = run_training(tiny_config(image_tree, tmp_path / "cache", epochs=3), out, log=quiet,
                           on_epoch=lambda row: True)  # fmt: skip
    assert stopped.stopped and not json.loads((out / "metrics.json").read_text())["finished"]
    note = "the run did not finish: best.pt is from epoch 1 of 3 (it stopped after epoch 1"
    assert main(["evaluate", str(out), "--device", "cpu"]) == 0
    assert f"transferlab: note: {note}" in capsys.readouterr().err
    assert main(["analyze", str(out), "--device", "cpu"]) == 0
    assert note in capsys.readouterr().err and note in (out / "analysis" / "analysis.html").read_text()
    image = next(image_tree.rglob("*.png"))
    assert main(["predict", str(out), str(image), "--device", "cpu"]) == 0
    assert f"transferlab: note: {note}" in capsys.readouterr().err
    assert main(["export", str(out), "--format", "torchscript", "-o", str(tmp_path / "m.pt")]) == 0
    assert f"transferlab: note: {note}" in capsys.readouterr().err
    (out / "metrics.json").unlink()  # killed between its best.pt and its first metrics.json
    assert main(["evaluate", str(out), "--device", "cpu"]) == 0
    assert "recorded no epoch's results" in capsys.readouterr().err


def test_a_finished_run_has_no_such_note(weak_run, capsys):
    assert main(["evaluate", str(weak_run), "--device", "cpu", "--json"]) == 0
    assert "did not finish" not in capsys.readouterr().err


# ---------------------------------------------------------------------------- a relative --data
def test_a_relative_recorded_data_path_is_taken_from_where_training_ran(make_tree, tmp_path, monkeypatch, capsys):
    make_tree("photos", per_class=6, size=16)
    monkeypatch.chdir(tmp_path)
    run_training(tiny_config("photos", tmp_path / "cache"), tmp_path / "run", log=quiet)
    assert main(["evaluate", "run", "--device", "cpu", "--json"]) == 0  # from where it trained
    here = json.loads(capsys.readouterr().out)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", str(tmp_path / "run"), "--device", "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == here  # the same images, the same split, the same figures
    assert f"the data the run recorded, {tmp_path / 'photos'}" in captured.err
    assert main(["analyze", str(tmp_path / "run"), "--device", "cpu"]) == 0
    capsys.readouterr()
    (tmp_path / "photos").rename(tmp_path / "moved")
    for command in ("evaluate", "analyze"):
        assert main([command, str(tmp_path / "run"), "--device", "cpu"]) == 2
        assert_one_line_error(capsys.readouterr(), f"{tmp_path / 'photos'}, is not there any more", "--data")
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(tmp_path / "moved"), "--device", "cpu"]) == 0


def test_a_run_recorded_without_its_directory_says_where_a_relative_path_is_relative_to():
    from transferlab.errors import DataError
    from transferlab.inference.evaluate import check_recorded, recorded_source

    config = RunConfig(data="no-such-photos")
    assert recorded_source(config, None) == "no-such-photos"  # a checkpoint written before the directory was
    assert recorded_source(config, "/data/runs") == "/data/runs/no-such-photos"
    with pytest.raises(DataError, match="relative to the directory training ran in"):
        check_recorded(recorded_source(config, None))


def test_without_grad_cam_the_page_says_so_and_draws_the_rest(weak_run, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # as if the package were not installed
    out = tmp_path / "out"
    assert main(["analyze", str(weak_run), "--out", str(out), "--device", "cpu"]) == 0
    html = (out / "analysis.html").read_text()
    assert "No Grad-CAM maps: pytorch_grad_cam cannot be imported" in html and "most confident mistakes" in html
    assert html.count("<img") == len(list((out / "analysis_files").glob("*.png"))) == 3
