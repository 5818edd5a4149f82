"""Search: a study spec's [search] table runs an Optuna search per grid point instead of one trial per point.

The specification, as tests on synthetic data (3 classes x 12 coloured-noise PNGs of 16 px, 1-3 epochs):
  * [search] is validated at load, one line naming the cause (exit 2 from the CLI): unknown keys (in [search] or
    [search.space]), an unknown sampler or pruner, low >= high, log with low <= 0, n_trials 0, neither n_trials nor
    timeout, an option both on the grid and searched, a listed value that is not a valid value of its option;
  * a search runs until n_trials of its trials have finished (or its trials have taken `timeout` seconds); each
    trial's config is its grid point's plus the sampled values, its run directory named by its identity; the best
    complete trial is selected and the test split evaluated once; running the study again trains nothing; a worker
    whose spec, data or weights differ from those recorded does not join;
  * with a [grid], each grid point has its own Optuna study (named from the study and the point) in the same storage,
    whose trials all train at that point;
  * the pruner's verdict stops a run after an epoch, cleanly: the trial is pruned, what it trained recorded, its
    run resumable no more; pruned trials count towards n_trials and are never selected, even when their metric is
    the best; the median pruner never judges the first trials of a search or a trial's first epochs;
  * an interrupted search continues: finished trials are never trained again, new trials propose new values, and
    the total reaches n_trials; a trial killed with its worker (kill -9) is retried with the same parameters and
    resumes from its run's state.pt; a trial whose run directory another process is training in is skipped, not
    trained a second time there, and counts nowhere;
  * the report has a Search section: counts, best so far against trial number and time, Optuna's parameter
    importances (or why there are none), the pruned trials and the selected trial's parameters.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from helpers import (
    SEARCH,
    assert_one_line_error,
    kill,
    search_spec,
    study_tree,
    subprocess_env,
    wait_for,
)

from transferlab.cli import main
from transferlab.config.search import SearchRange, SearchSpec
from transferlab.config.study import StudySpec
from transferlab.errors import ConfigError
from transferlab.study import liveness
from transferlab.study import search as search_module
from transferlab.study import worker as worker_module
from transferlab.study.identity import slug
from transferlab.study.runner import run_study
from transferlab.study.storage import resolve_url

RUN_TRAINING = worker_module.run_training
COMPLETE, PRUNED, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL


def storage_url(directory: Path) -> str:
    return resolve_url(directory, None)


def main_study(directory: Path) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = (directory / "study.txt").read_text().strip()
    return optuna.load_study(study_name=name, storage=storage_url(directory))


def search_studies(directory: Path) -> dict[str, optuna.Study]:
    """grid point key -> that point's search study (as the study recorded them)."""
    records = main_study(directory).user_attrs["searches"]
    url = storage_url(directory)
    return {r["key"]: optuna.load_study(study_name=r["name"], storage=url) for r in records}


