"""A study's report: its blocks in order, rendered as report.md (with PNG figures) and a self-contained report.html."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from ..config.study import replicate_axes
from ..errors import OutputError, StudyError
from ..fsutil import atomic_write_bytes, atomic_write_text
from .data import Block, StudyData, _figure
from .figures import accuracy_vs_epochs, learning_curves, timing_plot, variant_chart
from .format import _baseline, _replicate_words, _runs
from .load import load_study_data
from .reproduce import reproduce_blocks
from .search import search_blocks
from .sections import (
    backbone_blocks,
    lr_found_blocks,
    selection_blocks,
    study_time_blocks,
    summary_blocks,
)
from .tables import paper_tables, replicate_blocks, time_table, trials_table, variant_table


def build_blocks(data: StudyData) -> list[Block]:
    blocks = [Block("h2", f"Study {data.name}")]
    trained = len(_runs(data))
    shared = (
        f"{trained} runs trained; the others are epoch prefixes of a longer run with the same settings"
        if trained < len(data.trials)
        else "each trained separately"
    )
    if data.searches:
        blocks.append(
            Block(
                "p",
                f"{len(data.trials)} complete trials of {len(data.searches)} "
                f"search{'es' if len(data.searches) > 1 else ''} (the Search section: pruned trials, progress, "
                "importances). Accuracies are in percent, with no digit finer than their uncertainty allows.",
            )
        )
    else:
        blocks.append(
            Block(
                "p",
                f"{len(data.trials)} grid points ({shared}). "
                "Accuracies are in percent, with no digit finer than their uncertainty allows; the per-regime tables "
                "show each grid point's last epoch, as the study reported them.",
            )
        )
    if data.n_stale:
        blocks.append(
            Block(
                "p",
                f"{data.n_stale} trial{'s' * (data.n_stale != 1)} queued by an earlier spec (before its settings, data "
                "or weights changed) were found waiting and not run (marked stale in the storage).",
            )
        )
    if data.n_older:
        trials = "trial" if data.n_older == 1 else "trials"
        blocks.append(Block("p", f"The storage also holds {data.n_older} {trials} from earlier specs, not shown."))
    if data.trials:
        blocks += summary_blocks(data)
    if data.test:
        blocks += selection_blocks(data.test, data.n_test_evaluations)
    blocks += replicate_blocks(data)
    blocks += search_blocks(data)
    if "variant" in data.grid:
        blocks.append(Block("h2", "Variants: best validation accuracy per regime"))
        blocks.append(variant_table(data))
        base = _baseline(list(data.grid["variant"]))
        _figure(blocks, f"Each variant against {base}, per regime (sorted)", variant_chart(data))
    blocks += backbone_blocks(data)
    blocks += lr_found_blocks(data)
    blocks.append(Block("h2", "Results per regime"))
    if replicate_axes(data.grid):
        blocks.append(Block("p", f"Each cell is the mean ± sample std over its {_replicate_words(data)}."))
    if not data.searches:  # a search's trials differ in sampled values: the All trials table lists them
        blocks += paper_tables(data)
    _figure(blocks, "Learning curves per regime", learning_curves(data))
    _figure(blocks, "Validation accuracy vs epochs, per batch size", accuracy_vs_epochs(data))
    blocks.append(Block("h2", "Time"))
    blocks += study_time_blocks(data)
    table, times = time_table(data)
    blocks.append(
        Block(
            "p",
            "Per regime and setting: s/epoch is the training and validation seconds of every epoch its runs trained, "
            "divided by their number; setup is building the model and, for cached inputs, the frozen-feature pass "
            "(recorded by runs since this report version).",
        )
    )
    blocks.append(table)
    _figure(blocks, "Seconds per epoch by regime and setting (each trained epoch once)", timing_plot(data, times))
    blocks.append(Block("h2", "All trials"))
    blocks.append(trials_table(data))
    blocks += reproduce_blocks(data)
    return blocks


def _cell(text: str) -> str:
    """A table cell's text as Markdown shows it: a class name's `|` would split the row, `<` and `>` open raw HTML."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def render_markdown(blocks: list[Block], figure_dir: Path) -> str:
    out, n = [], 0
    for b in blocks:
        if b.kind in ("h2", "h3"):
            out.append(("## " if b.kind == "h2" else "### ") + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "code":
            out.append("```\n" + b.text + "\n```")
        elif b.kind == "table":
            out.append(
                "\n".join(
                    ["| " + " | ".join(map(_cell, b.rows[0])) + " |", "|" + "---|" * len(b.rows[0])]
                    + ["| " + " | ".join(map(_cell, r)) + " |" for r in b.rows[1:]]
                )
            )
        elif b.kind == "figure":
            n += 1
            name = f"figure{n}.png"
            atomic_write_bytes(b.png, figure_dir / name, "report figure")
            out.append(f"![{b.text}]({figure_dir.name}/{name})\n\n*{b.text}*")
    return "\n\n".join(out) + "\n"


# Long paths, keys and numbers wrap anywhere rather than widen the page, but a cell keeps 4em (a short number stays
# whole) and a label column (the first) one line per label; a table still wider than the page scrolls in its own box.
STYLE = (
    "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
    "p,li,td,code,figcaption{overflow-wrap:anywhere}.scroll{overflow-x:auto;margin:1em 0}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;min-width:4em}"
    "td:first-child,th:first-child{text-align:left;white-space:nowrap}"
    "pre{background:#f5f5f5;padding:1em;overflow:auto;white-space:pre-wrap;overflow-wrap:anywhere}"
    "img{max-width:100%}</style>"
)


def render_html(blocks: list[Block], title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{STYLE}</head><body>"]
    for b in blocks:
        if b.kind in ("h2", "h3"):
            out.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{html.escape(b.text)}</p>")
        elif b.kind == "code":
            out.append(f"<pre>{html.escape(b.text)}</pre>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(c)}</th>" for c in b.rows[0])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b.rows[1:])
            out.append(f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")
        elif b.kind == "figure":
            data = base64.b64encode(b.png).decode()
            out.append(
                f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(b.text)}'>"
                f"<figcaption>{html.escape(b.text)}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out)


def write_report(directory: str | Path, storage: str | None = None, study_name: str | None = None) -> list[Path]:
    directory = Path(directory)
    data = load_study_data(directory, storage, study_name)
    blocks = build_blocks(data)
    figure_dir = directory / "report_files"
    figure_dir.mkdir(exist_ok=True)
    md, page = directory / "report.md", directory / "report.html"
    try:
        atomic_write_text(f"# transferlab report: {data.name}\n\n" + render_markdown(blocks, figure_dir), md, "report")
        atomic_write_text(render_html([Block("h2", f"transferlab report: {data.name}")] + blocks, data.name), page,
                          "report")  # fmt: skip
    except OutputError as error:
        raise StudyError(str(error)) from None
    return [md, page]
