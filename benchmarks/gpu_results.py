"""Per-trial times and accuracies of one study as Markdown, for BENCHMARKS.md (benchmarks/gpu_check.sh writes them).

    python benchmarks/gpu_results.py STUDY_DIR [--title TEXT]

Reads the study's storage only (report.load_study_data) and prints the environment its runs recorded (device, GPU,
torch), the last `study run`'s wall time, the selected trial's test accuracy, then the report's own tables: every
trial (best and final validation accuracy, seconds per epoch, total seconds, input path) and seconds per regime
(training, setup, the frozen-feature pass). A study stopped by a time limit shows the trials it finished.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def results_markdown(directory: Path, title: str | None = None) -> str:
    from transferlab.report.data import Block
    from transferlab.report.load import load_study_data
    from transferlab.report.sections import study_time_blocks
    from transferlab.report.tables import time_table, trials_table
    from transferlab.report.write import render_markdown
    from transferlab.scoring.stats import percent_with_interval

    data = load_study_data(directory)
    env = data.environment
    lines = [
        f"### {title or data.name}",
        "",
        f"Device {env.get('device', '?')} ({env.get('gpu', 'no GPU recorded')}), torch {env.get('torch', '?')}, "
        f"Python {env.get('python', '?')}; {len(data.trials)} trials finished; command `{data.command}`.",
    ]
    last = data.attrs.get("last_run")
    if last:
        lines.append(
            f"The last `study run`: {last['wall_seconds']:.1f} s of wall time end to end ({last['started']} to "
            f"{last['finished']}), {last['load_seconds']:.1f} s of it loading the data."
        )
    else:
        lines.append("The study did not finish (no `study run` completed): the trials below are those it finished.")
    test = data.test
    if test and test.get("test_accuracy") is not None:
        n = test["n_test"]
        lines.append(
            f"Selected: trial {test['trial']} ({test['key']}), validation accuracy {100 * test['val_accuracy']:.2f}%, "
            f"test accuracy {percent_with_interval(round(test['test_accuracy'] * n), n)} on {n} test images."
        )
    blocks: list = []
    if data.trials:
        blocks = [Block("p", "All trials:"), trials_table(data), Block("p", "Seconds by regime and setting:")]
        blocks += [time_table(data)[0], *study_time_blocks(data)]
    return "\n".join(lines) + "\n\n" + render_markdown(blocks, directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="the study directory (its storage.txt names the storage)")
    parser.add_argument("--title", help="the section's title (default: the study's name)")
    args = parser.parse_args(argv)
    from transferlab.errors import StudyError

    try:
        print(results_markdown(args.study, args.title), end="")
    except StudyError as error:
        print(f"gpu_results: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