def fit_calls(monkeypatch, fail_after: int | None = None) -> list:
    """Count the study's trainings (the configs they train); raise instead after `fail_after` of them."""
    calls = []

    def training(config, *args, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise RuntimeError("interrupted by the test")
        calls.append(config)
        return RUN_TRAINING(config, *args, **kwargs)

    monkeypatch.setattr(worker_module, "run_training", training)
    return calls


# ---------------------------------------------------------------------------- bad input: one line, exit 2
@pytest.mark.parametrize(
    "search, space, grid, fragment",
    [
        ({**SEARCH, "n_trial": 3}, None, None, "[search] unknown key 'n_trial' (did you mean 'n_trials'?)"),
        (None, {"lrr": [0.1]}, None, "[search.space] unknown key 'lrr' (did you mean 'lr'?)"),
        ({**SEARCH, "sampler": "cmaes"}, None, None, "sampler = 'cmaes': expected one of tpe, random, grid, qmc"),
        ({**SEARCH, "pruner": "asha"}, None, None, "pruner = 'asha': expected one of median, hyperband, none"),
        (None, {"lr": {"low": 0.1, "high": 0.01}}, None, "lr: low = 0.1 must be below high = 0.01"),
        (None, {"lr": {"low": 0.0, "high": 0.1, "log": True}}, None, "lr: log = true needs low > 0"),
        ({**SEARCH, "n_trials": 0}, None, None, "n_trials = 0: expected a whole number >= 1"),
        ({"sampler": "random"}, None, None, "needs n_trials, timeout or both"),
        ({**SEARCH, "timeout": -5}, None, None, "timeout = -5: expected seconds > 0"),
        (None, None, {"lr": [0.01]}, "lr: lr is also a [grid] axis"),
        (None, {"strategy": ["frozen", "partly"]}, None, "strategy = 'partly': expected one of"),
        (None, {"batch_size": [8, 0]}, None, "batch_size = 0: must be >= 1"),
        (None, {"dropout": {"low": 0.0, "high": 1.5}}, None, "dropout = 1.5: must be <= 0.99"),
        (None, {"strategy": {"low": 0, "high": 1}}, None, "a range needs a numeric option"),
        (None, {"resolution": {"low": 24.5, "high": 40}}, None, "resolution: low = 24.5: expected a whole number"),
        (None, {"lr": {"low": 0.1, "high": 0.2, "stride": 1}}, None, "unknown key 'stride' in its range"),
        (None, {"lr": {"low": 0.0, "high": 1.0, "step": 0.3}}, None, "is not a multiple of step"),
        (None, {"metric": ["val_loss"]}, None, "metric picks the study's best trial"),
        (None, {"progress": [True, False]}, None, "progress cannot change a trial's result"),
        (None, {"lr": [0.1, 0.1]}, None, "lr: value 0.1 is given twice"),
        ({**SEARCH, "sampler": "grid"}, None, None, "sampler = 'grid' needs countable values: give lr a step"),
        ({**SEARCH, "seed": -1}, None, None, "seed = -1"),
        (SEARCH, {}, None, "has no [search.space]"),
    ],
)
def test_bad_search_input_is_one_line_and_exit_2(tmp_path, capsys, search, space, grid, fragment):
    spec = search_spec(tmp_path / "s.toml", tmp_path / "images", tmp_path / "cache", search, space, grid)
    study_dir = tmp_path / "study"
    assert main(["study", "run", str(spec), "--dir", str(study_dir), "--no-report"]) == 2
    assert_one_line_error(capsys.readouterr(), str(spec), fragment)
    assert not study_dir.exists()


def test_a_searched_option_set_by_a_variant_is_refused(tmp_path):
    spec = search_spec(tmp_path / "s.toml", tmp_path, tmp_path, grid={"variant": ["a", "b"]})
    spec.write_text(spec.read_text() + "\n[variants]\na = {}\nb = { lr = 0.1 }\n")
    with pytest.raises(Exception, match=r"lr is also set by \[variants.b\]"):
        StudySpec.load(spec)


def test_ranges_are_typed_by_their_option(tmp_path):
    space = {
        "lr": {"low": 0, "high": 1},  # whole-number bounds of a float option: still a float range
        "resolution": {"low": 32, "high": 64, "step": 16},
        "dropout": {"low": 0.0, "high": 0.5, "step": 0.1},
        "flip": [True, False],
    }
    spec = StudySpec.load(search_spec(tmp_path / "s.toml", tmp_path, tmp_path, SEARCH, space))
    lr, resolution, dropout = (spec.search.space[k] for k in ("lr", "resolution", "dropout"))
    assert not lr.integer and (lr.low, lr.high) == (0.0, 1.0) and lr.values() is None
    assert resolution.integer and resolution.values() == [32, 48, 64]
    assert dropout.values() == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert spec.search.grid_values() is None  # lr has no step ...
    spec = StudySpec.load(search_spec(tmp_path / "t.toml", tmp_path, tmp_path, {**SEARCH, "sampler": "grid"},
                                      {k: v for k, v in space.items() if k != "lr"}))  # fmt: skip
    assert spec.search.target() == 3  # ... without it the grid has 3 x 6 x 2 = 36 points, n_trials caps it at 3


# ---------------------------------------------------------------------------- samplers and the pruners' warm-up
@pytest.mark.parametrize("sampler", ["tpe", "random", "qmc", "grid"])
def test_every_sampler_proposes_values_inside_the_space(sampler):
    space = {"lr": {"low": 1e-4, "high": 1e-1, "log": True}, "resolution": {"low": 32, "high": 64, "step": 16},
             "flip": [True, False]}  # fmt: skip
    if sampler == "grid":
        space["lr"] = [1e-3, 1e-2]
    settings = SearchSpec.from_dict(
        {"sampler": sampler, "n_trials": 6, "space": space}, lambda v, at: v, grid={}, variants={}, where=""
    )
    study = optuna.create_study(direction="maximize")
    seen = []
    for n in range(6):
        study.sampler = search_module.make_sampler(settings, n)
        trial = study.ask()
        params = search_module.suggest(trial, settings.space)
        study.tell(trial, params["resolution"])
        seen.append(tuple(params.values()))
        assert 1e-4 <= params["lr"] <= 1e-1 and params["resolution"] in (32, 48, 64) and params["flip"] in (True, False)
    assert len(set(seen)) > 1  # a sampler made afresh per trial does not repeat its first proposal


def add_complete(study, values: dict[int, float]) -> None:
    study.add_trial(
        optuna.trial.create_trial(
            state=COMPLETE,
            value=max(values.values()),
            intermediate_values=values,
            params={"lr": 0.01},
            distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1.0)},
        )
    )


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_the_pruner_spares_the_first_trials_and_epochs(pruner):
    settings = SearchSpec({"lr": SearchRange(1e-4, 1.0)}, pruner=pruner, startup_trials=2, warmup_epochs=1)
    study = optuna.create_study(direction="maximize", pruner=search_module.make_pruner(settings, epochs=9))

    def verdicts() -> list[bool]:
        """A hopeless trial's verdict after each of its first three epochs."""
        trial, out = study.ask(), []
        for epoch in (1, 2, 3):
            trial.report(0.01, epoch)
            out.append(trial.should_prune())
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return out

    add_complete(study, {1: 0.9, 2: 0.95, 3: 0.97})
    assert verdicts() == [False, False, False]  # one complete trial: still starting up
    add_complete(study, {1: 0.8, 2: 0.9, 3: 0.96})
    assert verdicts()[0] is False  # the first epoch is never judged
    if pruner == "median":
        assert verdicts() == [False, True, True]  # behind the median of the complete trials
    assert search_module.make_pruner(SearchSpec({}, pruner="none"), 9).prune(study, study.trials[-1]) is False


