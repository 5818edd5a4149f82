"""The code paths a GPU run takes, exercised as far as a CPU can; on CUDA with TRANSFERLAB_TEST_DEVICE=cuda.

Every run here trains on the test device (helpers.TEST_DEVICE: the CPU, or CUDA when TRANSFERLAB_TEST_DEVICE=cuda,
as benchmarks/gpu_check.sh sets it) and is evaluated there.

- bf16 autocast (`amp = "on"`; `"auto"` turns it on on CUDA only): training and validation run under autocast; the
  frozen groups' output is computed in bf16 and cached (float16, or float32 when float16 would overflow); the
  checkpoint records autocast and the cached dtype, and `evaluate` of the validation split reproduces the recorded
  validation accuracy exactly and its loss as closely as for float32 runs, on the cached path, on the path that runs
  the frozen groups every step, and with nothing frozen. `predict` gives the checkpoint's probabilities; an ONNX or
  TorchScript export (float32) matches the checkpoint evaluated without autocast and stays within bf16's rounding of
  evaluate. Activations cached under autocast are never reused by a float32 run, nor the reverse.
- `compile = true`: torch.compile of the trainable part trains a run close to the eager one (the compiled module is
  what the training steps call); evaluation, which runs eagerly, still reproduces its validation. Skipped, with the
  reason, only where the CPU has no C++ compiler for inductor.
- channels_last: the model's 4-d weights and every preprocessed batch are channels_last, in training and in a loaded
  checkpoint, and the logits equal those of the same weights in the default layout.
- Where the images live: on the CPU the memory-mapped array itself (no copy); a device with too little free memory
  (forced here) leaves them in host memory, says so, and moves them a batch at a time (the feature pass too), training
  exactly the run the device-resident path trains.
- The declared version ranges (pyproject.toml) accept a prepared CUDA environment: Python 3.12, torch 2.11,
  torchvision 0.26 and the other versions seen on a GPU machine here, and a timm as old as 1.0.3, which cannot build
  every family on the meta device: such a backbone is described from a real build instead.
- `--device cuda` where there is no CUDA device: train, lr-find, evaluate, predict and study run stop with one line
  and exit status 2 (skipped on a machine with CUDA).

Only a GPU can check: CUDA's kernels and their numbers (bf16 on tensor cores, cuDNN's channels_last convolutions,
Triton code from torch.compile), that the images really move to the device once and fit (torch.cuda.mem_get_info),
host-to-device copies of streamed batches, and speed. benchmarks/gpu_check.sh runs this file on CUDA.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from helpers import (
    REPO_ROOT,
    TEST_DEVICE,
    assert_one_line_error,
    built_run,
    history_without_time,
    tiny_config,
    train_args,
    trained_run,
    write_spec,
)

from transferlab.cli import main
from transferlab.data.decode import decode_image
from transferlab.data.sources import load_image_folder
from transferlab.engine.checkpoint import Checkpoint
from transferlab.engine.features import FeatureCache
from transferlab.inference.evaluate import evaluate_checkpoint
from transferlab.inference.export import export_checkpoint
from transferlab.inference.predict import load_checkpoint, predict_files

run_module = importlib.import_module("transferlab.engine.run")


def fit(config, out, **kwargs):
    """(the run as built, its result)."""
    return trained_run(config, out, **kwargs)


def validation_of(run, result, cache) -> dict:
    """`evaluate` of the run's best.pt on its validation split, on the test device."""
    data = load_image_folder(run.config.data, cache, progress=False)
    val = np.asarray(json.loads((result.out_dir / "split.json").read_text())["val"])
    return evaluate_checkpoint(result.out_dir / "best.pt", data, indices=val, device=TEST_DEVICE)


def assert_reproduced(run, result, evaluated: dict) -> None:
    row = result.best
    assert evaluated["n"] == len(run.split.val)
    assert evaluated["accuracy"] == row["val_accuracy"]  # both the exact fraction correct
    assert evaluated["loss"] == pytest.approx(row["val_loss"], rel=1e-4)


def assert_same_run(a: list[dict], b: list[dict]) -> None:
    """Bit for bit on the CPU; on CUDA within the last bits that its atomics-based kernels may change between runs."""
    if TEST_DEVICE == "cpu":
        assert history_without_time(a) == history_without_time(b)
        return
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for x, y in zip(a, b):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-3)
        assert x["val_loss"] == pytest.approx(y["val_loss"], abs=1e-3)


def bf16_valued(x: torch.Tensor) -> bool:
    """Every value of x is a bfloat16 number (7 mantissa bits): what a prefix run under bf16 autocast outputs."""
    x = x.float()
    return bool(torch.equal(x.to(torch.bfloat16).float(), x))


