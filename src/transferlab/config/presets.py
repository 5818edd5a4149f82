"""Recipes in one flag (fastai's fine_tune, AutoGluon's presets): `--preset fast | fine-tune | best`.

A preset fills the options it names that the run leaves unset where the preset is given (the same flags, --config
file or [run] table); anything given there wins. The recipes are studies/best.toml's, measured on CIFAR-10 in
docs/best.md (frozen 80.1%, partial 86.1% on the test split), with two changes for photo folders of a few hundred
images: batch size 64 (so an epoch is several steps, not one), and the resolution left to the backbone (its
pretrained input size) unless the run sets one. A preset's name is recorded with the run; the run is identified by
the values it resolves to, so a preset and the same options spelt out are one run.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

# best.toml's [run]: cross-entropy with smoothing, flips and flip TTA, the MLP head, AdamW with a cosine schedule
_COMMON: dict[str, Any] = {
    "loss": "ce", "label_smoothing": 0.1, "flip": True, "tta_flip": True, "head": "mlp", "optimizer": "adamw",
    "lr": 1e-3, "weight_decay": 0.05, "schedule": "cosine", "warmup_epochs": 1, "batch_size": 64,
}  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    # the head alone on cached frozen features: minutes on a CPU (best.toml's frozen variant)
    "fast": {**_COMMON, "strategy": "frozen", "dropout": 0.2, "epochs": 12},
    # the head first, then the last two groups one at a time with discriminative rates (best.toml's partial variant,
    # with full's 0.8 rate decay per group)
    "fine-tune": {
        **_COMMON,
        "strategy": "partial",
        "unfreeze": 2,
        "gradual_unfreeze": 1,
        "lr_group_decay": 0.8,
        "epochs": 10,
    },  # fmt: skip
    # every layer, random crops, a lower peak rate decaying 0.8 per group towards the input (best.toml's full variant)
    "best": {**_COMMON, "strategy": "full", "crop_padding": 4, "lr": 5e-4, "lr_group_decay": 0.8, "epochs": 30},
}


def with_preset(given: dict[str, Any], where: str = "") -> dict[str, Any]:
    """`given` (option -> value, keys as fields) with its preset's values under it; unchanged without a preset. A
    preset that is no name (a TOML list or table) is refused in one line naming the choices."""
    name = given.get("preset")
    if name is not None and not isinstance(name, str):  # ["fast"], {a = 1}: not a key of PRESETS, maybe unhashable
        raise ConfigError(f"{where}preset = {name!r}: expected one of {', '.join(PRESETS)} (one name, as a string)")
    if name is None or name not in PRESETS:  # an unknown name is refused with the other choices (RunConfig.validate)
        return given
    return {**PRESETS[name], **given}
