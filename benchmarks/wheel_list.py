"""What a prepared CUDA environment lacks to run transferlab and its GPU check: one `name==version` a line.

    .venv/bin/python benchmarks/wheel_list.py [--present NAME ...]

Run in the development environment (every dependency installed, at constraints.txt's versions); benchmarks/
make_wheels.sh downloads the list. It is transferlab's declared requirements (extras left out) and the check's own
(pytest), with everything they require in turn, less what such an environment has: by default torch, torchvision,
timm, scikit-learn, rich and matplotlib (issue 14's example of one) and, again, all they require (numpy, pillow,
scipy, PyYAML, huggingface_hub, tqdm, Jinja2 and MarkupSafe, ...). --present names more packages it has. Last, the
build backend as pyproject.toml declares it (setuptools), which pip installs into transferlab's build environment.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import sys
import tomllib
from pathlib import Path

PRESENT = ("torch", "torchvision", "timm", "scikit-learn", "rich", "matplotlib")
CHECK_NEEDS = ("pytest",)  # the check runs the tests


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements_of(name: str) -> list[str]:
    """The installed distribution's requirements that apply here without extras."""
    from packaging.requirements import Requirement

    out = []
    for text in metadata.requires(name) or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            out.append(requirement.name)
    return out


def closure(names) -> set[str]:
    """The names and every distribution they require, transitively (those installed here)."""
    seen: set[str] = set()
    todo = [canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [canonical(r) for r in requirements_of(name)]
        except metadata.PackageNotFoundError:
            raise SystemExit(
                f"wheel_list: {name} is not installed here: run it in the development environment"
            ) from None
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--present", nargs="*", default=[], help="more packages the target environment has")
    args = parser.parse_args(argv)
    have = closure([*PRESENT, *args.present])
    need = closure([*requirements_of("transferlab"), *CHECK_NEEDS]) - have
    for name in sorted(need):
        print(f"{name}=={metadata.version(name)}")
    # the build backend, as declared: pip builds transferlab in an isolated environment from the same folder
    build = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["build-system"]
    print(*build["requires"], sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
