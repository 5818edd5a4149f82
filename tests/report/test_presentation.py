"""How the report looks: figures a reader can read, an HTML page that wraps, values at readable precision.

- Learning curves: every legend entry names a run; a panel names at most its 5 best runs by the selection metric,
  the others grey behind one "N other runs" entry; accuracy axes stop at 100%; overlapping runs keep apart.
- Accuracy vs epochs: more than 6 settings -> the 5 best named, the rest grey (no figure dropped).
- HTML: long paths and numbers wrap, label columns keep one line, wide tables scroll in their own box.
- Sampled floats (a search's lr ...) at 4 significant digits in tables, legends and shown keys; stored keys intact.
"""

from __future__ import annotations

import re

import matplotlib.colors
import pytest

from transferlab.config.study import point_key
from transferlab.report import figures
from transferlab.report.data import Block, SearchData, StudyData
from transferlab.report.format import _value_text, key_text
from transferlab.report.tables import configurations_table, paired_rows, summary_table, trials_table
from transferlab.report.write import build_blocks, render_html, render_markdown
from transferlab.study.records import TrialRecord

LONG_LR = 0.000123456789


def trial(number: int, strategy: str, accuracies: list[float], kind: str = "run", **point) -> TrialRecord:
    history = [
        {"epoch": i + 1, "seconds": 1.0, "val_accuracy": a, "train_accuracy": min(a + 0.02, 1.0), "val_loss": 1 - a,
         "train_loss": 0.9 - a}
        for i, a in enumerate(accuracies)
    ]  # fmt: skip
    point = {"strategy": strategy, "epochs": len(accuracies), **point}
    return TrialRecord(kind=kind, number=number, key=point_key(point), point=point, history=history,
                       best=max(history, key=lambda r: r["val_accuracy"]), config={"loss": "ce", **point},
                       input_path="cached", n_val=200, n_train=800)  # fmt: skip


def study_of(trials: list[TrialRecord], grid: dict, searches: list[SearchData] | None = None) -> StudyData:
    return StudyData("hand", {"name": "hand", "grid": grid}, "transferlab study run x.toml", trials, grid, None, 0, {},
                     searches=searches or [])  # fmt: skip


@pytest.fixture
def drawn(monkeypatch):
    """The Figures the report's figure functions make, instead of their PNG bytes."""
    made = []
    monkeypatch.setattr(figures, "_png", lambda fig: made.append(fig) or b"png")
    return made


def legend_texts(fig) -> list[str]:
    return [t.get_text() for legend in (*fig.legends, *(ax.get_legend() for ax in fig.axes)) if legend
            for t in legend.get_texts()]  # fmt: skip


def grey(line) -> bool:
    return matplotlib.colors.same_color(line.get_color(), figures.GREY)


# ---------------------------------------------------------------------------- learning curves
def test_a_lone_run_is_named_never_just_run(drawn):
    data = study_of([trial(0, "frozen", [0.5, 0.6]), trial(1, "full", [0.5, 0.7])],
                    {"strategy": ["frozen", "full"], "epochs": [2]})  # fmt: skip
    figures.learning_curves(data)
    (fig,) = drawn
    assert sorted(legend_texts(fig)) == ["trial 0", "trial 1"]


def test_a_crowded_panel_names_its_best_five_and_greys_the_rest(drawn):
    rates = [0.001 * (i + 1) for i in range(12)]
    trials = [trial(i, "frozen", [0.3, 0.3 + 0.02 * ((i * 5) % 12)], lr=lr) for i, lr in enumerate(rates)]
    figures.learning_curves(study_of(trials, {"strategy": ["frozen"], "lr": rates, "epochs": [2]}))
    (fig,) = drawn
    best = sorted(trials, key=lambda t: -t.best["val_accuracy"])[:5]
    assert legend_texts(fig) == [f"lr = {_value_text(t.point['lr'])}" for t in best] + ["7 other runs"]
    accuracy = fig.axes[0]
    drawn_lines = [line for line in accuracy.lines if len(line.get_xdata())]
    named = [line for line in drawn_lines if not grey(line)]
    assert len([line for line in drawn_lines if grey(line)]) == 7  # validation only
    assert len(named) == 10  # validation and train of the 5 named
    solid = [line for line in named if line.get_linestyle() == "-"]
    assert len({line.get_marker() for line in solid}) == 5 and all(line.get_alpha() < 1 for line in solid)
    assert "best 5 runs by val_accuracy" in fig._suptitle.get_text()


def test_accuracy_axes_stop_at_100_percent(drawn):
    runs = [(8, [0.6, 1.0]), (8, [0.7, 0.99, 1.0]), (16, [0.5, 0.9]), (16, [0.6, 0.95, 1.0])]
    trials = [trial(i, "frozen", history, batch_size=bs) for i, (bs, history) in enumerate(runs)]
    data = study_of(trials, {"strategy": ["frozen"], "batch_size": [8, 16], "epochs": [2, 3]})
    figures.learning_curves(data)
    figures.accuracy_vs_epochs(data)
    curves, by_epochs = drawn
    accuracy_axes = [curves.axes[0], *by_epochs.axes]
    assert all(0.0 <= ax.get_ylim()[0] < ax.get_ylim()[1] <= 1.0 for ax in accuracy_axes)


