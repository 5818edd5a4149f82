#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs into a prepared CUDA environment that lacks them (there is no package
# index there). Run it on a machine with one, from the repository root, once the development environment exists
# (`make install`):
#
#   bash benchmarks/make_wheels.sh [FOLDER]        (default: wheels; then copy FOLDER beside the checkout there)
#
# The list is benchmarks/wheel_list.py's: transferlab's requirements and pytest, with all they require, less what the
# environment has (torch, torchvision, timm, scikit-learn, rich, matplotlib and their own requirements), at the
# versions of the development environment (constraints.txt): optuna, alembic, SQLAlchemy, Mako, colorlog, grad-cam,
# ttach, opencv-python-headless, pytest, iniconfig, pluggy, ... Settings:
#   PRESENT      more packages the target has, left out (e.g. "opencv-python-headless pytest")
#   PY_VERSION   the target's Python (default 3.12); wheels are for CPython on x86-64 Linux (manylinux)
#   VENV_PYTHON  the development environment's Python (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-wheels}
PY_VERSION=${PY_VERSION:-3.12}
VENV_PYTHON=${VENV_PYTHON:-.venv/bin/python}
[ -x "$VENV_PYTHON" ] || { echo "make_wheels: no $VENV_PYTHON: run 'make install' first (or set VENV_PYTHON)" >&2; exit 2; }

# shellcheck disable=SC2086
mapfile -t PINS < <("$VENV_PYTHON" benchmarks/wheel_list.py --present ${PRESENT:-})
[ ${#PINS[@]} -gt 0 ] || { echo "make_wheels: nothing is missing" >&2; exit 0; }
echo "make_wheels: ${PINS[*]}"
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$tag")
done
mkdir -p "$DEST"
PIP=("$VENV_PYTHON" -m pip --disable-pip-version-check --quiet)
for pin in "${PINS[@]}"; do
    if ! "${PIP[@]}" download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        "${PLATFORMS[@]}" -d "$DEST" "$pin" 2>/dev/null; then
        # published as source only (grad-cam, ttach): build the wheel here; fine for pure Python, refused otherwise
        built=$(mktemp -d)
        "${PIP[@]}" wheel --no-deps -w "$built" "$pin"
        for wheel in "$built"/*.whl; do
            case "$wheel" in
                *-py3-none-any.whl | *-py2.py3-none-any.whl) mv "$wheel" "$DEST"/ ;;
                *) echo "make_wheels: $pin builds a platform wheel ($(basename "$wheel")): build it on the target" >&2
                    exit 1 ;;
            esac
        done
        rm -rf "$built"
    fi
done
echo "make_wheels: $(find "$DEST" -name '*.whl' | wc -l) wheels in $DEST ($(du -sh "$DEST" | cut -f1)):"
ls "$DEST"
