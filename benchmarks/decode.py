"""Decoding and memory at scale: transferlab's folder loading and frozen runs on generated photo folders.

    .venv/bin/python benchmarks/decode.py --work /tmp/tl-bench --large 300 --done-when 1000 --sizes 2000 10000 40000

(a) decode throughput (images/s) and peak RSS: transferlab's `load_image_folder` (cold cache) vs the plain loop
    `np.asarray(Image.open(p).convert("RGB").resize((s, s)))` over the same folder of large JPEGs; with --old-src,
    also the code before bounded decoding (its whole-image decode, on a small subset that fits in memory);
(b) peak RSS of a `frozen` run at 128 px, weights none, 1 epoch, on folders of N generated 256 px JPEGs;
(c) a run whose decoded cache is larger than its anonymous (non-file) memory: the stored images stay in the
    memory-mapped file, which the kernel can drop and re-read, so the run's own memory does not hold them;
(d) the "done when" figure: a frozen 128 px run on >= 1,000 JPEGs of 3000 x 2000.

Every measurement runs in its own child process. Peak RSS is the child's ru_maxrss (os.wait4: that child only);
"peak anon" is the child's largest RssAnon (sampled every 20 ms from /proc/self/status), i.e. resident memory
not backed by a file: mapped cache pages the child has read count in RSS but not there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("c0", "c1", "c2", "c3", "c4")


# ------------------------------------------------------------------------------ generated data
def _photo(args) -> None:
    """One smooth, noisy, class-tinted JPEG: JPEG-compressible like a photo, different in every file."""
    path, width, height, label, seed = args
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 100), max(2, width // 100), 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC)).astype(np.int16)
    image += rng.integers(-8, 9, (height, 1, 3), dtype=np.int16)  # per-row grain: cheap, not flat
    image[..., label % 3] += 40 * (1 + label // 3)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_folder(root: Path, n: int, width: int, height: int) -> Path:
    if (root / "done").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    jobs = []
    for i in range(n):
        label = i % len(CLASSES)
        (root / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        jobs.append((root / CLASSES[label] / f"{i:06d}.jpg", width, height, label, i))
    started = time.perf_counter()
    with Pool(os.cpu_count() or 1) as pool:
        pool.map(_photo, jobs, chunksize=16)
    (root / "done").write_text(f"{time.perf_counter() - started:.1f} s\n")
    return root


def subset(source: Path, target: Path, n: int) -> Path:
    """The first n files of `source` (sorted), hard-linked into a folder of the same classes."""
    if target.exists():
        return target
    files = sorted(p for p in source.rglob("*.jpg"))[:n]
    for p in files:
        (target / p.parent.name).mkdir(parents=True, exist_ok=True)
        os.link(p, target / p.parent.name / p.name)
    return target


# ------------------------------------------------------------------------------ children
def _sample_anon(peak: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]))
        stop.wait(0.02)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def child(kind: str, options: dict) -> dict:
    if kind != "plain":
        import transferlab.data  # noqa: F401 - imports (torch among them) are not timed; their memory is reported
    peak, stop = [0], threading.Event()
    threading.Thread(target=_sample_anon, args=(peak, stop), daemon=True).start()
    out: dict = {"rss_after_imports_mib": _status_kib("VmRSS") / 1024}
    started = time.perf_counter()
    if kind == "transferlab":
        from transferlab.data import load_image_folder

        extra = {"storage_size": options["size"]} if options["size"] else {}
        images = load_image_folder(options["data"], Path(options["cache"]), progress=False, **extra)
        out.update(n=len(images), shape=list(images.images.shape), stored_bytes=int(images.images.nbytes))
    elif kind == "plain":
        size = options["size"]
        files = sorted(Path(options["data"]).rglob("*.jpg"))
        images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size))) for p in files])
        out.update(n=len(images), shape=list(images.shape), stored_bytes=int(images.nbytes))
    elif kind == "train":
        from transferlab import RunConfig, train

        config = RunConfig.from_dict({**options["config"], "progress": False})
        result = train(config, options["out"])
        decoded = next(Path(options["config"]["cache_dir"], "decoded").glob("folder-*/images.npy"))
        out.update(val_accuracy=result.best_val_accuracy, stored_bytes=decoded.stat().st_size)
    out["seconds"] = time.perf_counter() - started
    stop.set()
    out["peak_anon_mib"] = peak[0] / 1024
    return out


def measure(kind: str, options: dict, pythonpath: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath or os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(
        [sys.executable, __file__, "--child", kind, json.dumps(options)], stdout=subprocess.PIPE, env=env, text=True
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{kind} child failed (status {status}): {output[-2000:]}")
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    print(kind, json.dumps(options)[:160], "->", json.dumps(result), flush=True)
    return result


def fresh(path: Path) -> str:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return str(path)


def run_config(data: Path, cache: str, **values) -> dict:
    return {"data": str(data), "cache_dir": cache, "weights": "none", "strategy": "frozen", "resolution": 128,
            "epochs": 1, "batch_size": 250, "device": "cpu", **values}  # fmt: skip


# ------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/tl-bench", help="where the generated folders and caches go")
    parser.add_argument("--large", type=int, default=300, help="(a): large JPEGs decoded")
    parser.add_argument("--large-size", type=int, nargs=2, default=(3000, 2000), metavar=("W", "H"))
    parser.add_argument("--storage", type=int, default=128, help="(a): the side decoded to")
    parser.add_argument("--old-src", help="(a): a src/ folder of transferlab before bounded decoding")
    parser.add_argument("--old-n", type=int, default=60, help="(a): images the old code decodes (all kept whole)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[2000, 10000], help="(b): folder sizes N")
    parser.add_argument("--mapped-n", type=int, default=10000, help="(c): images stored at 256 px")
    parser.add_argument("--done-when", type=int, default=1000, help="(d): large JPEGs trained on (0: skip)")
    parser.add_argument("--parts", default="abcd", help="which measurements to run (default: abcd)")
    parser.add_argument("--old-runs", action="store_true", help="(b): also run each N with --old-src")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], json.loads(args.child[1]))))
        return
    work = Path(args.work)
    width, height = args.large_size
    rows: dict[str, list] = {"a": [], "b": [], "c": [], "d": []}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")

    large = make_folder(work / f"large-{width}x{height}-{max(args.large, args.done_when)}",
                        max(args.large, args.done_when), width, height)  # fmt: skip
    some = subset(large, work / f"large-{width}x{height}-first{args.large}", args.large)
    parts = args.parts
    if "a" in parts:
        cache = work / "cache-a"
        ours = measure("transferlab", {"data": str(some), "cache": fresh(cache), "size": args.storage})
        rows["a"].append(("transferlab (bounded decoding, threads)", args.large, ours))
        rows["a"].append(("plain loop", args.large, measure("plain", {"data": str(some), "size": args.storage})))
        if args.old_src:
            few = subset(large, work / f"large-{width}x{height}-first{args.old_n}", args.old_n)
            old = measure("transferlab", {"data": str(few), "cache": fresh(cache), "size": None}, args.old_src)
            rows["a"].append(("transferlab before (whole images)", args.old_n, old))
        shutil.rmtree(cache, ignore_errors=True)

    for n in args.sizes if "b" in parts else []:
        folder = make_folder(work / f"small-256-{n}", n, 256, 256)
        cache = fresh(work / "cache-b")
        rows["b"].append((n, measure("train", {"config": run_config(folder, cache), "out": fresh(work / "run")})))
        shutil.rmtree(cache, ignore_errors=True)
        if args.old_src and args.old_runs:
            options = {"config": run_config(folder, fresh(work / "cache-b")), "out": fresh(work / "run")}
            rows["b"].append((f"{n} (before)", measure("train", options, args.old_src)))
            shutil.rmtree(work / "cache-b", ignore_errors=True)

    if args.mapped_n and "c" in parts:
        folder = make_folder(work / f"small-256-{args.mapped_n}", args.mapped_n, 256, 256)
        cache = fresh(work / "cache-c")
        config = run_config(folder, cache, resolution=64, storage_size=256, cache_features="off")
        rows["c"].append((args.mapped_n, measure("train", {"config": config, "out": fresh(work / "run")})))
        shutil.rmtree(cache, ignore_errors=True)

    if args.done_when and "d" in parts:
        cache = fresh(work / "cache-d")
        done = measure("train", {"config": run_config(large, cache), "out": fresh(work / "run")})
        rows["d"].append((max(args.large, args.done_when), done))
        shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps(rows, default=str, indent=1))


if __name__ == "__main__":
    main()
