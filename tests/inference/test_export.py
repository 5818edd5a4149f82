"""transferlab export: ONNX and TorchScript files whose probabilities match evaluate's, metadata, bad inputs."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from helpers import (
    model_input,
    quiet,
    tiny_config,
)
from PIL import Image

from transferlab.cli import main
from transferlab.engine.checkpoint import Checkpoint
from transferlab.inference.export import export_checkpoint, read_metadata
from transferlab.inference.predict import load_checkpoint


@pytest.fixture(scope="module")
def runs(image_tree, trained_run, tmp_path_factory):
    """Two checkpoints: the session's plain run, and one with flip TTA (frozen prefix cached in float16)."""
    from transferlab import train

    root = tmp_path_factory.mktemp("export-tta")
    tta = train(tiny_config(image_tree, root / "cache", tta_flip=True), root / "run", log=quiet)
    return {"plain": trained_run.out_dir / "best.pt", "tta": tta.out_dir / "best.pt"}


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    return {
        (name, fmt): export_checkpoint(ckpt, fmt, root / f"{name}.{'onnx' if fmt == 'onnx' else 'pt'}")
        for name, ckpt in runs.items()
        for fmt in ("onnx", "torchscript")
    }


def sample(image_tree, n=7):
    files = sorted(image_tree.glob("*/*.png"))[::6][:n]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


@pytest.mark.parametrize("name", ["plain", "tta"])
def test_onnx_probabilities_match_pytorch(name, runs, exported, image_tree):
    import onnxruntime as ort

    loaded = load_checkpoint(runs[name], "cpu")
    images = sample(image_tree)
    expected = loaded.probabilities(images).numpy()
    session = ort.InferenceSession(str(exported[name, "onnx"]), providers=["CPUExecutionProvider"])
    x = model_input(images, 32).numpy()
    for batch in (x, x[:1]):  # the batch dimension is dynamic
        got = session.run(None, {"images": batch})[0]
        diff = float(np.abs(got - expected[: len(batch)]).max())
        assert got.shape == (len(batch), 3) and diff < 1e-4, f"ONNX vs PyTorch max abs difference {diff:.3g}"
    assert np.allclose(got.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("name", ["plain", "tta"])
def test_torchscript_probabilities_match_pytorch(name, runs, exported, image_tree):
    loaded = load_checkpoint(runs[name], "cpu")
    images = sample(image_tree)
    expected = loaded.probabilities(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(exported[name, "torchscript"]))
    with torch.no_grad():
        got = module(model_input(images, 32))
    diff = float((got - expected).abs().max())
    assert diff < 1e-4, f"TorchScript vs PyTorch max abs difference {diff:.3g}"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_metadata_round_trips(fmt, runs, exported):

    ckpt = Checkpoint.load(runs["tta"])
    meta = read_metadata(exported["tta", fmt])
    assert meta["format"] == "transferlab-export-1"
    assert meta["classes"] == ckpt.classes == ["blue", "green", "red"]
    assert (meta["resolution"], meta["mean"], meta["std"]) == (32, list(ckpt.mean), list(ckpt.std))
    assert meta["tta_flip"] is True and meta["temperature"] == ckpt.temperature
    assert "resize_policy" in meta and "storage_size" in meta


def test_onnx_metadata_values_are_json_strings(exported):
    import onnx

    props = {p.key: p.value for p in onnx.load(str(exported["plain", "onnx"])).metadata_props}
    assert json.loads(props["classes"]) == ["blue", "green", "red"]


def test_onnx_export_is_deterministic(runs, exported, tmp_path):
    again = export_checkpoint(runs["plain"], "onnx", tmp_path / "again.onnx")
    assert again.read_bytes() == exported["plain", "onnx"].read_bytes()


# ---------------------------------------------------------------------------- the command and bad inputs
def test_cli_export_writes_the_file(runs, tmp_path, capsys):
    out = tmp_path / "model.pt"
    assert main(["export", str(runs["plain"]), "--format", "torchscript", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("transferlab: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_missing_and_damaged_checkpoints(tmp_path, runs, capsys):
    out = str(tmp_path / "m.onnx")
    assert main(["export", str(tmp_path / "nope.pt"), "--format", "onnx", "-o", out]) == 2
    one_line_error(capsys, "does not exist")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(runs["plain"].read_bytes()[:5000])
    assert main(["export", str(damaged), "--format", "onnx", "-o", out]) == 2
    one_line_error(capsys, "truncated or damaged")
    assert not (tmp_path / "m.onnx").exists()


def test_unknown_format(runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(runs["plain"]), "--format", "tflite", "-o", str(tmp_path / "m")])
    assert exit_info.value.code == 2
    one_line_error(capsys, "invalid choice: 'tflite'")


def test_bad_output_paths(runs, tmp_path, capsys):
    ckpt = str(runs["plain"])
    assert main(["export", ckpt, "--format", "onnx", "-o", str(tmp_path)]) == 2
    one_line_error(capsys, "is a folder")
    assert main(["export", ckpt, "--format", "onnx", "-o", str(tmp_path / "missing" / "m.onnx")]) == 2
    one_line_error(capsys, "does not exist")


def test_a_failed_write_leaves_nothing(runs, tmp_path, capsys, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    assert main(["export", str(runs["plain"]), "--format", "torchscript", "-o", str(tmp_path / "m.pt")]) == 2
    one_line_error(capsys, "cannot write -o", "Permission denied")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_folder(runs, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(["export", str(runs["plain"]), "--format", "onnx", "-o", str(folder / "m.onnx")]) == 2
        one_line_error(capsys, "cannot write -o")
    finally:
        folder.chmod(0o755)


# ---------------------------------------------------------------------------- found by a hostile tester
def test_torchscript_export_says_nothing_it_need_not(trained_run, tmp_path, capsys):
    assert main(["export", str(trained_run.out_dir / "best.pt"), "--format", "torchscript", "-o",
                 str(tmp_path / "m.pt")]) == 0  # fmt: skip
    assert "warning" not in capsys.readouterr().err
