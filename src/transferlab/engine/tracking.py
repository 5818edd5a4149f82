"""Optional experiment tracking (`--log mlflow,tensorboard`): the trainer calls a Tracker at three points.

start(config) before the first epoch, log_epoch(row) after each (the row metrics.json's history holds), and
finish(artifacts) once the run is complete. The default Tracker does nothing. MLflow writes to
MLFLOW_TRACKING_URI when set, else to <out>/mlflow.db and <out>/mlartifacts (never the network by default); TensorBoard
writes event files to <out>/tensorboard. Each package is imported only when asked for.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path

from ..config.run import RunConfig
from ..errors import ConfigError, first_line
from ..urls import hide, redact, sqlite_url
from .rundir import MLFLOW_DB


class Tracker:
    """No tracking; the interface the trainer calls."""

    def start(self, config: RunConfig) -> None:
        pass

    def log_epoch(self, row: dict) -> None:
        pass

    def finish(self, artifacts: dict[str, Path]) -> None:
        pass


def _require(module: str, extra: str):

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"--log {extra} needs the {extra} package: pip install 'transferlab[{extra}]'") from None


def _numbers(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))}


DATABASE_TIMEOUT = 10  # seconds to wait for a tracking database to answer


def _check_database(uri: str) -> None:
    """A database tracking URI whose driver is missing or whose server does not answer: one ConfigError line."""
    from sqlalchemy import create_engine  # only --log mlflow with a database URI checks it
    from sqlalchemy.engine import make_url  # as above

    try:
        url = make_url(uri)
    except Exception:  # noqa: BLE001 - not a database URL (a server, a folder): MLflow judges it
        return
    backend = url.get_backend_name()
    if backend not in ("postgresql", "mysql", "mssql", "oracle"):  # a server, a folder, SQLite: MLflow judges it
        return
    timeout = {"connect_timeout": DATABASE_TIMEOUT} if backend in ("postgresql", "mysql") else {}
    where = f"--log mlflow: MLFLOW_TRACKING_URI={redact(uri)}"
    try:
        engine = create_engine(uri, connect_args=timeout)
    except ImportError as error:
        raise ConfigError(f"{where} needs the {backend} driver {error.name or ''}, which is not installed") from None
    except Exception as error:  # noqa: BLE001 - an unknown dialect, a malformed URL
        raise ConfigError(f"{where} is not a usable database URL: {hide(first_line(error), uri)}") from None
    try:
        with engine.connect():
            pass
    except Exception as error:  # noqa: BLE001 - refused, unknown host, wrong password: the driver's first line
        raise ConfigError(f"{where}: the database does not answer: {hide(first_line(error), uri)}") from None
    finally:
        engine.dispose()


def _check_server(uri: str) -> None:
    """A tracking server (http, https) that does not answer within DATABASE_TIMEOUT seconds: one ConfigError line."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests  # only --log mlflow with a server URI checks it

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=DATABASE_TIMEOUT)
    except requests.RequestException as error:
        raise ConfigError(
            f"--log mlflow: MLFLOW_TRACKING_URI={redact(uri)}: the server does not answer "
            f"({type(error).__name__}); start it, or unset the variable (the run folder's mlflow.db)"
        ) from None


class MlflowTracker(Tracker):
    def __init__(self, out_dir: Path):
        _require("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient  # optional extra: only --log mlflow needs it

        self.out_dir = out_dir
        # The default is MLflow's own advice (its file store is in maintenance mode and refuses to start): a SQLite
        # database in the run directory, and the artefacts beside it rather than in the working directory.
        self.uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.artifact_location = None
        if not self.uri:
            self.uri = sqlite_url(out_dir.resolve() / MLFLOW_DB)
            self.artifact_location = (out_dir.resolve() / "mlartifacts").as_uri()
        else:  # before MLflow, which retries an unreachable database or server for minutes
            _check_database(self.uri)
            _check_server(self.uri)
            if self.uri.startswith("sqlite:"):  # a local database: its artefacts beside the run, not in the cwd
                self.artifact_location = (out_dir.resolve() / "mlartifacts").as_uri()
        try:  # not the fluent API: leaves the caller's active run alone; a search opens the store now, not mid-run
            self.client = MlflowClient(tracking_uri=self.uri)
            self.client.search_experiments(max_results=1)
        except Exception as error:  # noqa: BLE001 - a file store, a bad URI, a server's refusal: one line each
            text = first_line(error)
            if "maintenance mode" in text:
                text = "MLflow no longer accepts a folder (file store) as its tracking store"
            raise ConfigError(f"--log mlflow: cannot use MLFLOW_TRACKING_URI={redact(self.uri)}: "
                              f"{hide(text, self.uri)}; point it at a database (sqlite:///path/mlflow.db) or a "
                              "server, or unset it (the run "
                              "folder's mlflow.db)") from None  # fmt: skip
        self.run_id: str | None = None

    def start(self, config: RunConfig) -> None:
        from mlflow.entities import Param  # optional extra: only --log mlflow needs it

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "transferlab")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else self.client.create_experiment(name, artifact_location=self.artifact_location)
        )
        run = self.client.create_run(
            experiment_id, run_name=self.out_dir.name, tags={"transferlab.out": str(self.out_dir.resolve())}
        )
        self.run_id = run.info.run_id
        params = [
            Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in config.to_dict().items()
        ]
        self.client.log_batch(self.run_id, params=params)

    def log_epoch(self, row: dict) -> None:
        from mlflow.entities import Metric  # optional extra: only --log mlflow needs it

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, row["epoch"]) for k, v in _numbers(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, artifacts: dict[str, Path]) -> None:
        # A checkpoint can be large: its path is recorded; the small JSON files are copied into the run.
        for name, path in artifacts.items():
            if path.suffix == ".json" and path.is_file():
                self.client.log_artifact(self.run_id, str(path))
            else:
                self.client.set_tag(self.run_id, f"transferlab.{name}", str(path.resolve()))
        self.client.set_terminated(self.run_id)


class TensorBoardTracker(Tracker):
    def __init__(self, out_dir: Path):
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter  # optional: only --log tensorboard needs it

        self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def start(self, config: RunConfig) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config.to_dict(), indent=1) + "\n```")

    def log_epoch(self, row: dict) -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def finish(self, artifacts: dict[str, Path]) -> None:
        self.writer.add_text("artifacts", "\n".join(f"{k}: {p.resolve()}" for k, p in artifacts.items()))
        self.writer.close()


class Trackers(Tracker):
    """Several trackers as one."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def start(self, config: RunConfig) -> None:
        for t in self.trackers:
            t.start(config)

    def log_epoch(self, row: dict) -> None:
        for t in self.trackers:
            t.log_epoch(row)

    def finish(self, artifacts: dict[str, Path]) -> None:
        for t in self.trackers:
            t.finish(artifacts)


TRACKER_CLASSES = {"mlflow": MlflowTracker, "tensorboard": TensorBoardTracker}


def make_tracker(config: RunConfig, out_dir: str | Path) -> Tracker:
    """The trackers config.log names (a ConfigError naming the pip extra when a package is missing)."""
    if not config.log:
        return Tracker()
    return Trackers([TRACKER_CLASSES[name](Path(out_dir)) for name in config.log])