# ---------------------------------------------------------------------------- a whole search, once for the module
@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    spec = search_spec(root / "search.toml", study_tree(root / "images"), root / "cache", epochs=2)
    directory = run_study(spec, study_dir=root / "out", report=True)
    return spec, directory


def test_a_search_finishes_n_trials_and_tests_its_best_complete_trial_once(searched):
    _, directory = searched
    (search,) = search_studies(directory).values()
    assert search.study_name.startswith("searched/search#")
    trials = search.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [COMPLETE] * 3
    for t in trials:
        a = t.user_attrs
        assert a["kind"] == "search" and a["params"] == t.params and a["point"] == t.params
        assert a["config"]["lr"] == t.params["lr"] and a["config"]["dropout"] == t.params["dropout"]
        assert a["run_dir"] == f"trials/{slug(a['key'], a['job'])}" and (directory / a["checkpoint"]).is_file()
        assert t.intermediate_values == {r["epoch"]: r["val_accuracy"] for r in a["history"]} and len(a["history"]) == 2
        assert not (directory / a["run_dir"] / "state.pt").exists()
    assert len({t.user_attrs["identity"] for t in trials}) == 3
    main = main_study(directory)
    (record,) = main.user_attrs["test_evaluations"]
    best = max(trials, key=lambda t: (t.value, -t.number))
    assert (record["identity"], record["trial"], record["val_accuracy"]) == (
        best.user_attrs["identity"], best.number, best.user_attrs["best"]["val_accuracy"])  # fmt: skip
    assert main.user_attrs["selected"]["point"] == best.params


def test_running_a_finished_search_again_trains_and_tests_nothing(searched, tmp_path, monkeypatch):
    import shutil

    from transferlab.study import select

    spec, directory = searched
    copy = tmp_path / "again"
    shutil.copytree(directory, copy)
    calls = fit_calls(monkeypatch)
    monkeypatch.setattr(select, "analyze_split", lambda *a, **k: pytest.fail("tested again"))
    run_study(spec, study_dir=copy, report=False)
    assert calls == []
    (search,) = search_studies(copy).values()
    assert len(search.trials) == 3 and len(main_study(copy).user_attrs["test_evaluations"]) == 1


