"""What a report shows, as typed records: a study's data read from its storage (load.py fills it), and the blocks
(headings, paragraphs, tables, figures) the sections make of it, which write.py renders as Markdown and HTML."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..study.records import Selection, StudyRecord, TrialRecord


@dataclass
class Block:
    kind: str  # "h2", "h3", "p", "table", "figure", "code"
    text: str = ""
    rows: list[list[str]] = field(default_factory=list)  # tables: first row is the header
    png: bytes = b""


@dataclass
class StudyData:
    name: str
    spec: dict  # the recorded spec tree, its storage password removed
    command: str
    trials: list[TrialRecord]  # the current spec's complete trials (a search's: its complete ones), by number
    grid: dict[str, list]  # the axes trials differ in (a search's searched options included)
    test: Selection | None  # the selected trial; its test figures unless there was no test split
    n_test_evaluations: int
    environment: dict
    n_older: int = 0  # complete trials of earlier specs in the storage (not shown)
    n_stale: int = 0  # trials queued by an earlier spec that a worker found waiting and did not run
    directory: Path | None = None
    record: StudyRecord = field(default_factory=StudyRecord)  # cwd, software, last_run, spec_path ...
    lr_found: list[dict] = field(default_factory=list)  # lr = "find": {label, key, lr, finding (the range test)}
    searches: list[SearchData] = field(default_factory=list)  # a spec with [search]: one per grid point


@dataclass
class SearchData:
    """One search of the study as its Optuna study holds it (study/search.py)."""

    name: str
    label: str  # its grid point's key, or "all"
    point: dict
    trials: list[TrialRecord]  # every trial, all states
    importances: dict[str, float] | None  # Optuna's parameter importances, or None with `no_importances` saying why
    no_importances: str = ""
    constant: list[str] = field(default_factory=list)  # searched options all its complete trials share a value of


def _figure(blocks: list[Block], caption: str, png: bytes | None) -> None:
    """Append a figure block (none when there is nothing to draw)."""
    if png:
        blocks.append(Block("figure", caption, png=png))
