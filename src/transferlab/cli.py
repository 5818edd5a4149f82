"""The command line: a thin layer over the library API. Every RunConfig field is a `train` flag."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import io
import json
import os
import sys
import typing
import warnings
from pathlib import Path

from .config.lr_find import END_LR, MIN_STEPS, START_LR, STEPS, check_range
from .config.run import HELP_GROUPS, RunConfig
from .config.toml import load_toml, parse_override
from .errors import ConfigError, DistributedError, OutputError, TransferlabError
from .fsutil import atomic_write_text, refuse_output_over_input
from .version import __version__

EPILOG_OFFLINE = (
    "offline: --data PATH (an ImageFolder tree) or --data-dir DIR holding cifar-10-batches-py; "
    "--weights PATH (a state dict) or TRANSFERLAB_WEIGHTS"
)


TRAIN_EPILOG = f"""examples:
  transferlab train --data photos/ --strategy partial --epochs 5 --out runs/try
  transferlab train --data photos/ --config run.toml --set lr=0.01 --out runs/lr01
  transferlab train --labels labels.csv --resolution 128 --tta-flip --log tensorboard --out runs/big

{EPILOG_OFFLINE}"""

LR_FIND_EPILOG = f"""examples:
  transferlab lr-find --data photos/ --strategy partial --resolution 128 --out runs/lr
  transferlab lr-find --data photos/ --config run.toml --steps 200 --start-lr 1e-6 --end-lr 1

its --lr, --schedule, --warmup-epochs, --epochs and --log are not used: the test sets the lr itself.
in a study spec, lr = "find" runs it per configuration before training.

{EPILOG_OFFLINE}"""


# the flags a timm user types (timm's train.py), as aliases of ours
TIMM_ALIASES = {"arch": ("--model",), "resolution": ("--img-size",), "optimizer": ("--opt",),
                "schedule": ("--sched",), "label_smoothing": ("--smoothing",), "batch_size": ("-b",)}  # fmt: skip


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Every RunConfig field a flag, under the help group of its section (config.run.HELP_GROUPS)."""
    hints = typing.get_type_hints(RunConfig)
    groups = {section: group for title, sections in HELP_GROUPS.items()
              for group in [parser.add_argument_group(title)] for section in sections}  # fmt: skip
    for f in dataclasses.fields(RunConfig):
        group = groups[f.metadata["section"]]
        flags = ["--" + f.name.replace("_", "-"), *TIMM_ALIASES.get(f.name, ())]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name == "data":  # the library's RunConfig() reads CIFAR-10; the command line asks (_run_config)
            default = "none: name a folder, a --labels file or cifar10"
        help_text = f"{f.metadata['help']} (default: {default})"
        if hints[f.name] is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = f.metadata.get("choices")
            group.add_argument(
                *flags,
                dest=f.name,
                default=None,
                choices=choices,
                metavar=None if choices else f.name.upper(),
                help=help_text,
            )


