"""Weights files: a torch state dict (read with weights_only=True) or a .safetensors file, as a state dict."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import WeightsError
from ..fsutil import read_torch_file


def file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist", "pass {any}")
    if path.suffix == ".safetensors":
        return load_state_file(path, WeightsError)
    state = read_torch_file(path, "weights file", WeightsError)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a transferlab checkpoint or a similar wrapper
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} is not a state dict of tensors")
    return state


def load_state_file(path: Path, error: type[Exception]) -> dict[str, torch.Tensor]:
    """A `.safetensors` file as a state dict."""
    try:
        from safetensors.torch import load_file  # only a .safetensors weights file needs it
    except ImportError:
        raise error(f"weights file {path} is .safetensors, but the safetensors package is not installed") from None
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: one line
        raise error(f"weights file {path} is not a readable safetensors file ({type(exc).__name__})") from None
