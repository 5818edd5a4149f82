"""Side-by-side speed: a plain PyTorch loop (the official tutorials' way) vs transferlab, per regime.

    .venv/bin/python benchmarks/speed.py --data ../shared/datasets/cifar10-train-jpeg \
        --weights ../shared/weights/squeezenet1_1-imagenet-features.pth --resolutions 32 128 --epochs 10 --limit 5000

Each measurement runs in its own subprocess so that peak resident memory (ru_maxrss of the process
and, for the baseline, of its DataLoader workers) belongs to that configuration alone. Both sides
train on the same images (transferlab's stratified split of `--limit` images), with the same model,
optimiser (AdamW, lr 1e-3), loss (cross-entropy), batch size, resolution and epochs, and both
evaluate the validation split after every epoch. transferlab is timed twice: with an empty feature
cache (the time includes computing the frozen features), and again with the cache filled, as every
later trial of a study that shares the frozen prefix sees it. Decoding the JPEG folder into its
array cache is a one-off reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


def split_indices(args):
    from transferlab import RunConfig, load_images, make_split, resolve

    config = resolve(RunConfig(data=args.data, limit=args.limit, progress=False, cache_dir=args.cache_dir))
    images = load_images(config)
    split = make_split(
        images.labels,
        test_fraction=config.test_fraction,
        val_fraction=config.val_fraction,
        seed=config.split_seed,
        limit=config.limit,
    )
    return split


def run_baseline(args) -> dict:
    """What a user writes from the tutorials: ImageFolder + transforms + DataLoader(num_workers=2) + the usual loop."""
    import torch
    import torchvision
    from torch import nn
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms

    from transferlab.models.backbone import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    split = split_indices(args)
    steps = [transforms.Resize(args.resolution)] if args.resolution != 32 else []
    transform = transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = torchvision.datasets.ImageFolder(args.data, transform=transform)
    train_loader = DataLoader(
        Subset(dataset, split.train.tolist()), batch_size=args.batch_size, shuffle=True, num_workers=2
    )
    val_loader = DataLoader(Subset(dataset, split.val.tolist()), batch_size=args.batch_size, num_workers=2)

    model = torchvision.models.squeezenet1_1()
    state = torch.load(args.weights, weights_only=True)
    model.load_state_dict({k: v for k, v in state.items() if k.startswith("features.")}, strict=False)
    model.classifier = nn.Sequential(
        nn.Dropout(0.5), nn.Conv2d(512, 10, 1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1)
    )
    trainable = {"frozen": ["classifier"], "partial": ["features.11", "features.12", "classifier"], "full": [""]}[
        args.regime
    ]
    for name, p in model.named_parameters():
        p.requires_grad = any(name.startswith(t) for t in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    criterion = nn.CrossEntropyLoss()

    started = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = criterion(torch.flatten(model(x), 1), y)
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += (torch.flatten(model(x), 1).argmax(1) == y).sum().item()
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "train_images_per_s": args.epochs * len(split.train) / wall,
        "val_accuracy": correct / len(split.val),
    }


def run_transferlab(args) -> dict:
    from transferlab import RunConfig, resolve
    from transferlab.engine.train import run_training

    config = resolve(
        RunConfig(
            data=args.data,
            weights=args.weights,
            strategy=args.regime,
            resolution=args.resolution,
            epochs=args.epochs,
            batch_size=args.batch_size,
            limit=args.limit,
            progress=False,
            optimizer="adamw",
            lr=1e-3,
            cache_dir=args.cache_dir,
        )
    )
    from transferlab.data import load_images

    images = load_images(config)  # decoded-array cache: warm (decoding is the separate one-off below)
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as features:
        from transferlab.engine.features import FeatureCache

        cache = FeatureCache(Path(features))
        started = time.perf_counter()
        result = run_training(config, out, images=images, feature_cache=cache, log=lambda _: None)
        wall = time.perf_counter() - started
        # The same run again, as the next trial of a study sees it: the frozen features are already cached.
        started = time.perf_counter()
        run_training(config, Path(out) / "again", images=images, feature_cache=cache, log=lambda _: None)
        wall_warm = time.perf_counter() - started
    n_images = args.epochs * len(split_indices(args).train)
    return {
        "wall_s": wall,
        "train_images_per_s": n_images / wall,
        "wall_warm_s": wall_warm,
        "train_images_per_s_warm": n_images / wall_warm,
        "val_accuracy": result.history[-1]["val_accuracy"],
        "input_path": result.feature_path,
    }


def run_decode(args) -> dict:
    from transferlab.data import load_image_folder

    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        load_image_folder(args.data, Path(cache), progress=False)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        load_image_folder(args.data, Path(cache), progress=False)
        warm = time.perf_counter() - started
    return {"decode_cold_s": cold, "cache_load_s": warm}


def child(args) -> None:
    result = {"decode": run_decode, "baseline": run_baseline, "transferlab": run_transferlab}[args.kind](args)
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


def measure(args, kind: str, regime: str, resolution: int, epochs: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--regime",
        regime,
        "--resolution",
        str(resolution),
        "--epochs",
        str(epochs),
        "--data",
        args.data,
        "--weights",
        args.weights,
        "--batch-size",
        str(args.batch_size),
        "--cache-dir",
        args.cache_dir,
    ]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((s for s in out.stdout.splitlines() if s.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{kind} {regime} {resolution}px failed:\n{out.stderr[-2000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--regimes", nargs="+", default=["frozen", "partial", "full"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--full-epochs-128",
        type=int,
        default=None,
        help="fewer epochs for the slow full regime above 32 px (images/s is per epoch)",
    )
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--limit", type=int, default=5000)
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "transferlab-bench-cache"))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--regime", help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.kind = args.child
        child(args)
        return

    import torch

    print(
        f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print(f"# command: {' '.join(sys.argv)}")
    decode = measure(args, "decode", "frozen", 32, 1)
    print(
        f"# one-off: decoding the JPEG folder {decode['decode_cold_s']:.1f} s; "
        f"loading the decoded cache {decode['cache_load_s']:.2f} s"
    )
    rows = []
    print(
        "| px | regime | epochs | baseline img/s | transferlab img/s (cold cache) | ratio "
        "| transferlab img/s (warm cache) | ratio | baseline wall s | transferlab wall s cold / warm "
        "| baseline peak RSS MiB | transferlab peak RSS MiB | transferlab input |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for resolution in args.resolutions:
        for regime in args.regimes:
            epochs = (
                args.full_epochs_128 if (regime == "full" and resolution > 32 and args.full_epochs_128) else args.epochs
            )
            base = measure(args, "baseline", regime, resolution, epochs)
            ours = measure(args, "transferlab", regime, resolution, epochs)
            ratio = ours["train_images_per_s"] / base["train_images_per_s"]
            ratio_warm = ours["train_images_per_s_warm"] / base["train_images_per_s"]
            rows.append(
                {
                    "resolution": resolution,
                    "regime": regime,
                    "epochs": epochs,
                    "baseline": base,
                    "transferlab": ours,
                    "ratio": ratio,
                    "ratio_warm": ratio_warm,
                }
            )
            print(
                f"| {resolution} | {regime} | {epochs} | {base['train_images_per_s']:.0f} "
                f"| {ours['train_images_per_s']:.0f} | {ratio:.1f}x | {ours['train_images_per_s_warm']:.0f} "
                f"| {ratio_warm:.1f}x | {base['wall_s']:.1f} | {ours['wall_s']:.1f} / {ours['wall_warm_s']:.1f} "
                f"| {base['peak_rss_mib']:.0f} | {ours['peak_rss_mib']:.0f} | "
                f"{ours['input_path']} |",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"decode": decode, "rows": rows, "argv": sys.argv}, indent=1))


if __name__ == "__main__":
    main()
