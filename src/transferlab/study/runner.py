"""Running a study: create or resume it, run every trial still to do (here and in worker processes), select, test
once, report. `run_study` and `run_worker` are the library entry points the CLI calls."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback

from ..config.metrics import higher_is_better
from ..config.study import StudySpec
from ..engine.device import resolve_device
from ..errors import StudyError, WeightsError
from ..fsutil import exclusive
from ..progress import log
from ..report.write import write_report
from ..urls import hide, password_of, redact, without_password
from ..version import build_info
from . import liveness
from .liveness import grace_seconds
from .plan import Job, enqueue_missing
from .records import StudyRecord
from .search import Search, complete_trials, plan_searches, run_searches, verify_searches
from .select import select_and_test
from .storage import (
    PASSWORD_ENV,
    default_url,
    lock_path,
    open_storage,
    require_existing,
    resolve_url,
    save_study_name,
    save_url,
    storage_errors,
)
from .worker import Worker


def study_directory(spec: StudySpec, study_dir: str | Path | None) -> Path:
    return Path(study_dir) if study_dir else Path("studies-out") / spec.name


def open_study(spec: StudySpec, url: str, lock: Path) -> optuna.Study:
    """Create or load the study; `lock` serialises processes creating a new SQLite file's tables at once."""
    # ERROR: a failed trial's exception reaches the CLI, which says it in one line; optuna would add a traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats are documented
    heartbeat = {"heartbeat_interval": liveness.HEARTBEAT_SECONDS, "grace_period": grace_seconds()}
    direction = "maximize" if higher_is_better(spec.metric) else "minimize"
    creating = url.startswith("sqlite") and lock.parent.is_dir()
    with exclusive(lock) if creating else contextlib.nullcontext():
        storage = open_storage(url, **heartbeat, heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback())
        with storage_errors(url):
            return optuna.create_study(study_name=spec.name, storage=storage, direction=direction, load_if_exists=True)


def _prepare(spec_path, study_dir, storage, overrides, create: bool = True):
    """(spec, study directory, storage URL (password in memory only), study), opened before anything is written: a
    bad storage leaves no trace. Without `create` (a worker) the study must exist already."""
    spec = StudySpec.load(spec_path, overrides)
    for device in {spec.config_for(point, lr_unused=True).device for point in spec.points()}:
        resolve_device(device)  # cuda where there is none: one line before anything is written, not a failed trial
    directory = study_directory(spec, study_dir)
    url = resolve_url(directory, storage, spec.storage, spec.storage_password_env)
    sys.argv[:] = [hide(arg, url) for arg in sys.argv]  # runs record their command line (metrics.json)
    if not create:
        require_existing(url)
        with storage_errors(url):
            if spec.name not in optuna.get_all_study_names(open_storage(url)):
                raise StudyError(f"no study {spec.name!r} in {redact(url)}: create it with `transferlab study run`")
    if url == default_url(directory):
        directory.mkdir(parents=True, exist_ok=True)  # where the SQLite file goes
    study = open_study(spec, url, lock_path(url, directory))
    directory.mkdir(parents=True, exist_ok=True)
    return spec, directory, url, study


@contextlib.contextmanager
def spec_advice():
    """Errors whose fix is a run option say how a study sets it (its spec, --set), not how `train` does."""
    try:
        yield
    except WeightsError as error:
        raise error.for_study() from None


def work(worker: Worker, searches: list[Search], wait_for_others: bool) -> None:
    """The grid's waiting trials, then the searches' (a spec with [search] queues no grid point)."""
    worker.run(wait_for_others)
    if worker.spec.search is not None:
        verify_searches(worker.study, searches)
        run_searches(worker, searches, wait_for_others)


def run_worker(spec_path, *, study_dir=None, storage=None, overrides=(), wait_for_others: bool = False) -> None:
    """Join an existing study and work through its waiting trials."""
    with spec_advice():
        spec, directory, url, study = _prepare(spec_path, study_dir, storage, overrides, create=False)
        with storage_errors(url):
            worker = Worker(spec, directory, study)
            work(worker, plan_searches(worker), wait_for_others)


