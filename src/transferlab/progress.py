"""Progress bars (rich): rate and ETA on every long loop, silent when disabled or not a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Logs redirected to a file keep whole lines (rich would wrap them at 80 columns).
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _columns():
    return (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[cyan]{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )


class Bar:
    """A thin handle over one rich task: advance(n), info(text)."""

    def __init__(self, progress: Progress | None, task, unit: str):
        self._progress, self._task, self._unit = progress, task, unit

    def advance(self, n: int = 1) -> None:
        if self._progress is None:
            return
        self._progress.advance(self._task, n)
        speed = self._progress.tasks[self._task].speed
        self._progress.update(self._task, rate=f"{speed:,.0f} {self._unit}/s" if speed else "")

    def info(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, info=text)


@contextmanager
def bar(total: int, description: str, *, unit: str = "it", enabled: bool = True) -> Iterator[Bar]:
    """A bar on a terminal; off one (a log file, a pipe, CI) none: the run's own lines say how it goes."""
    if not enabled or not console.is_terminal:
        yield Bar(None, None, unit)
        return
    with Progress(*_columns(), console=console, transient=False, refresh_per_second=4) as progress:
        task = progress.add_task(description, total=total, rate="", info="")
        yield Bar(progress, task, unit)


def track(items: Iterable, *, total: int, description: str, unit: str = "img", enabled: bool = True) -> Iterator:
    with bar(total, description, unit=unit, enabled=enabled) as b:
        for item in items:
            yield item
            b.advance()


def log(text: str) -> None:
    """A line of a long job's log (a study's), stamped with the time."""
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}", highlight=False)
