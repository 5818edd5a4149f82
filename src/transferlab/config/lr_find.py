"""The lr range test's own settings (engine/lr_find.py): their defaults and their checks, light enough for --help."""

from __future__ import annotations

import math

from ..errors import ConfigError

START_LR, END_LR, STEPS = 1e-7, 10.0, 100
MIN_STEPS = 10


def check_range(start_lr: float, end_lr: float, steps: int) -> None:
    """The test's settings, refused in one line when they cannot make a curve."""
    for name, value in (("start_lr", start_lr), ("end_lr", end_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} = {value!r}: expected a positive learning rate")
    if start_lr >= end_lr:
        raise ConfigError(f"start_lr = {start_lr:g} must be below end_lr = {end_lr:g}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < MIN_STEPS:
        raise ConfigError(f"steps = {steps!r}: expected a whole number of at least {MIN_STEPS}")
