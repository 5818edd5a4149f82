"""What a study trial is: its grid point, and one fingerprint of everything that trains it.

A trial's identity is its grid point plus a fingerprint (config.identity) of the run config's result fields, the
data's fingerprint and the pretrained weights' identity: a changed spec trains the changed points and reuses the
others, and an option added to RunConfig later joins every identity without an edit here.
"""

from __future__ import annotations

import re
from typing import Any

from ..config.identity import fingerprint, identity
from ..config.run import RunConfig
from ..config.study import point_key
from ..models.weights import weights_identity


def slug(key: str, identity: str) -> str:
    """A run directory's name: the key, readable and truncated, then a fingerprint of the identity (unique)."""
    readable = re.sub(r"[^A-Za-z0-9_.=,-]+", "_", key).replace(",", "__")[:120]
    return f"{readable}-{fingerprint(identity, length=12)}"


def training_fingerprint(config: RunConfig, data_key: str, leave_out=(), **extra) -> str:
    """A fingerprint of everything that trains `config` (but the fields in `leave_out`), and of `extra`. The config
    has its backbone's defaults filled in (models.resolve)."""
    return fingerprint({"config": identity(config, leave_out=leave_out), "data": data_key,
                        "weights": weights_identity(config.arch, config.weights), **extra})  # fmt: skip


def trial_identity(point: dict[str, Any], config: RunConfig, data_key: str) -> str:
    """The grid point plus a fingerprint of everything that trains it: the run config, the data, the weights."""
    return f"{point_key(point)}#{training_fingerprint(config, data_key)}"


def data_identity(config: RunConfig) -> dict[str, Any]:
    """The settings that make two trials' configs read the same decoded images, given one storage size (a study
    decodes once at the largest its trials on the same data need: plan.study_storage_size)."""
    return identity(config, sections=("data",), leave_out=("storage_size",))