def _run_config(args: argparse.Namespace) -> RunConfig:
    values: dict = {}
    if args.config:
        tree = load_toml(args.config)
        if "run" in tree:  # a [run] table: keys beside it would be silently ignored
            outside = [k for k in tree if k != "run"]
            if not isinstance(tree["run"], dict) or outside:
                what = f"key {outside[0]!r} outside" if outside else "run, which is not"
                raise ConfigError(f"{args.config}: {what} the [run] table (put run options in [run] or at the top)")
        values = dict(tree.get("run", tree))
    for f in dataclasses.fields(RunConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    for text in args.set or []:
        key, value = parse_override(text)
        values[key] = value
    if values.get("data") is None and values.get("labels") is None:  # never a silent CIFAR-10 download
        raise ConfigError(
            "no data: name an image folder (--data photos/, one sub-folder of images per class), a labels file "
            "(--labels labels.csv) or torchvision's CIFAR-10 (--data cifar10)"
        )
    return RunConfig.from_dict(values, where="")


def cmd_train(args) -> int:
    from .engine.distributed import from_environment  # loaded when run: --help stays light
    from .engine.rundir import RunDir  # loaded when run
    from .engine.train import train  # loaded when run

    result = train(_run_config(args), args.out, overwrite=args.overwrite)
    if from_environment().main:  # under torchrun: once, by rank 0
        print(f"{result.summary()} -> {RunDir(args.out).best}")
    return 0


def cmd_lr_find(args) -> int:
    """The suggestion in one line (exit 0), or why the curve gives none (exit 1); the files either way with --out."""
    from .engine.lr_curve import FIGURE_FILE, RECORD_FILE  # loaded when run: --help stays light
    from .engine.lr_find import lr_find  # loaded when run

    check_range(args.start_lr, args.end_lr, args.steps)  # before the data is read
    result = lr_find(_run_config(args), args.out, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps)
    where = f" -> {Path(args.out) / FIGURE_FILE}, {RECORD_FILE}" if args.out else ""
    print(result.summary() + where)
    return 0 if result.suggestion is not None else 1


def _given_data(args, progress: bool) -> dict:
    """evaluate's and analyze's data flags as RunConfig values; those not given stay the run's own."""
    given = {"data": args.data, "labels": args.labels, "progress": progress}
    if args.skip_bad_images is not None:  # else the run's own setting
        given["skip_bad_images"] = args.skip_bad_images
    if args.data_dir:  # else the run's own --data-dir
        given["data_dir"] = args.data_dir
    for column in ("path", "label", "split"):  # else the run's own column names
        if getattr(args, f"labels_{column}_column") is not None:
            given[f"labels_{column}_column"] = getattr(args, f"labels_{column}_column")
    return given


def cmd_evaluate(args) -> int:
    """On the run's own data the default is its test split: `--split all` would count the training images."""
    from .inference.evaluate import evaluate_on  # loaded when run: --help stays light

    evaluation = evaluate_on(args.checkpoint, _given_data(args, progress=not args.json), args.split, args.device)
    for note in evaluation.notes:
        print(f"transferlab: note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(evaluation.to_dict()))
    else:
        print_evaluation(evaluation.to_dict())
    return 0


def cmd_analyze(args) -> int:
    """The images evaluate would score; the folder checked before the figures are computed; its files, a line each."""
    from .inference.analysis import analyze_images  # loaded when run: --help stays light
    from .inference.evaluate import evaluation_images  # loaded when run
    from .report.analysis import analysis_folder, write_analysis  # loaded when run

    chosen = evaluation_images(args.checkpoint, _given_data(args, progress=True), args.split, args.device)
    folder = analysis_folder(args.out, chosen.checkpoint, chosen.source)
    for note in chosen.notes:
        print(f"transferlab: note: {note}", file=sys.stderr)
    for path in write_analysis(analyze_images(chosen), folder):
        print(path)
    return 0


def print_evaluation(result: dict) -> None:
    """The overall figures, then per-class accuracy, each percentage with no digit finer than its 95% interval."""
    from rich.console import Console  # loaded when run: --help stays light
    from rich.table import Table  # loaded when run

    from .scoring.stats import interval_decimals, percent_with_interval  # scipy, loaded when run

    n, digits = result["n"], interval_decimals(round(result["accuracy"] * result["n"]), result["n"])
    # the figures' lines and the table within 80 columns (a note's prose is a line of its own): grep finds each whole
    accuracy = percent_with_interval(round(result["accuracy"] * n), n)
    print(f"{result['split']} split, {n} images: accuracy {accuracy}, loss {result['loss']:.4f}")
    print(f"balanced accuracy {100 * result['balanced_accuracy']:.{digits}f}%, "
          f"macro-F1 {100 * result['macro_f1']:.{digits}f}%")  # fmt: skip
    if result.get("ties"):
        print(f"note: {result['ties']} of these images have top classes the model scores equally (counted as the "
              "first of them, by class order): their accuracy says nothing about the model")  # fmt: skip
    table = Table()
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("accuracy (95% CI)", justify="right")
    for i, ((name, value), row) in enumerate(zip(result["per_class_accuracy"].items(), result["confusion_matrix"])):
        table.add_row(name, str(sum(row)), "-" if value is None else percent_with_interval(row[i], sum(row)))
    # drawn into a string, then print()ed: a reader gone is a BrokenPipeError (_dispatch), never rich's own exit 1
    console = Console(file=io.StringIO(), width=80, force_terminal=sys.stdout.isatty())
    console.print(table)
    print(console.file.getvalue(), end="")
    calibration = result.get("calibration") or {}
    print(f"calibration: ECE {result['ece']:.4f}, NLL {result['nll']:.4f}")
    print(f"with the run's temperature T = {result['temperature']:.3g}: ECE {result['ece_calibrated']:.4f}, "
          f"NLL {result['nll_calibrated']:.4f}")  # fmt: skip
    if calibration and not calibration.get("fitted"):
        print(f"note: the run's temperature is 1, not fitted: {calibration['reason']}")


def cmd_predict(args) -> int:
    """Prints (or writes to --output) the good files' classes; a file or argument that cannot be read is one error
    line on stderr (and an error row in csv / json), and the exit status is 1."""
    from .engine.rundir import output_file  # loaded when run: --help stays light
    from .inference.predict import expand_inputs, predict_files  # loaded when run

    note_unfinished(args.checkpoint)
    paths, errors = expand_inputs(args.images)
    output = None
    if args.output:  # before anything is read: the output would replace an image, the model or a run's results
        refuse_output_over_input(args.output, [args.checkpoint, *paths], "--output", ConfigError)
        output = output_file(args.output, "--output", ConfigError)
    results = predict_files(args.checkpoint, paths, top=args.top, device=args.device, progress=sys.stderr.isatty())
    results += errors
    text = format_predictions(results, args.format or "text")
    if output is None:
        sys.stdout.write(text)
    else:
        write_atomically(output, text)
    for r in results:
        if "error" in r:
            print(f"transferlab: error: {r['error']}", file=sys.stderr)
    return 1 if any("error" in r for r in results) else 0


def format_predictions(results: list[dict], form: str) -> str:
    """text: "file: class p, class p" per readable file; json: the list; csv: one row per file, top-1 as class and
    probability, then top2_class, top2_probability, ..., and an error column (empty for a readable file)."""
    if form == "json":
        return json.dumps(results) + "\n"
    if form == "text":
        return "".join(
            r["file"] + ": " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"])
            + (f" (a tie: {', '.join(r['tie'])})" if r.get("tie") else "") + "\n"
            for r in results
            if "top" in r
        )  # fmt: skip
    k = max((len(r["top"]) for r in results if "top" in r), default=1)
    header = ["file", "class", "probability"]
    for n in range(2, k + 1):
        header += [f"top{n}_class", f"top{n}_probability"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*header, "tie", "error"])  # tie: the classes tied for the top, when they are
    for r in results:
        cells = [value for t in r.get("top", []) for value in (t["class"], t["probability"])]
        writer.writerow([r["file"], *cells, *[""] * (len(header) - 1 - len(cells)), " ".join(r.get("tie", [])),
                         r.get("error", "")])  # fmt: skip
    return buffer.getvalue()


def write_atomically(path: Path, text: str) -> None:
    """A temporary file beside `path`, then a rename: a reader never sees half a file."""
    try:
        atomic_write_text(text, path, "--output")
    except OutputError as error:
        raise ConfigError(str(error)) from None


def cmd_export(args) -> int:
    from .inference.export import export_checkpoint  # loaded when run: --help stays light

    note_unfinished(args.checkpoint)
    print(export_checkpoint(args.checkpoint, args.format, args.output))
    return 0


def note_unfinished(checkpoint: str) -> None:
    """predict and export of a run that did not finish say so (evaluate and analyze say it among their notes)."""
    from .engine.rundir import checkpoint_file, unfinished_note  # loaded when run: --help stays light

    note = unfinished_note(checkpoint_file(checkpoint))
    if note:
        print(f"transferlab: note: {note}", file=sys.stderr)


def cmd_models(args) -> int:
    """Each backbone: its layer groups, then source, parameters, pretrained resolution, a run's default input
    (resolution, crop fraction, interpolation) and whether its pretrained weights are already on this machine."""
    from .models.registry import list_backbones  # loaded when run: --help stays light

    backbones, more, note = list_backbones(args.pattern, args.limit)
    if note:
        print(note)
    for backbone in backbones:
        resolution = backbone.resolution or 224
        resolution = f"{resolution} px (fixed)" if backbone.fixed_resolution else f"{resolution} px"
        default = backbone.defaults()
        print(f"{backbone.name}: groups {', '.join(backbone.group_names)}")
        print(
            f"    {backbone.source}, {backbone.parameter_count() / 1e6:.1f}M parameters, pretrained at {resolution}, "
            f"pretrained weights on this machine: {backbone.pretrained_on_disk() or 'no'}"
        )
        print(
            f"    default input: {default['resolution']} px, centre {default['crop_fraction']:g} of the square, "
            f"{default['interpolation']}"
        )
    if more:
        print(f"... and {more} more timm models match (--limit N shows more)")
    if args.pattern and not backbones:
        print(f"no model matches {args.pattern!r}")
    return 0


def cmd_study_run(args) -> int:
    from .study.runner import run_study  # loaded when run: --help stays light

    run_study(
        args.spec,
        study_dir=args.dir,
        storage=args.storage,
        workers=args.workers,
        overrides=args.set or [],
        report=not args.no_report,
    )
    return 0


def cmd_study_worker(args) -> int:
    from .study.runner import run_worker  # loaded when run: --help stays light

    run_worker(args.spec, study_dir=args.dir, storage=args.storage, overrides=args.set or [])
    return 0


def cmd_study_report(args) -> int:
    from .report.write import write_report  # loaded when run: --help stays light

    paths = write_report(args.study, storage=args.storage)
    for p in paths:
        print(p)
    return 0


class Parser(argparse.ArgumentParser):
    """A bad flag or choice is one line, like every other bad input (exit status 2); a misspelt flag gets the
    command's flag it is closest to. No flag is taken for a longer one it begins (`--epoch` is not `--epochs`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # the sub-commands' parsers are of this class too
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"transferlab: error: {message} (see `{self.prog} --help`)\n")

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._command_parser(parsed)
            flags = [a for a in extras if a.startswith("-")]
            close = [m for a in flags for m in command.closest_flags(a.split("=")[0])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            command.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed

    def _command_parser(self, parsed: argparse.Namespace) -> Parser:
        """The (sub)command's own parser: the one whose flags the user meant."""
        parser = self
        while True:
            chosen = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            name = getattr(parsed, chosen[0].dest, None) if chosen else None
            if name is None:
                return parser
            parser = chosen[0].choices[name]

    def known_flags(self) -> list[str]:
        return [s for s in self._option_string_actions if s.startswith("--")]

    def closest_flags(self, flag: str) -> list[str]:
        """The flags `flag` begins (an abbreviation: at most 3, shortest first), else the one it is closest to."""
        begun = sorted((known for known in self.known_flags() if known.startswith(flag)), key=len)
        return begun[:3] if begun else difflib.get_close_matches(flag, self.known_flags(), 1, 0.6)


def _add_scoring_flags(p: argparse.ArgumentParser) -> None:
    """evaluate's and analyze's arguments: the checkpoint, the data and split it is scored on, the device."""
    p.add_argument("checkpoint", help="a best.pt written by train, or the run folder holding it")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--data", help="'cifar10' or an ImageFolder tree; class folders are matched by name (default: the run's data)"
    )
    source.add_argument("--labels", help="a CSV or TSV file of image paths and labels; labels are matched by name")
    p.add_argument("--data-dir", help="where a local cifar-10-batches-py lies (for --data cifar10)")
    for column, default in (("path", "path"), ("label", "label"), ("split", "split, when present")):
        text = f"--labels: the {column} column (default: the run's, or {default})"
        p.add_argument(f"--labels-{column}-column", help=text)
    p.add_argument(
        "--split",
        default=None,
        choices=("all", "train", "val", "test"),
        help="which images: the run's own data defaults to its test split (from the run's split.json); "
        "other data defaults to all of it",
    )
    p.add_argument(
        "--skip-bad-images",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="skip unreadable images with a counted warning (default: as the run did)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="transferlab", description="Transfer-learning studies on image classifiers.", epilog=EPILOG_OFFLINE
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="fine-tune a pretrained backbone: one run",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="run directory: metrics.json, best.pt, config.json, split.json")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of a run with other settings in --out (without it such a folder is refused; the "
        "same settings resume or return the finished run either way)",
    )
    p.add_argument("--config", help="TOML file of run options ([run] table or top level); flags override it")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any run option (repeatable)")
    _add_run_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "lr-find",
        help="learning-rate range test: the loss as the lr grows, and a suggested lr for a run's config",
        description="Trains the run's config (same options as train) at a learning rate growing exponentially from\n"
        "--start-lr to --end-lr, records the smoothed training loss, stops once it passes 4x its minimum, and\n"
        "suggests the lr where it falls fastest against log(lr). The model is not kept.",
        epilog=LR_FIND_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", help="folder for lr_find.png (the curve, suggestion marked) and lr_find.json")
    p.add_argument("--steps", type=int, default=STEPS, help=f"training steps (at least {MIN_STEPS}; default {STEPS})")
    p.add_argument("--start-lr", type=float, default=START_LR, help=f"first learning rate (default {START_LR:g})")
    p.add_argument("--end-lr", type=float, default=END_LR, help=f"last learning rate (default {END_LR:g})")
    p.add_argument("--config", help="TOML file of run options ([run] table or top level); flags override it")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any run option (repeatable)")
    _add_run_flags(p)
    p.set_defaults(func=cmd_lr_find)

    p = sub.add_parser("evaluate", help="accuracy, loss, per-class accuracy and confusion matrix of a checkpoint")
    _add_scoring_flags(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (accuracy, balanced_accuracy, macro_f1, loss, n, per-class accuracy, "
        "confusion matrix)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "analyze",
        help="interpretation of a checkpoint on a split: confusion, top losses, per-class figures, calibration, "
        "Grad-CAM, as one HTML page",
        description="The images evaluate would score (the same flags and defaults), analysed as the study report's\n"
        "selected trial is: the confusion matrix, the most confused pairs, the most confident mistakes, per-class\n"
        "precision / recall / F1 with their 95% intervals, reliability diagrams, Grad-CAM of a few mistakes.\n"
        "Writes analysis.html (self-contained), analysis.md and analysis_files/figureN.png.",
        epilog="examples:\n  transferlab analyze runs/try\n  transferlab analyze runs/try --data other-photos/ "
        "--out try-on-other",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_scoring_flags(p)
    p.add_argument("--out", help="folder to write (default: RUN_DIR/analysis, or NAME-analysis beside a checkpoint "
                   "file NAME.pt)")  # fmt: skip
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("predict", help="top classes of image files")
    p.add_argument("checkpoint", help="a best.pt written by train, or the run folder holding it")
    p.add_argument(
        "images",
        nargs="+",
        help="image files, folders (their images at any depth) and patterns such as 'photos/**/*.jpg'",
    )
    p.add_argument("--top", type=int, default=3, help="how many classes to show (default: 3)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device (default: auto)")
    p.add_argument(
        "--format",
        choices=("text", "csv", "json"),
        help="text: a line per file (default); csv: file,class,probability,top2_class,top2_probability,...,error; "
        "json: a list of {file, top} or {file, error}",
    )
    p.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")
    p.add_argument("--output", metavar="FILE", help="write the predictions to FILE (atomically) instead of stdout")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "export",
        help="write a checkpoint as an ONNX or TorchScript file for inference without transferlab",
        description="The exported model takes float32 (N, 3, R, R) RGB in [0, 1] at the checkpoint's resolution R,\n"
        "normalises inside and returns (N, classes) probabilities (flip TTA and temperature as the checkpoint says).\n"
        "Classes, resolution, mean and std are in the file's metadata: ONNX metadata_props (JSON values),\n"
        "TorchScript extra file transferlab.json.",
        epilog="examples:\n  transferlab export runs/try/best.pt --format onnx -o model.onnx\n"
        "  transferlab export runs/try/best.pt --format torchscript -o model.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="a best.pt written by train, or the run folder holding it")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"), help="file format")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the file to write (atomically)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("models", help="list backbones (torchvision, timm/...) and their layer groups")
    p.add_argument("pattern", nargs="?", help="only names matching it (fnmatch; timm: timm.list_models(PATTERN))")
    p.add_argument("--limit", type=int, default=30, help="show at most N timm models (default 30)")
    p.set_defaults(func=cmd_models)

    study = sub.add_parser("study", help="grids of runs stored in Optuna: run, worker, report")
    ssub = study.add_subparsers(dest="study_command", required=True)
    for name, func, text in (
        ("run", cmd_study_run, "run every trial still to do, then write the report"),
        ("worker", cmd_study_worker, "join a study created by `study run` and take waiting trials"),
    ):
        p = ssub.add_parser(name, help=text)
        p.add_argument("spec", help="study spec (TOML), e.g. studies/quick.toml")
        p.add_argument("--dir", help="study directory (default: studies-out/<name>)")
        p.add_argument(
            "--storage",
            help="Optuna storage URL (default: sqlite:///<dir>/study.db); postgresql://USER@HOST/DB to share across "
            "machines (password: PGPASSWORD, ~/.pgpass or the env variable the spec's storage_password_env names; "
            "a password in the URL is used but never saved or shown)",
        )
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a spec key, e.g. data=PATH or grid.epochs=[1,2] (repeatable)",
        )
        if name == "run":
            p.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default: 1)")
            p.add_argument("--no-report", action="store_true", help="skip writing the report")
        p.set_defaults(func=func)
    p = ssub.add_parser("report", help="write report.md and report.html from the study's storage")
    p.add_argument("study", help="study directory")
    p.add_argument("--storage", help="Optuna storage URL (default: the study directory's)")
    p.set_defaults(func=cmd_study_report)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings meant for users (skipped images, a rebuilt cache) as one line, without Python's source location."""
    return f"transferlab: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before the imports below, which load torch: help stays light
    warnings.formatwarning = _one_line_warning
    try:
        return _dispatch(args)
    except KeyboardInterrupt:  # during the imports below, before a run began: nothing to resume
        print("transferlab: interrupted", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    from .engine.distributed import from_environment  # torch: loaded once the arguments are read

    # Under torchrun every process meets bad input and a diverged run alike: rank 0 alone says so, once.
    # A process that lost the others says so itself.
    reports = True
    try:
        world = from_environment()
        reports = world.main
        if world.active and args.func is not cmd_train:
            raise ConfigError(
                f"`transferlab {args.command}` runs as one process: only `train` runs across the {world.world_size} "
                "processes torchrun starts"
            )
        status = args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader gone (`| head`) is the BrokenPipeError below
        return status
    except TransferlabError as error:  # one line, its exit status (errors.py): 2 bad input, 1 failed work
        if reports or isinstance(error, DistributedError):  # a process that lost the others says so itself
            print(f"transferlab: error: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:  # `transferlab predict ... | head`: the reader has gone; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the interpreter's final flush is silent
        return 141
    except KeyboardInterrupt:
        if reports:
            print(
                "transferlab: interrupted (finished epochs and trials are saved; run the same command to resume)",
                file=sys.stderr,
            )
        return 130


if __name__ == "__main__":
    sys.exit(main())
