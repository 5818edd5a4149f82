"""--log mlflow / tensorboard: every run's config, per-epoch rows and files, read back with each tool's own reader."""

from __future__ import annotations

import sys

import pytest
from helpers import (
    assert_one_line_error,
    quiet,
    tiny_config,
    train_args,
)

from transferlab.cli import main
from transferlab.config.identity import identity
from transferlab.config.run import RunConfig
from transferlab.engine.tracking import Tracker, make_tracker
from transferlab.errors import ConfigError

ROW_KEYS = ["train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_f1", "lr"]


def tracked_run(image_tree, tmp_path, *log):
    from transferlab import train

    config = tiny_config(image_tree, tmp_path / "cache", epochs=2, log=list(log))
    return train(config, tmp_path / "run", log=quiet)


def test_mlflow_records_params_metrics_and_files(image_tree, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    result = tracked_run(image_tree, tmp_path, "mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("transferlab")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert (
        run.data.params["lr"] == "0.001" and run.data.params["epochs"] == "2" and run.data.params["log"] == '["mlflow"]'
    )
    for key in ROW_KEYS:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
        assert [m.value for m in history] == pytest.approx([row[key] for row in result.history]), key
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["metrics.json"]
    assert run.data.tags["transferlab.best.pt"] == str((tmp_path / "run" / "best.pt").resolve())
    assert list((tmp_path / "cwd").iterdir()) == []  # nothing written where the command ran


def test_mlflow_follows_the_tracking_uri(image_tree, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the user's own store keeps MLflow's default artifact root, ./mlruns: not the repo's
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    tracked_run(image_tree, tmp_path, "mlflow")
    assert not (tmp_path / "run" / "mlflow.db").exists()
    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name("mine")
    assert len(MlflowClient(tracking_uri=uri).search_runs([experiment.experiment_id])) == 1


def test_tensorboard_writes_the_scalars(image_tree, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = tracked_run(image_tree, tmp_path, "tensorboard")
    folder = tmp_path / "run" / "tensorboard"
    assert list(folder.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(folder))
    events.Reload()
    for key in ROW_KEYS:
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2], key
        assert [s.value for s in scalars] == pytest.approx([row[key] for row in result.history], rel=1e-6), key
    assert "config" in " ".join(events.Tags()["tensors"])


def test_log_option_values():
    assert RunConfig().log == [] and isinstance(make_tracker(RunConfig(), "x"), Tracker)
    assert RunConfig.from_dict({"log": "mlflow,tensorboard"}).log == ["mlflow", "tensorboard"]
    assert RunConfig.from_dict({"log": ["tensorboard", "tensorboard"]}).log == ["tensorboard"]
    assert RunConfig.from_dict({"log": "none"}).log == []
    with pytest.raises(ConfigError, match="'wandb' is not one of mlflow, tensorboard"):
        RunConfig.from_dict({"log": "wandb"})
    # where a run is also logged does not change its numbers: finished runs and study trials are still reused
    assert "log" not in identity(RunConfig.from_dict({"log": "mlflow"}), roles=("result", "record"))


@pytest.mark.parametrize("name", ["mlflow", "tensorboard"])
def test_a_missing_package_names_the_extra(name, image_tree, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    args = ["train", "--data", str(image_tree), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")]
    args += ["--weights", "none", "--device", "cpu", "--no-progress", "--log", name]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"transferlab: error: --log {name} needs the {name} package: pip install 'transferlab[{name}]'"
    assert not (tmp_path / "run" / "best.pt").exists()


# ---------------------------------------------------------------------------- tracebacks
@pytest.mark.parametrize(
    "uri, fragments",
    [
        ("file:///{tmp}/mlruns", ["file store"]),
        ("{tmp}/mlruns", ["file store"]),
        ("postgresql+psycopg2://u:Sekr3t@127.0.0.1:1/db", ["does not answer", "u:***@"]),
        ("mysql://u@127.0.0.1:1/db", ["driver", "not installed"]),
    ],
)
def test_mlflow_tracking_stores_that_cannot_work_are_one_line(uri, fragments, image_tree, tmp_path, monkeypatch,
                                                              capsys):  # fmt: skip
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp_path))
    assert main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--log", "mlflow")) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured, "--log mlflow", *fragments)
    assert "Sekr3t" not in captured.err and not (tmp_path / "run" / "metrics.json").exists()


# ---------------------------------------------------------------------------- found by a hostile tester
def test_an_unreachable_mlflow_server_is_one_line(image_tree, tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert main(train_args(image_tree, tmp_path / "run", tmp_path / "cache", "--log", "mlflow")) == 2
    assert_one_line_error(capsys.readouterr(), "--log mlflow", "does not answer")