# ---------------------------------------------------------------------------- bf16 autocast
@pytest.mark.parametrize("amp, expected", [("on", True), ("off", False), ("auto", TEST_DEVICE == "cuda")])
def test_amp_setting_decides_autocast(image_tree, tmp_path, amp, expected):
    run = built_run(tiny_config(image_tree, tmp_path / "cache", strategy="full", amp=amp), tmp_path / "run")
    assert run.forward.autocast is expected


@pytest.mark.parametrize(
    "overrides, path, feature_dtype",
    [
        ({"strategy": "partial", "flip": True, "tta_flip": True}, "cached", "float16"),
        ({"strategy": "partial", "crop_padding": 2}, "images", None),  # frozen groups run every step, under autocast
        ({"strategy": "full", "flip": True}, "images", None),
    ],
    ids=["cached", "frozen-every-step", "full"],
)
def test_bf16_run_is_reproduced_by_evaluate(image_tree, tmp_path, overrides, path, feature_dtype):
    config = tiny_config(image_tree, tmp_path / "cache", amp="on", head="linear", lr=1e-2, epochs=2, **overrides)
    run, result = fit(config, tmp_path / "run")
    assert result.feature_path == path
    ckpt = Checkpoint.load(tmp_path / "run" / "best.pt")
    assert ckpt.autocast is True and ckpt.feature_dtype == feature_dtype
    if path == "cached":  # computed under bf16 autocast, stored as float16: bf16 values, one view per mirror
        assert [v.dtype for v in run.inputs.views] == [torch.float16, torch.float16]
        assert all(bf16_valued(v) for v in run.inputs.views)
    assert_reproduced(run, result, validation_of(run, result, tmp_path / "cache"))


def test_float32_run_caches_values_finer_than_bf16(image_tree, tmp_path):
    """The bf16 check above can fail: without autocast the cached activations carry more mantissa bits."""
    run, _ = fit(tiny_config(image_tree, tmp_path / "cache", strategy="partial", amp="off"), tmp_path / "run")
    assert run.forward.feature_dtype == torch.float16 and not bf16_valued(run.inputs.views[0])


def test_bf16_features_too_large_for_float16_are_cached_in_float32(image_tree, features_weights, tmp_path):
    """Activations beyond float16's range are kept in float32 (as computed: bf16 values), and evaluate repeats it."""
    state = torch.load(features_weights, weights_only=True)
    state["features.0.weight"] = state["features.0.weight"] * 1e5  # no normalisation layers: the output scales too
    loud = tmp_path / "loud.pth"
    torch.save(state, loud)
    config = tiny_config(image_tree, tmp_path / "cache", strategy="frozen", weights=str(loud), amp="on", head="linear")
    run, result = fit(config, tmp_path / "run")
    assert run.inputs.views[0].abs().max() > torch.finfo(torch.float16).max
    assert run.forward.feature_dtype == torch.float32 and bf16_valued(run.inputs.views[0])
    assert Checkpoint.load(tmp_path / "run" / "best.pt").feature_dtype == "float32"
    assert_reproduced(run, result, validation_of(run, result, tmp_path / "cache"))


def test_autocast_and_float32_activations_are_cached_apart(image_tree, tmp_path):
    cache = FeatureCache(None)
    common = dict(strategy="partial", epochs=1)
    fit(tiny_config(image_tree, tmp_path / "cache", amp="off", **common), tmp_path / "fp32", feature_cache=cache)
    fit(tiny_config(image_tree, tmp_path / "cache", amp="on", **common), tmp_path / "bf16", feature_cache=cache)
    assert (cache.misses, cache.hits) == (2, 0)  # one pass each: neither took the other's activations
    fit(
        tiny_config(image_tree, tmp_path / "cache", amp="on", lr=0.5, **common), tmp_path / "again", feature_cache=cache
    )
    assert (cache.misses, cache.hits) == (2, 1)  # same prefix, same precision: reused


@pytest.fixture(scope="module")
def bf16_run(image_tree, tmp_path_factory):
    """A finished run under bf16 autocast with cached frozen features and flip TTA: (the run, its result); read-only."""
    root = tmp_path_factory.mktemp("bf16")
    config = tiny_config(
        image_tree, root / "cache", amp="on", strategy="partial", tta_flip=True, head="linear", lr=1e-2
    )
    return fit(config, root / "run")


def tree_sample(image_tree, n: int = 6) -> tuple[list, np.ndarray]:
    files = sorted(image_tree.glob("*/*.png"))[::7][:n]
    return files, np.stack([decode_image(f) for f in files])