def record_spec(study: optuna.Study, spec: StudySpec, spec_path, url: str, jobs: list[Job], searches=()) -> None:
    """The current spec, how it was run (no password), the identities of its grid points and its searches."""
    source = dict(spec.source)
    if "storage" in source:
        source["storage"] = redact(str(source["storage"]))
    from_cli = sys.argv and "transferlab" in sys.argv[0]
    command = shlex.join(["transferlab", *sys.argv[1:]]) if from_cli else f"run_study({str(spec_path)!r})"
    StudyRecord.write(
        study, spec=source, spec_path=str(spec_path), command=hide(command, url),
        cwd=os.getcwd(),  # relative paths in the spec are relative to it
        software=build_info(), identities=sorted({i for job in jobs for i in job.identities.values()}),
        searches=[s.record() for s in searches],
    )  # fmt: skip


def start_workers(n: int, spec_path, directory: Path, url: str, overrides) -> list[subprocess.Popen]:
    """n worker processes; the storage password, if any, travels in their environment, not on their command line."""
    threads = max(1, (os.cpu_count() or 1) // (n + 1))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if password_of(url):
        env[PASSWORD_ENV] = password_of(url)
    cmd = [sys.executable, "-m", "transferlab.cli", "study", "worker", str(spec_path), "--dir", str(directory)]
    cmd += ["--storage", without_password(url)]
    for text in overrides:
        cmd += ["--set", hide(text, url)]  # --storage above wins over a storage= override
    torch.set_num_threads(threads)
    return [subprocess.Popen(cmd, env=env) for _ in range(n)]


def run_study(spec_path, *, study_dir=None, storage=None, workers: int = 1, overrides=(), report: bool = True) -> Path:
    """Create or resume the study, run everything still to do, select, test once, report."""
    if workers < 1:
        raise StudyError(f"--workers {workers}: expected 1 or more worker processes")
    with spec_advice():
        return _run_study(spec_path, study_dir, storage, workers, overrides, report)


def _run_study(spec_path, study_dir, storage, workers: int, overrides, report: bool) -> Path:
    started = time.time()
    spec, directory, url, study = _prepare(spec_path, study_dir, storage, overrides)
    save_url(directory, url)
    save_study_name(directory, spec.name)
    with storage_errors(url):
        worker = Worker(spec, directory, study)
        found_lr = worker.find_learning_rates(lock_path(url, directory))  # before the plan: identities hold the rates
        jobs = worker.plan()
        searches = plan_searches(worker)
        record_spec(study, spec, spec_path, url, jobs, searches)
        StudyRecord.write(study, lr_found=found_lr)
        added = enqueue_missing(study, jobs, lock_path(url, directory))
        if searches:
            what = f"{len(searches)} searches, one per grid point" if len(searches) > 1 else "one search"
            log(f"study {spec.name}: {what}; storage {redact(url)}")
        else:
            log(
                f"study {spec.name}: {len(spec.points())} grid points as {len(jobs)} runs; {added} queued now; "
                f"storage {redact(url)}"
            )
        procs = start_workers(workers - 1, spec_path, directory, url, overrides) if workers > 1 else []
        try:
            work(worker, searches, wait_for_others=True)
        finally:
            for p in procs:
                p.wait()
        for p in procs:
            if p.returncode:
                raise StudyError(f"a worker process exited with status {p.returncode}")
        if searches:
            candidates = [t for search in searches for t in complete_trials(search.study)]
            select_and_test(study, spec, directory, candidates=candidates)
        else:
            select_and_test(study, spec, directory, {i for job in jobs for i in job.identities.values()})
        finished = time.time()
        StudyRecord.write(study, last_run={
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(finished)),
            "wall_seconds": finished - started,
            "load_seconds": worker.load_seconds,
        })  # fmt: skip
        if report:
            for path in write_report(directory, storage=url, study_name=spec.name):
                log(f"wrote {path}")
    return directory
