"""The analyze page from plain values (report/analysis.py), without torch: the study report's error-analysis and
calibration blocks named for any split; the folder it writes never inside the data nor over a file."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from transferlab.data.decode import png_base64
from transferlab.errors import ConfigError
from transferlab.report.analysis import analysis_blocks, analysis_folder, default_folder, write_analysis
from transferlab.report.sections import SplitFigures, calibration_blocks, error_analysis_blocks


def reliability(count: list[int]) -> dict:
    return {"bins": 2, "accuracy": [0.5, 0.75], "confidence": [0.4, 0.8], "count": count}


def analysis(split: str = "all", grad_cam: bool = True) -> dict:
    """What inference.analysis.analyze_images returns, made by hand: 3 classes, 12 images, 2 mistakes."""
    thumbnail = png_base64(np.full((8, 8, 3), 90, np.uint8))
    mistakes = [{"index": i, "true": 0, "predicted": 1, "confidence": 0.9 - i / 10, "confidence_calibrated": 0.7,
                 "thumbnail": thumbnail} for i in range(2)]  # fmt: skip
    if grad_cam:
        for m in mistakes:
            m["gradcam"] = png_base64(np.linspace(0, 255, 64).astype(np.uint8).reshape(8, 8))
    per_class = {c: {"precision": p, "recall": r, "f1": f, "support": 4}
                 for c, p, r, f in (("a", 1.0, 0.5, 2 / 3), ("b", 4 / 6, 1.0, 0.8), ("c", 1.0, 1.0, 1.0))}  # fmt: skip
    return {
        "checkpoint": "runs/x/best.pt",
        "data": "photos",
        "split": split,
        "notes": ["3 of these 12 images are images the run trained on, 0 it validated on"],
        "seen_in_training": {"train": 3, "val": 0},
        "arch": "squeezenet1_1",
        "epoch": 2,
        "scores": {"n": 12, "accuracy": 10 / 12, "balanced_accuracy": 10 / 12, "macro_f1": 0.82, "loss": 0.51,
                   "classes": ["a", "b", "c"], "confusion_matrix": [[2, 2, 0], [0, 4, 0], [0, 0, 4]],
                   "per_class": per_class},  # fmt: skip
        "calibration": {"temperature": 1.5, "ece": 0.1, "ece_calibrated": 0.05, "nll": 0.51, "nll_calibrated": 0.45,
                        "reliability": reliability([4, 8]), "reliability_calibrated": reliability([5, 7]),
                        "temperature_range": [0.01, 100.0], "fit": {"fitted": True, "reason": "", "temperature": 1.5}},
        "errors": {"n_mistakes": 2, "n": 12, "mistakes": mistakes, "gradcam_layer": "features.12.expand3x3",
                   "gradcam_map_size": [2, 2]},
    }  # fmt: skip


def texts(blocks) -> str:
    return "\n".join(b.text for b in blocks) + "\n".join(" ".join(c for r in b.rows or [] for c in r) for b in blocks)


def test_the_page_names_the_split_and_the_checkpoint_never_a_study(tmp_path):
    blocks = analysis_blocks(analysis("all"))
    text = texts(blocks)
    for fragment in ("all (every image of the data)", "Error analysis (all images)", "Calibration (all images)",
                     "Confusion matrix of the checkpoint on all the images", "2 misclassified images", "83% (95% CI",
                     "precision (95% CI)", "3 of these 12 images are images the run trained on"):  # fmt: skip
        assert fragment in text, fragment
    assert "selected" not in text and "test split" not in text
    assert sum(b.kind == "figure" for b in blocks) == 4
    page, md, figures = write_analysis(analysis("val"), tmp_path / "out")
    assert "Error analysis (val split)" in page.read_text() and "val images" in md.read_text()
    assert sorted(p.name for p in figures.iterdir()) == [f"figure{i}.png" for i in range(1, 5)]


def test_the_study_reports_wording_is_the_default():
    record = analysis("test")
    scores = record["scores"]
    figures = SplitFigures(scores["classes"], scores["confusion_matrix"], scores["per_class"], record["errors"],
                           record["calibration"], scores["accuracy"], scores["n"])  # fmt: skip
    text = texts(error_analysis_blocks(figures) + calibration_blocks(figures))
    for fragment in ("Error analysis (test split)", "Confusion matrix of the selected trial on the test split",
                     "misclassified test images", "of the selected checkpoint, minimised over T",
                     "recorded during training, and the selection, are",
                     "Reliability diagrams of the selected trial"):  # fmt: skip
        assert fragment in text, fragment
    assert "95% CI" not in text  # the study's per-class table: each figure at its interval's precision


def test_a_skipped_grad_cam_is_said_not_drawn():
    record = analysis(grad_cam=False)
    record["errors"]["gradcam_layer"] = "none (pytorch_grad_cam cannot be imported: No module named 'x')"
    blocks = analysis_blocks(record)
    assert "No Grad-CAM maps: pytorch_grad_cam cannot be imported: No module named 'x'." in texts(blocks)
    assert sum(b.kind == "figure" for b in blocks) == 3


def test_the_folder_is_checked_before_any_figure(tmp_path):
    data = tmp_path / "photos"
    (data / "red").mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    assert default_folder(run / "best.pt") == run / "analysis"
    assert default_folder(tmp_path / "model.pt") == tmp_path / "model-analysis"
    assert analysis_folder(None, run / "best.pt", str(data)) == run / "analysis"
    (tmp_path / "file").write_text("x")
    for out, fragment in ((tmp_path / "file", "is a file"), (data, "inside the data"), (data / "red" / "x", "inside")):
        with pytest.raises(ConfigError, match=fragment):
            analysis_folder(out, run / "best.pt", str(data))
    with pytest.raises(ConfigError, match="inside the data"):  # the default folder of a checkpoint inside the data
        analysis_folder(None, data / "model.pt", str(data))


def test_the_page_loads_no_torch(tmp_path):
    code = (
        "import sys\n"
        "from transferlab.report.analysis import write_analysis\n"
        "import transferlab.report.sections\n"
        "assert 'torch' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_small_sample_is_said_to_be_small():
    assert "With 12 images the interval reaches" in texts(analysis_blocks(analysis("all")))
    assert "With 12 val images the interval reaches" in texts(analysis_blocks(analysis("val")))
    many = analysis("test")
    many["scores"] = {**many["scores"], "n": 5000}
    assert "the interval reaches" not in texts(analysis_blocks(many))