def test_predict_gives_the_bf16_checkpoints_probabilities(bf16_run, image_tree):
    best = bf16_run[1].out_dir / "best.pt"
    files, images = tree_sample(image_tree)
    expected = load_checkpoint(best, TEST_DEVICE).probabilities(images)
    predicted = predict_files(best, files, top=3, device=TEST_DEVICE)
    assert [p["file"] for p in predicted] == [str(f) for f in files]
    for row, probs in zip(predicted, expected):
        assert row["top"][0]["class"] == bf16_run[0].images.classes[int(probs.argmax())]
        got = {t["class"]: t["probability"] for t in row["top"]}
        want = dict(zip(bf16_run[0].images.classes, probs.tolist()))
        assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_of_a_bf16_checkpoint_computes_in_float32(bf16_run, image_tree, tmp_path, fmt):
    from helpers import model_input

    best = bf16_run[1].out_dir / "best.pt"
    _, images = tree_sample(image_tree)
    x = model_input(images, 32)
    if fmt == "onnx":
        pytest.importorskip("onnxscript", reason="ONNX export needs the export extra (onnx, onnxscript)")
        ort = pytest.importorskip("onnxruntime")
        path = export_checkpoint(best, fmt, tmp_path / "model.onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    else:
        path = export_checkpoint(best, fmt, tmp_path / "model.pt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path))
        with torch.no_grad():
            got = module(x)
    loaded = load_checkpoint(best, "cpu")
    float32 = dataclasses.replace(loaded, autocast=False).probabilities(images)
    assert float((got - float32).abs().max()) < 1e-4  # the same network in float32, cached dtype rounding included
    under_bf16 = load_checkpoint(best, TEST_DEVICE).probabilities(images)
    assert float((got - under_bf16).abs().max()) < 2e-2  # evaluate under autocast: bf16's rounding apart


# ---------------------------------------------------------------------------- torch.compile
def inductor_missing() -> str | None:
    """Why torch.compile cannot build CPU kernels here, or None (it needs a C++ compiler; on CUDA, Triton)."""
    if TEST_DEVICE != "cpu":
        return None
    names = [os.environ.get("CXX", ""), "g++", "clang++", "c++"]
    if not any(name and shutil.which(name) for name in names):
        return "torch.compile on the CPU needs a C++ compiler for inductor (g++ or clang++; none on PATH)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(inductor_missing() is not None, reason=str(inductor_missing()))
def test_compiled_training_matches_eager(image_tree, tmp_path):
    # no dropout: compiled code draws its masks from its own random numbers, so only then are the two runs comparable
    common = dict(strategy="partial", head="linear", epochs=2, lr=1e-2, dropout=0.0)
    eager, eager_result = fit(tiny_config(image_tree, tmp_path / "cache", **common), tmp_path / "eager")
    compiled, result = fit(tiny_config(image_tree, tmp_path / "cache", compile=True, **common), tmp_path / "compiled")
    assert hasattr(compiled.step_suffix, "_orig_mod") and compiled.step_suffix._orig_mod is compiled.forward.suffix
    assert not hasattr(eager.step_suffix, "_orig_mod")
    for a, b in zip(eager_result.history, result.history):  # fused kernels round differently, a little
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-3)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-3)
        assert abs(a["val_accuracy"] - b["val_accuracy"]) <= 1 / len(eager.split.val) + 1e-9
    assert_reproduced(compiled, result, validation_of(compiled, result, tmp_path / "cache"))


# ---------------------------------------------------------------------------- channels_last
def four_d_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 4]


def test_channels_last_in_training_and_in_a_loaded_checkpoint(bf16_run, image_tree):
    run, result = bf16_run
    assert four_d_weights(run.model)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in four_d_weights(run.model))
    batch = run.inputs.pixels_of(torch.arange(4, device=run.device))
    for train in (True, False):
        x = run.forward.preprocess(batch, train=train, generator=run.generator)
        assert x.is_contiguous(memory_format=torch.channels_last) and x.device == run.device
    loaded = load_checkpoint(result.out_dir / "best.pt", TEST_DEVICE)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in four_d_weights(loaded.model))
    assert loaded.preprocess(batch).is_contiguous(memory_format=torch.channels_last)