def test_accuracy_vs_epochs_names_the_best_five_settings(drawn):
    rates = [0.001 * (i + 1) for i in range(8)]
    trials = [trial(2 * i + j, "frozen", [0.3] * e, lr=lr, batch_size=8) for i, lr in enumerate(rates)
              for j, e in enumerate((1, 2))]  # fmt: skip
    for t in trials:
        t.history[-1]["val_accuracy"] = 0.2 + 0.01 * t.number
    assert figures.accuracy_vs_epochs(study_of(trials, {"strategy": ["frozen"], "lr": rates, "epochs": [1, 2]}))
    (fig,) = drawn
    best = [f"frozen (lr = {_value_text(lr)})" for lr in reversed(rates[3:])]
    assert sorted(legend_texts(fig)) == sorted(best + ["3 other settings"])


# ---------------------------------------------------------------------------- HTML
def css_rules(page: str) -> dict[str, str]:
    """selector -> declarations, one entry per selector of a group."""
    (style,) = re.findall(r"<style>(.*?)</style>", page, re.S)
    rules = {}
    for selectors, body in re.findall(r"([^{}]+)\{([^}]*)\}", style):
        for selector in selectors.split(","):
            rules[selector.strip()] = rules.get(selector.strip(), "") + body + ";"
    return rules


def test_html_wraps_long_text_and_keeps_label_columns_on_one_line():
    path = "trials/" + "dropout=0.20363331723906103__lr=0.001263559813738167" * 3 + "/best.pt"
    table = Block("table", rows=[["option", "value"], ["validation balanced accuracy", path]])
    page = render_html([Block("p", f"Checkpoint: {path}"), Block("code", f"transferlab predict {path}"), table], "t")
    rules = css_rules(page)
    for selector in ("p", "td", "code", "pre"):
        assert "overflow-wrap:anywhere" in rules[selector], selector
    for selector in ("td:first-child", "th:first-child"):
        assert "white-space:nowrap" in rules[selector], selector
    assert "overflow-x:auto" in rules[".scroll"]
    assert re.search(r"<div class='scroll'><table>.*</table></div>", page)


# ---------------------------------------------------------------------------- sampled floats
def searched_study() -> StudyData:
    rates = [LONG_LR, 0.00098765432]
    trials = [trial(i, "frozen", [0.4, 0.5 + 0.1 * i], kind="search", lr=lr, dropout=0.123456789)
              for i, lr in enumerate(rates)]  # fmt: skip
    search = SearchData("hand/search/strategy=frozen", "strategy=frozen", {"strategy": "frozen"}, trials, None, "few")
    data = study_of(trials, {"strategy": ["frozen"], "lr": rates, "dropout": [0.123456789]}, [search])
    data.spec["grid"] = {"strategy": ["frozen"]}  # the spec's grid; the searched values are the report's axes
    return data


def test_sampled_floats_show_four_significant_digits(drawn, tmp_path):
    data = searched_study()
    assert _value_text(LONG_LR) == "0.0001235" and _value_text(0.25) == "0.25" and _value_text(8) == "8"
    rows = trials_table(data).rows
    assert rows[1][rows[0].index("lr")] == "0.0001235" and rows[1][rows[0].index("dropout")] == "0.1235"
    assert "lr = 0.0009877, dropout = 0.1235" in summary_table(data)[0].rows[1][1]
    figures.learning_curves(data)
    assert "trial 0: lr = 0.0001235, dropout = 0.1235" in legend_texts(drawn[0])
    text = render_markdown(build_blocks(data), tmp_path)
    assert "0.0001235" in text and "123456789" not in text and "9876543" not in text
    assert data.trials[0].key == f"dropout=0.123456789,epochs=2,lr={LONG_LR},strategy=frozen"  # stored: every digit
    assert key_text(data.trials[0].key) == "dropout=0.1235,epochs=2,lr=0.0001235,strategy=frozen"
    assert key_text("name=v1.25a,lr=1e-05,size=[0.123456, 2]") == "name=v1.25a,lr=1e-05,size=[0.123456, 2]"


def test_configurations_and_differences_show_four_significant_digits():
    rates = [LONG_LR, 0.00098765432]
    trials = [trial(2 * i + s, "frozen", [0.5 + 0.01 * (i + s)], lr=lr, seed=s) for i, lr in enumerate(rates)
              for s in (0, 1)]  # fmt: skip
    data = study_of(trials, {"strategy": ["frozen"], "epochs": [1], "lr": rates, "seed": [0, 1]})
    header, *rows = configurations_table(data).rows
    shown = {row[header.index("lr")] for row in rows}
    assert shown == {"0.0001235", "0.0009877"}
    (row,) = [r for r in paired_rows(data) if r[0] == "lr"]
    assert row[2] == "0.0009877 - 0.0001235"


def test_the_selected_trial_shows_its_key_at_four_significant_digits():
    from transferlab.report.sections import selection_blocks
    from transferlab.study.records import Selection

    key = f"dropout=0.123456789,lr={LONG_LR},strategy=frozen"
    selected = Selection(trial=3, key=key, identity=None, point={}, metric="val_accuracy", val_accuracy=0.8,
                         val_loss=0.5, n_val=200, test=None)  # fmt: skip
    rows = selection_blocks(selected, 0)[1].rows
    assert ["trial", "3 (dropout=0.1235,lr=0.0001235,strategy=frozen)"] in rows


def test_markdown_table_cells_cannot_split_a_row_or_open_html(tmp_path):
    from transferlab.report.data import Block

    text = render_markdown([Block("table", rows=[["class", "images"], ["a|b <img src=x onerror=y>", "3"]])], tmp_path)
    assert "| a\\|b &lt;img src=x onerror=y&gt; | 3 |" in text
