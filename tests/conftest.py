"""Shared fixtures: tiny synthetic ImageFolder trees, synthetic backbone weights, ../shared access.

Everything here is small on purpose (a few dozen 16-32 px images, squeezenet at 32 px, 1-3 epochs):
the whole core suite runs in a couple of minutes on two CPU cores.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from helpers import (
    NEEDS_POSTGRES,
    POSTGRES_URL,
    SHARED,
    SHARED_CIFAR,
    SHARED_WEIGHTS,
    TEST_DEVICE,
    make_image_tree,
    quiet,
    tiny_config,
)


def pytest_configure(config):
    # One intra-op thread: on two shared cores it is several times faster than two contending threads, and it
    # keeps float rounding fixed (MKL's dynamic threading may otherwise change it under load), so the
    # bit-for-bit determinism tests hold.
    torch.set_num_threads(1)
    if TEST_DEVICE not in ("cpu", "cuda"):
        pytest.exit(f"TRANSFERLAB_TEST_DEVICE={TEST_DEVICE!r}: expected cpu or cuda", returncode=4)
    if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.exit("TRANSFERLAB_TEST_DEVICE=cuda: no CUDA device is available here", returncode=4)


def pytest_report_header(config):
    return f"transferlab test device: {TEST_DEVICE} (TRANSFERLAB_TEST_DEVICE)"


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, tmp_path_factory):
    """No test reads the developer's env overrides or writes into ~/.cache/transferlab."""
    for name in ("TRANSFERLAB_WEIGHTS", "TRANSFERLAB_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path_factory.getbasetemp() / "default-cache"))


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> Path:
    """Read-only tree shared by the session: 3 classes x 15 PNGs of 24 px. Do not modify it in a test."""
    return make_image_tree(tmp_path_factory.mktemp("tree") / "images", per_class=15, size=24)


@pytest.fixture
def make_tree(tmp_path):
    """Factory for a private tree a test may modify: make_tree(name, **make_image_tree kwargs)."""

    def make(name: str = "images", **kwargs) -> Path:
        return make_image_tree(tmp_path / name, **kwargs)

    return make


@pytest.fixture(scope="session")
def features_weights(tmp_path_factory) -> Path:
    """A features-only squeezenet1_1 state dict (random initialisation), like ../shared's file."""
    from torchvision.models import squeezenet1_1

    torch.manual_seed(1234)
    state = {k: v for k, v in squeezenet1_1().state_dict().items() if k.startswith("features.")}
    path = tmp_path_factory.mktemp("weights") / "squeezenet1_1-features.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def trained_run(image_tree, tmp_path_factory):
    """One finished 2-epoch run on `image_tree` (linear head, so it actually learns); read-only."""
    from transferlab import train

    root = tmp_path_factory.mktemp("trained")
    config = tiny_config(image_tree, root / "cache", head="linear", lr=1e-2, epochs=2)
    result = train(config, root / "run", log=quiet)
    return result


@pytest.fixture(scope="session")
def calibration_tree(tmp_path_factory) -> Path:
    """Read-only: 4 classes x 60 noisy 16 px PNGs, enough validation images (72 at val_fraction 0.3) for a fitted
    temperature, and classes (grey among them) a 2-epoch run does not separate perfectly."""
    root = tmp_path_factory.mktemp("calibration") / "images"
    return make_image_tree(root, classes=("red", "green", "blue", "grey"), per_class=60, size=16, seed=3)


@pytest.fixture(scope="session")
def calibrated_run(calibration_tree, tmp_path_factory):
    """One finished 2-epoch run on `calibration_tree` whose temperature was fitted; read-only."""
    from transferlab import train

    root = tmp_path_factory.mktemp("calibrated")
    config = tiny_config(calibration_tree, root / "cache", head="linear", lr=1e-2, epochs=2, val_fraction=0.3)
    return train(config, root / "run", log=quiet)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the repository root (it may be absent: tests using it skip)."""
    return SHARED


def require_shared(*paths: Path) -> None:
    missing = [p for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"shared data not available: {missing[0]} is absent (tests marked 'shared' need ../shared)")


@pytest.fixture(scope="session")
def shared_cifar(shared_dir) -> Path:
    path = shared_dir / SHARED_CIFAR.relative_to(SHARED)
    require_shared(path)
    return path


@pytest.fixture(scope="session")
def shared_weights(shared_dir) -> Path:
    path = shared_dir / SHARED_WEIGHTS.relative_to(SHARED)
    require_shared(path)
    return path


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory) -> Path:
    """One decode cache for every shared-data test of the session (decoding the folder takes ~20 s)."""
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture
def database() -> str:
    """A fresh database on the test server; its URL. Dropped (connections and all) after the test."""
    if not POSTGRES_URL:
        pytest.skip(NEEDS_POSTGRES.kwargs["reason"])
    import psycopg2
    from sqlalchemy.engine import make_url

    server = make_url(POSTGRES_URL)
    name = f"transferlab_{uuid.uuid4().hex[:12]}"
    connect = dict(
        host=server.host,
        port=server.port,
        user=server.username,
        password=server.password,
        dbname=server.database or "postgres",
    )
    admin = psycopg2.connect(**{k: v for k, v in connect.items() if v is not None})
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield server.set(database=name).render_as_string(hide_password=False)
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


ONE_POINT_SPEC = """name = "s"
[run]
data = "{data}"
weights = "none"
resolution = 32
progress = false
cache_dir = "{cache}"
device = "cpu"
test_fraction = 0.2
val_fraction = 0.2
batch_size = 8
[grid]
epochs = [1]
"""


@pytest.fixture
def one_point_spec(image_tree, tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(ONE_POINT_SPEC.format(data=image_tree, cache=tmp_path / "cache"))
    return path