def test_the_report_has_the_search_section(searched):
    _, directory = searched
    text = (directory / "report.md").read_text()
    section = text.split("## Search\n")[1].split("\n## ")[0]
    assert "| all | 3 | 0 | 0 | 0 |" in section
    assert "Best val_accuracy so far per search" in section
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section):
        assert (directory / target).is_file()
    importances = section.split("### Parameter importances")[1].split("###")[0]
    assert re.search(r"\| lr \| [0-9.]+ \|", importances)  # three complete trials with varied values
    assert "No trial was pruned or diverged." in section
    chosen = section.split("### Selected trial's parameters")[1].split("###")[0]
    selected = main_study(directory).user_attrs["selected"]
    assert f"| lr | {selected['point']['lr']:.4g} | searched: log range 0.001 .. 0.03 |" in chosen
    assert f"| dropout | {selected['point']['dropout']:.4g} | searched: one of 0.0, 0.3 |" in chosen
    assert "## Results per regime" in text and "### Regime: frozen" not in text  # no per-setting seed tables
    shown = re.findall(r"\blr = ([^,)|\s]+)", text)  # settings in tables: sampled floats at 4 significant digits
    assert shown and all(v == f"{float(v):.4g}" for v in shown), shown


def test_a_worker_with_another_spec_does_not_join_the_search(searched, capsys):
    spec, directory = searched
    (search,) = search_studies(directory).values()
    args = ["study", "worker", str(spec), "--dir", str(directory)]
    assert main(args) == 0  # the same spec: nothing left to do
    assert "search all: 3 trials finished" in capsys.readouterr().err
    assert main(args + ["--set", "search.space.lr={low = 0.002, high = 0.03, log = true}"]) == 2
    assert_one_line_error(capsys.readouterr(), "search all: the spec, data or weights here differ")
    assert len(search.trials) == 3 and len(optuna.get_all_study_names(storage_url(directory))) == 2


def test_a_timeout_ends_a_search_once_its_trials_have_taken_that_long(tmp_path):
    spec = search_spec(tmp_path / "s.toml", study_tree(tmp_path / "images"), tmp_path / "cache",
                       {"sampler": "random", "timeout": 0.001, "pruner": "none"})  # fmt: skip
    directory = run_study(spec, study_dir=tmp_path / "out", report=False)
    (search,) = search_studies(directory).values()
    assert [t.state for t in search.trials] == [COMPLETE]  # the first trial starts; after it the time is spent
    run_study(spec, study_dir=directory, report=False)
    assert len(search.trials) == 1  # and stays spent when the study runs again


# ---------------------------------------------------------------------------- a search per grid point
def test_each_grid_point_has_its_own_search_study(tmp_path):
    spec = search_spec(tmp_path / "s.toml", study_tree(tmp_path / "images"), tmp_path / "cache",
                       {"sampler": "tpe", "n_trials": 2, "pruner": "median"}, {"lr": {"low": 1e-3, "high": 3e-2}},
                       grid={"strategy": ["frozen", "full"]})  # fmt: skip
    directory = run_study(spec, study_dir=tmp_path / "out")
    searches = search_studies(directory)
    assert set(searches) == {"strategy=frozen", "strategy=full"}
    names = set(optuna.get_all_study_names(storage_url(directory)))
    assert names == {"searched", *(s.study_name for s in searches.values())}
    for key, search in searches.items():
        assert search.study_name.startswith(f"searched/search/{key}#")
        trials = search.get_trials(deepcopy=False)
        assert [t.state for t in trials] == [COMPLETE] * 2
        for t in trials:
            strategy = key.split("=")[1]
            assert t.user_attrs["config"]["strategy"] == strategy and t.user_attrs["point"]["strategy"] == strategy
    selected = main_study(directory).user_attrs["selected"]
    everything = [t for s in searches.values() for t in s.trials]
    assert selected["val_accuracy"] == max(t.value for t in everything)
    text = (directory / "report.md").read_text()
    assert "| strategy=frozen | 2 | 0 | 0 | 0 |" in text and "| strategy=full | 2 | 0 | 0 | 0 |" in text
    assert "| strategy | " in text.split("### Selected trial's parameters")[1] and "| grid point |" in text


# ---------------------------------------------------------------------------- pruning
class PruneLr(optuna.pruners.BasePruner):
    """Prunes, after its first epoch, every trial of this learning rate: the verdict is known in advance."""

    def __init__(self, lr: float):
        self.lr = lr

    def prune(self, study, trial) -> bool:
        return trial.params["lr"] == self.lr


