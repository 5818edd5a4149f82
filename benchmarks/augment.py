"""The accuracy effect of each training augmentation on a real data set: the same recipe, split, seed and test images,
one augmentation added at a time, each test accuracy beside its paired difference from the baseline.

    .venv/bin/python benchmarks/augment.py --data ../shared/datasets/cifar10-train-jpeg \
        --weights ../shared/weights/squeezenet1_1-imagenet-features.pth --out /tmp/augment

The recipe is `--preset best`'s (every layer trains; AdamW, cosine, label smoothing, flips, flip TTA) at a side and a
number of images a CPU trains in minutes. The baseline has flips only; each variant adds one augmentation. Intervals:
Wilson 95% of test sampling for an accuracy; for a difference, the paired 95% interval over the same test images
(McNemar's discordant pairs, normal approximation): one split and one seed, so seed-to-seed variation is not in it.
Writes results.json and table.md into --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from transferlab import RunConfig, load_checkpoint, load_images, train
from transferlab.data.split import split_arrays
from transferlab.engine.rundir import RunDir, checkpoint_file
from transferlab.models.registry import resolve
from transferlab.scoring.stats import percent_with_interval

VARIANTS = {
    "flips (baseline)": {},
    "+ random crop, 4 px padding": {"crop_padding": 4},
    "+ RandomResizedCrop 0.35": {"random_resized_crop": 0.35},
    "+ TrivialAugment": {"auto_augment": "trivialaugment"},
    "+ RandAugment": {"auto_augment": "randaugment"},
    "+ mixup 0.8 / cutmix 1.0": {"mixup": 0.8, "cutmix": 1.0},
    "+ RRC 0.35, TrivialAugment, mixup / cutmix": {
        "random_resized_crop": 0.35,
        "auto_augment": "trivialaugment",
        "mixup": 0.8,
        "cutmix": 1.0,
    },  # fmt: skip
}


def correct_on_test(run_dir: Path, config: RunConfig) -> np.ndarray:
    """Per test image of the run's own split: did the best checkpoint classify it right?"""
    loaded = load_checkpoint(checkpoint_file(run_dir), "cpu")
    data = load_images(config, loaded.info["storage_size"])
    images, labels = split_arrays(data, RunDir(run_dir).split(), "test")
    logits = loaded.view_logits(images).mean(0)
    return (logits.argmax(1) == torch.as_tensor(labels)).numpy()


def paired_difference(base: np.ndarray, other: np.ndarray) -> str:
    n, gained, lost = len(base), int((~base & other).sum()), int((base & ~other).sum())
    diff = (gained - lost) / n
    half = 1.96 * math.sqrt(gained + lost - (gained - lost) ** 2 / n) / n
    return f"{100 * diff:+.1f} pp ({100 * (diff - half):+.1f} to {100 * (diff + half):+.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    common = dict(data=args.data, weights=args.weights, preset="best", crop_padding=0, resolution=args.resolution,
                  epochs=args.epochs, limit=args.limit, val_fraction=0.1, test_fraction=0.3, device="cpu",
                  progress=False)  # fmt: skip
    for name, options in VARIANTS.items():
        if (args.only and name not in args.only) or name in results:
            continue
        config = resolve(RunConfig.from_dict({**common, **options}))
        run_dir = out / f"run{list(VARIANTS).index(name)}"
        started = time.time()
        result = train(config, run_dir, overwrite=True)
        seconds = time.time() - started
        correct = correct_on_test(run_dir, config)
        results[name] = {"options": options, "seconds": seconds, "best_epoch": result.best_epoch,
                         "val_accuracy": result.best["val_accuracy"],
                         "correct": correct.astype(int).tolist()}  # fmt: skip
        results_file.write_text(json.dumps(results))
    base = np.asarray(results["flips (baseline)"]["correct"], bool) if "flips (baseline)" in results else None
    rows = ["| training augmentation | test accuracy (95% CI) | vs baseline, paired 95% CI | best epoch | minutes |",
            "|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        correct = np.asarray(r["correct"], bool)
        diff = "" if base is None or name == "flips (baseline)" else paired_difference(base, correct)
        accuracy = percent_with_interval(int(correct.sum()), len(correct))
        rows.append(f"| {name} | {accuracy} | {diff} | {r['best_epoch']} | {r['seconds'] / 60:.1f} |")
    table = "\n".join(rows)
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    (out / "table.md").write_text(f"{machine}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
