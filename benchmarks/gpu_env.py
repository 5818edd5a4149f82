"""The GPU check's environment step (benchmarks/gpu_check.sh): what this Python has, and whether it can run transferlab.

    python benchmarks/gpu_env.py [--require-cuda] [--json FILE]

Prints Python, torch and its CUDA build, the GPU (name, compute capability, memory, bf16 support), cuDNN, Triton,
and each of transferlab's declared requirements with the version installed here. Exit status 1 when transferlab is
not installed, a requirement is missing or outside its declared range, or (--require-cuda) no CUDA device is usable.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import platform
import sys


def requirement_rows() -> list[dict]:
    """transferlab's requirements (extras left out) with the installed version and whether it satisfies them."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement

    rows = []
    for text in metadata.requires("transferlab") or []:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an extra's requirement, or one for another platform
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            version = None
        ok = version is not None and requirement.specifier.contains(version, prereleases=True)
        rows.append({"name": requirement.name, "declared": str(requirement.specifier), "installed": version, "ok": ok})
    return rows


def describe() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpus=torch.cuda.device_count(),
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require-cuda", action="store_true", help="fail when no CUDA device is usable")
    parser.add_argument("--json", help="also write everything printed as JSON to this file")
    args = parser.parse_args(argv)
    info = describe()
    for key, value in info.items():
        print(f"{key:>17}: {value}")
    problems = []
    try:
        info["transferlab"] = metadata.version("transferlab")
        rows = requirement_rows()
    except metadata.PackageNotFoundError:
        info["transferlab"], rows = None, []
        problems.append("transferlab is not installed (pip install --no-deps -e .)")
    print(f"{'transferlab':>17}: {info['transferlab']}")
    for row in rows:
        mark = "ok" if row["ok"] else "NOT SATISFIED"
        print(f"  {row['name']:<14} declared {row['declared'] or '(any)':<16} installed {row['installed']}  {mark}")
        if not row["ok"]:
            problems.append(f"{row['name']} {row['installed'] or 'missing'} (declared {row['declared'] or 'any'})")
    info["requirements"] = rows
    if args.require_cuda and not info["cuda_available"]:
        problems.append("no CUDA device is usable from this torch")
    info["problems"] = problems
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(info, handle, indent=1)
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
