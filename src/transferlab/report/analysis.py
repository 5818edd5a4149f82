"""`transferlab analyze`: one checkpoint's figures on one split of some data (inference.analysis.analyze_images, plain
values) as a self-contained analysis.html (figures embedded), analysis.md and the PNG figures, in a folder of its
own. The blocks are the study report's error analysis and calibration (sections.py), for any split."""

from __future__ import annotations

import re
from pathlib import Path

from ..engine.rundir import RunDir, output_file
from ..errors import ConfigError, OutputError, one_line
from ..fsutil import atomic_write_text, refuse_output_over_input
from ..scoring.stats import percent_with_interval
from .data import Block
from .format import _like
from .sections import SplitFigures, calibration_blocks, error_analysis_blocks, small_sample_note
from .write import render_html, render_markdown

PAGE, MARKDOWN, FIGURES = "analysis.html", "analysis.md", "analysis_files"
INTERVALS = (
    "A 95% CI is the Wilson score interval of a proportion measured on that many images: how far the figure could "
    "move on another sample of the same size, so digits finer than it are not printed."
)


# ------------------------------------------------------------------------------ where it writes
def default_folder(checkpoint: str | Path) -> Path:
    """RUN_DIR/analysis for a run folder's best checkpoint; <name>-analysis beside any other checkpoint file."""
    checkpoint = Path(checkpoint)
    if RunDir(checkpoint.parent).best == checkpoint:
        return checkpoint.parent / "analysis"
    return checkpoint.with_name(f"{checkpoint.stem}-analysis")


def _within(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def analysis_folder(out: str | Path | None, checkpoint: str | Path, data: str) -> Path:
    """The folder analyze writes (`out`, else default_folder), checked before any figure is computed: a folder, not
    inside the image folder it reads (its PNGs would become images of that data), and none of the files it writes
    a run folder's own file (engine.rundir.output_file), the checkpoint or the data."""
    flag = "--out" if out else "the analysis folder"
    folder = Path(out).expanduser() if out else default_folder(checkpoint)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder} is a file: name a folder (analyze writes {PAGE} and its figures there)")
    source = Path(data).expanduser()
    if data != "cifar10" and source.is_dir() and _within(folder, source):
        raise ConfigError(f"{flag} {folder} is inside the data it analyses, {data}: its PNG figures would become "
                          "images of it; name a folder outside it with --out")  # fmt: skip
    if folder.is_dir():
        for name in (PAGE, MARKDOWN):
            path = output_file(folder / name, flag, ConfigError)
            refuse_output_over_input(path, [checkpoint, data], flag, ConfigError)
    return folder


# ------------------------------------------------------------------------------ the page
def analysis_blocks(analysis: dict) -> list[Block]:
    """What was analysed (checkpoint, data, split, images, notes) and its accuracy with its 95% interval, then the
    error analysis and calibration blocks of that split."""
    scores, split = analysis["scores"], analysis["split"]
    n, accuracy = scores["n"], scores["accuracy"]
    which = "every image of the data" if split == "all" else f"its {split} split"
    rows = [
        ["", "value"],
        ["checkpoint", analysis["checkpoint"]],
        ["model", f"{analysis['arch']}, its best epoch {analysis['epoch']}"],
        ["data", analysis["data"]],
        ["split", f"{split} ({which})"],
        ["images", str(n)],
        ["accuracy (95% CI)", percent_with_interval(round(accuracy * n), n)],
        ["balanced accuracy", _like(scores["balanced_accuracy"], accuracy, n)],
        ["macro-F1", _like(scores["macro_f1"], accuracy, n)],
        ["loss", f"{scores['loss']:.4f}"],
    ]
    blocks = [
        Block(
            "p",
            f"The checkpoint on {which}: {n} images of {analysis['data']}. {INTERVALS}"
            + small_sample_note(accuracy, n, "images" if split == "all" else f"{split} images"),
        ),
        Block("table", rows=rows),
    ]
    notes = list(analysis["notes"])
    if scores.get("ties"):
        notes.append(f"{scores['ties']} of these images have top classes the model scores equally (counted as the "
                     "first of them, by class order): their accuracy says nothing about the model")  # fmt: skip
    blocks += [Block("p", f"Note: {note}.") for note in notes]
    figures = SplitFigures(
        scores["classes"], scores["confusion_matrix"], scores["per_class"], analysis["errors"],
        analysis["calibration"], accuracy, n, split=split, model="the checkpoint", intervals=True,
    )  # fmt: skip
    return blocks + error_analysis_blocks(figures) + calibration_blocks(figures)


def write_analysis(analysis: dict, folder: Path) -> list[Path]:
    """analysis.html (self-contained), analysis.md and its figures (analysis_files/figureN.png) in `folder` (made if
    need be); figures an earlier analysis left beyond this one's are removed. Returns the page, the markdown and the
    figures' folder."""
    title = f"transferlab analysis: {analysis['checkpoint']} on {analysis['data']} ({analysis['split']})"
    blocks = analysis_blocks(analysis)
    figures = folder / FIGURES
    try:
        figures.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot make the analysis folder {figures}: {one_line(error)}") from None
    markdown = render_markdown(blocks, figures)
    drawn = sum(b.kind == "figure" for b in blocks)
    for old in figures.glob("figure*.png"):
        number = re.fullmatch(r"figure(\d+)\.png", old.name)
        if number and int(number[1]) > drawn:
            old.unlink(missing_ok=True)
    page, md = folder / PAGE, folder / MARKDOWN
    atomic_write_text(f"# {title}\n\n" + markdown, md, "analysis")
    atomic_write_text(render_html([Block("h2", title), *blocks], title), page, "analysis page")
    return [page, md, figures]
