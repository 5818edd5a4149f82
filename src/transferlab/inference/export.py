"""A checkpoint as a self-contained inference file: ONNX or TorchScript.

The exported model takes float32 (N, 3, R, R) RGB in [0, 1] at the checkpoint's resolution R (resizing is left to
the caller, as it depends on the image source), normalises with the checkpoint's mean and std inside, and returns
(N, K) class probabilities exactly as `predict` computes them: engine.forward's prefix_output and suffix_logits, then
scoring.calibration.view_probabilities (the views' mean softmax, calibrated by the checkpoint's temperature). It runs
in float32; the frozen groups' output is rounded to the cached dtype as validation saw it, so the probabilities match
`evaluate`'s (but for bf16's rounding when the checkpoint was trained under autocast, on CUDA). The batch dimension
is dynamic. Class names and preprocessing travel in the file: ONNX `metadata_props` (each value a JSON string),
TorchScript `_extra_files["transferlab.json"]`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ..engine.checkpoint import Checkpoint
from ..engine.forward import prefix_output, suffix_logits
from ..engine.rundir import checkpoint_file, output_file
from ..errors import ConfigError
from ..fsutil import refuse_output_over_input, replaced_on_success
from ..scoring.calibration import view_probabilities
from .predict import loaded_model

FORMATS = ("onnx", "torchscript")
EXPORT_FORMAT = "transferlab-export-1"
EXTRA_FILE = "transferlab.json"


class Exported(nn.Module):
    def __init__(self, prefix, suffix, mean, std, *, feature_dtype, tta_flip: bool, temperature: float):
        super().__init__()
        self.prefix, self.suffix = prefix, suffix
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.feature_dtype = feature_dtype
        self.tta_flip = tta_flip
        self.temperature = float(temperature)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        features = prefix_output(self.prefix, (x - self.mean) / self.std, autocast=False,
                                 feature_dtype=self.feature_dtype)  # fmt: skip
        return suffix_logits(self.suffix, features, autocast=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [self.logits(x), self.logits(x.flip(3))] if self.tta_flip else [self.logits(x)]
        return view_probabilities(torch.stack(views), self.temperature)  # as `predict` computes them


def metadata(ckpt) -> dict:
    """What a user of the file needs besides the network: classes and how to prepare its input."""
    return {
        "format": EXPORT_FORMAT,
        "classes": list(ckpt.classes),
        "resolution": ckpt.resolution,
        "mean": list(ckpt.mean),
        "std": list(ckpt.std),
        "resize_policy": ckpt.resize_policy,
        "storage_size": ckpt.storage_size,
        "crop_fraction": ckpt.crop_fraction,
        "interpolation": ckpt.interpolation,
        "input": "float32 (N, 3, resolution, resolution), RGB in [0, 1]: the image's square (resize_policy), its "
        "central crop_fraction, resized to resolution (interpolation); normalised inside",
        "output": "float32 (N, classes) probabilities",
        "tta_flip": ckpt.tta_flip,
        "temperature": ckpt.temperature,
        "arch": ckpt.arch,
        "epoch": ckpt.epoch,
        "metric": ckpt.metric,
        "val_accuracy": ckpt.val_accuracy,
    }


def build_exported(path: str | Path) -> tuple[Exported, dict]:
    path = checkpoint_file(path)
    ckpt = Checkpoint.load(path)
    loaded = loaded_model(ckpt, path, "cpu")
    loaded.model.to(memory_format=torch.contiguous_format)
    module = Exported(
        loaded.prefix,
        loaded.suffix,
        ckpt.mean,
        ckpt.std,
        feature_dtype=loaded.feature_dtype,
        tta_flip=ckpt.tta_flip,
        temperature=ckpt.temperature,
    ).eval()
    return module, metadata(ckpt)


def export_checkpoint(path: str | Path, fmt: str, out: str | Path) -> Path:
    """Write the checkpoint at `path` as `fmt` ("onnx" or "torchscript") to `out`, atomically; returns `out`."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    refuse_output_over_input(out, [path], "-o", ConfigError)
    out = output_file(out, "-o", ConfigError)
    module, meta = build_exported(path)
    if fmt == "onnx":
        _require_onnx()
    example = torch.rand(2, 3, meta["resolution"], meta["resolution"])
    try:
        with replaced_on_success(out) as tmp, torch.no_grad(), warnings.catch_warnings():
            tmp.touch()  # an unwritable folder fails here, as an OSError, before the exporters' own errors
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, yet still the way to TorchScript
            # the number of views (1 or 2) is read as a Python number while tracing: fixed for the file, as it should be
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            if fmt == "onnx":
                _write_onnx(module, example, meta, tmp)
            else:
                traced = torch.jit.trace(module, example)
                torch.jit.save(traced, str(tmp), _extra_files={EXTRA_FILE: json.dumps(meta)})
    except OSError as error:
        raise ConfigError(f"cannot write -o {out}: {' '.join(str(error).split())}") from None
    return out


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"ONNX export needs {error.name}: pip install 'transferlab[export]'") from None


def _write_onnx(module: nn.Module, example: torch.Tensor, meta: dict, tmp: Path) -> None:
    import onnx  # optional extra: only ONNX export needs it

    # The dynamo exporter (torch's default; the TorchScript-based one is deprecated): deterministic on CPU (the same
    # bytes from the same checkpoint), one file for models under 2 GB.
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        verbose=False,
        input_names=["images"],
        output_names=["probabilities"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
    )
    program.save(str(tmp))
    model = onnx.load(str(tmp))
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(model, str(tmp))


def read_metadata(path: str | Path) -> dict:
    """The metadata of an exported file (either format), as Python values."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx  # as above

        model = onnx.load(str(path), load_external_data=False)
        return {p.key: json.loads(p.value) for p in model.metadata_props}
    extra = {EXTRA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[EXTRA_FILE])