def test_pruned_trials_stop_cleanly_count_and_are_never_selected(tmp_path, monkeypatch):
    monkeypatch.setattr(search_module, "make_pruner", lambda settings, epochs: PruneLr(0.05))
    # lr 0.05 learns the colours at once; lr 0 never learns: the pruned trial is the better one
    spec = search_spec(tmp_path / "s.toml", study_tree(tmp_path / "images"), tmp_path / "cache",
                       {"sampler": "grid", "n_trials": 2, "pruner": "median"}, {"lr": [0.05, 0.0]},
                       epochs=3)  # fmt: skip
    calls = fit_calls(monkeypatch)
    directory = run_study(spec, study_dir=tmp_path / "out")
    assert len(calls) == 2
    (search,) = search_studies(directory).values()
    by_lr = {t.params["lr"]: t for t in search.trials}
    pruned, complete = by_lr[0.05], by_lr[0.0]
    assert (pruned.state, complete.state) == (PRUNED, COMPLETE)
    a = pruned.user_attrs
    assert (a["stopped"], a["stopped_at"], len(a["history"])) == ("pruned", 1, 1)
    assert pruned.intermediate_values == {1: a["history"][0]["val_accuracy"]}
    assert a["history"][0]["val_accuracy"] > complete.value  # the better trial, yet pruned ...
    run_dir = directory / a["run_dir"]
    assert not (run_dir / "state.pt").exists()
    assert '"finished": false' in (run_dir / "metrics.json").read_text()
    selected = main_study(directory).user_attrs["selected"]
    assert selected["identity"] == complete.user_attrs["identity"]  # ... and never selected
    text = (directory / "report.md").read_text()
    pruned_section = text.split("### Pruned trials")[1].split("\n## ")[0]
    assert "| all | 1 | 1 (1) | 0 |" in pruned_section
    assert "| all | 0 | lr=0.05 | 1 |" in pruned_section or "| all | 1 | lr=0.05 | 1 |" in pruned_section
    assert "pruned after epoch 1 of 3" in pruned_section
    # two finished trials (one pruned) are the n_trials: nothing runs again
    calls.clear()
    run_study(spec, study_dir=directory, report=False)
    assert calls == [] and len(search.trials) == 2


def test_a_diverged_trial_is_pruned_not_a_failed_study(tmp_path):
    spec = search_spec(tmp_path / "s.toml", study_tree(tmp_path / "images"), tmp_path / "cache",
                       {"sampler": "grid", "n_trials": 2, "pruner": "none"}, {"lr": [0.05, 1e36]},
                       epochs=2)  # fmt: skip
    directory = run_study(spec, study_dir=tmp_path / "out", report=True)
    (search,) = search_studies(directory).values()
    by_lr = {t.params["lr"]: t for t in search.trials}
    assert by_lr[0.05].state == COMPLETE and by_lr[1e36].state == PRUNED
    assert by_lr[1e36].user_attrs["stopped"] == "diverged" and "diverged" in by_lr[1e36].user_attrs["reason"]
    assert main_study(directory).user_attrs["selected"]["identity"] == by_lr[0.05].user_attrs["identity"]
    assert "| all | 0 | - | 1 |" in (directory / "report.md").read_text()


# ---------------------------------------------------------------------------- resuming
def test_an_interrupted_search_continues_without_redoing_a_finished_trial(tmp_path, monkeypatch):
    spec = search_spec(tmp_path / "s.toml", study_tree(tmp_path / "images"), tmp_path / "cache",
                       {"sampler": "random", "n_trials": 4, "pruner": "none"})  # fmt: skip
    fit_calls(monkeypatch, fail_after=2)
    with pytest.raises(RuntimeError, match="interrupted by the test"):
        run_study(spec, study_dir=tmp_path / "out", report=False)
    directory = tmp_path / "out"
    (search,) = search_studies(directory).values()
    before = {t.number: (t.state, t.datetime_complete, t.user_attrs.get("identity")) for t in search.trials}
    assert [state for state, _, _ in before.values()] == [COMPLETE, COMPLETE, FAIL]

    calls = fit_calls(monkeypatch)
    run_study(spec, study_dir=directory, report=False)
    assert len(calls) == 2  # only the two missing trials trained
    trials = search.get_trials(deepcopy=False)
    for number, (state, completed, _) in before.items():
        if state == COMPLETE:
            assert (trials[number].state, trials[number].datetime_complete) == (state, completed)
    complete = [t for t in trials if t.state == COMPLETE]
    assert len(complete) == 4 and len({t.user_attrs["identity"] for t in complete}) == 4  # new values, not repeats
    trained = {(c.lr, c.dropout) for c in calls}
    assert not trained & {(t.params["lr"], t.params["dropout"]) for t in trials[:2]}
    calls.clear()
    run_study(spec, study_dir=directory, report=False)
    assert calls == []