def test_channels_last_gives_the_default_layouts_logits(trained_run, image_tree):
    _, images = tree_sample(image_tree)
    loaded = load_checkpoint(trained_run.out_dir / "best.pt", TEST_DEVICE)
    loaded = dataclasses.replace(loaded, autocast=False)
    channels_last = loaded.view_logits(images)
    loaded.model.to(memory_format=torch.contiguous_format)  # prefix and suffix are its modules
    loaded.preprocess.channels_last = False
    assert all(p.is_contiguous() for p in four_d_weights(loaded.model))
    assert torch.allclose(loaded.view_logits(images), channels_last, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- where the images live
def test_images_stay_the_mapped_array_on_the_cpu_or_move_to_the_device_once(image_tree, tmp_path):
    run = built_run(tiny_config(image_tree, tmp_path / "cache", strategy="full"), tmp_path / "run")
    assert run.inputs.streamed is False and run.inputs.pixels.device == run.device
    if run.device.type == "cpu":  # no copy: a set larger than memory still trains
        assert np.shares_memory(run.inputs.pixels.numpy(), run.images.images)


@pytest.mark.parametrize(
    "overrides",
    [{"strategy": "full", "crop_padding": 2, "flip": True}, {"strategy": "partial", "flip": True}],
    ids=["images-every-step", "feature-pass"],
)
def test_streamed_images_train_the_same_run(image_tree, tmp_path, monkeypatch, overrides):
    config = tiny_config(image_tree, tmp_path / "cache", epochs=2, **overrides)
    _, resident = fit(config, tmp_path / "resident")
    logged = []
    monkeypatch.setattr(run_module, "free_device_memory", lambda device: 0)  # a device too small for any image
    run, streamed = fit(config, tmp_path / "streamed", log=logged.append, feature_cache=FeatureCache(None))
    assert run.inputs.streamed is True and run.inputs.pixels.device.type == "cpu"
    assert any(line.startswith("images stay in host memory") for line in logged), logged
    assert_same_run(streamed.history, resident.history)


# ---------------------------------------------------------------------------- --device cuda without CUDA
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "lr-find", "evaluate", "predict", "study run"])
def test_cuda_without_cuda_is_one_line(command, image_tree, trained_run, tmp_path, capsys):
    best = str(trained_run.out_dir / "best.pt")
    image = sorted(image_tree.glob("*/*.png"))[0]
    args = {
        "train": train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--device", "cuda"),
        "lr-find": ["lr-find", *train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--device", "cuda")[1:]],
        "evaluate": ["evaluate", best, "--data", str(image_tree), "--device", "cuda"],
        "predict": ["predict", best, str(image), "--device", "cuda"],
        "study run": [
            "study", "run", str(write_spec(tmp_path / "s.toml", image_tree, tmp_path / "cache", {"epochs": [1]})),
            "--dir", str(tmp_path / "study"), "--set", "device=cuda",
        ],
    }[command]  # fmt: skip
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr(), "no CUDA device")
    assert not (tmp_path / "run").exists() and not (tmp_path / "study").exists()  # refused before anything is written


def test_test_device_is_the_runs_device(image_tree, tmp_path):
    """tiny_config follows TRANSFERLAB_TEST_DEVICE, so this file (and the others built on it) run on CUDA there."""
    assert tiny_config(image_tree, tmp_path).device == TEST_DEVICE


# ---------------------------------------------------------------------------- a prepared CUDA environment
# What a GPU machine of this workplace has (an image with its own Python and torch, no package index): Python 3.12.3,
# torch 2.11.0+cu130, torchvision 0.26.0, numpy 2.5.2, onnx 1.23.1, onnxscript 0.7.2; its timm is not known, so the
# oldest timm the timm tests passed with (tests/test_timm.py, 2026-11-30).
PREPARED_PYTHON = "3.12.3"
PREPARED = {"torch": "2.11.0+cu130", "torchvision": "0.26.0", "numpy": "2.5.2", "timm": "1.0.3"}
PREPARED_EXPORT = {"onnx": "1.23.1", "onnxscript": "0.7.2"}


def test_declared_ranges_accept_a_prepared_cuda_environment():
    """`pip install --no-deps .` there leaves its torch, and the declared ranges say that set is supported."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert SpecifierSet(project["requires-python"]).contains(PREPARED_PYTHON)
    for requirements, versions in (
        (project["dependencies"], PREPARED),
        (project["optional-dependencies"]["export"], PREPARED_EXPORT),
    ):
        declared = {Requirement(r).name: Requirement(r).specifier for r in requirements}
        for name, version in versions.items():
            assert declared[name].contains(version), f"{name} {version} is outside the declared {declared[name]}"


def test_a_timm_that_cannot_build_on_the_meta_device_is_described_by_a_real_build(monkeypatch):
    """timm before 1.0.30 (what a prepared environment may hold) cannot build some families on the meta device: the
    backbone is then described from a real build, the same description, and the caller's random numbers untouched."""
    from transferlab.models import timm_backbone

    timm_backbone.describe.cache_clear()
    expected = timm_backbone.describe("regnetx_002")
    real_create = timm_backbone.create

    def create_like_an_older_timm(name, *args, **kwargs):
        if torch.empty(0).device.type == "meta":
            raise NotImplementedError("aten::_unique2: attempted to run this operator with Meta tensors")
        return real_create(name, *args, **kwargs)

    monkeypatch.setattr(timm_backbone, "create", create_like_an_older_timm)
    timm_backbone.describe.cache_clear()
    state = torch.random.get_rng_state()
    try:
        assert timm_backbone.describe("regnetx_002") == expected
    finally:
        timm_backbone.describe.cache_clear()
    assert torch.equal(torch.random.get_rng_state(), state)