def test_a_run_directory_is_claimed_by_one_process_at_a_time(tmp_path):
    from transferlab.fsutil import claimed

    lock = tmp_path / "run" / ".lock"
    with claimed(lock) as first:
        with claimed(lock) as second:
            assert (first, second) == (True, False)
    with claimed(lock) as again:
        assert again


def test_a_trial_whose_run_directory_another_worker_holds_is_skipped_not_trained(tmp_path, monkeypatch):
    import contextlib

    from transferlab.engine import rundir

    denied, real = [], rundir.claimed

    @contextlib.contextmanager
    def claimed_elsewhere_once(lock_file):  # the first run folder asked for is held by another process
        denied.append(lock_file)
        if len(denied) == 1:
            yield False
            return
        with real(lock_file) as mine:
            yield mine

    monkeypatch.setattr(rundir, "claimed", claimed_elsewhere_once)
    spec = search_spec(tmp_path / "s.toml", study_tree(tmp_path / "images"), tmp_path / "cache",
                       {"sampler": "random", "n_trials": 1, "pruner": "none"})  # fmt: skip
    calls = fit_calls(monkeypatch)
    directory = run_study(spec, study_dir=tmp_path / "out", report=False)
    (search,) = search_studies(directory).values()
    skipped, trained = search.trials
    assert skipped.state == PRUNED and skipped.user_attrs["skipped"] == "another worker is training the same parameters"
    assert "history" not in skipped.user_attrs  # it found the folder held and trained nothing
    assert trained.state == COMPLETE and len(calls) == 2  # the skipped one counts nowhere: one trial still wanted


@pytest.mark.slow
def test_a_killed_search_trial_is_retried_with_its_parameters_and_resumes(tmp_path, monkeypatch, capfd):
    spec = search_spec(tmp_path / "s.toml", study_tree(tmp_path / "images"), tmp_path / "cache",
                       {"sampler": "random", "n_trials": 1, "pruner": "none"}, {"lr": {"low": 1e-3, "high": 1e-2}},
                       strategy="full", epochs=12, batch_size=16)  # fmt: skip
    directory = tmp_path / "out"
    state_file = lambda: next(iter((directory / "trials").glob("*/state.pt")), None)  # noqa: E731
    with open(tmp_path / "killed.log", "w") as log:
        command = [sys.executable, "-m", "transferlab.cli", "study", "run", str(spec), "--dir", str(directory)]
        proc = subprocess.Popen(command + ["--no-report"], stdout=log, stderr=subprocess.STDOUT, env=subprocess_env())
        try:
            wait_for(state_file, 120, proc, "the trial's first epoch")
        finally:
            kill(proc)
    (search,) = search_studies(directory).values()
    (killed,) = search.trials
    assert killed.state == optuna.trial.TrialState.RUNNING
    capfd.readouterr()
    monkeypatch.setattr(liveness, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(liveness, "GRACE_SECONDS", 2)
    time.sleep(3)  # past the grace period: the rerun finds the killed trial stale at once
    run_study(spec, study_dir=directory, report=False)
    assert re.search(r"resuming from epoch [1-9]", capfd.readouterr().err)
    killed, retry = search.get_trials(deepcopy=False)
    assert (killed.state, retry.state) == (FAIL, COMPLETE)
    assert retry.params == killed.params and retry.user_attrs["identity"] == killed.user_attrs["identity"]
    assert retry.system_attrs["failed_trial"] == killed.number
    assert [r["epoch"] for r in retry.user_attrs["history"]] == list(range(1, 13))
    assert state_file() is None
    assert len(main_study(directory).user_attrs["test_evaluations"]) == 1


@pytest.mark.parametrize(
    "extra, fragment",
    [({"repeat": 2}, "repeated seeds or folds"), ({"folds": 3}, "repeated seeds or folds"),
     ({"grid": {"seed": [0, 1]}}, "repeated seeds or folds"),
     ({"run": {"weights": "none", "lr": "find"}}, 'lr and lr = "find"')],
)  # fmt: skip
def test_a_search_is_refused_with_replicates_or_a_found_lr(extra, fragment):
    tree = {"run": {"weights": "none"}, "grid": {"strategy": ["frozen"]},
            "search": {"n_trials": 2, "space": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}}}  # fmt: skip
    with pytest.raises(ConfigError, match=fragment):
        StudySpec.from_dict({**tree, **extra})
