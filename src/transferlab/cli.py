"""The command line: a thin layer over the library API. Every RunConfig field is a `train` flag."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from .config import ConfigError, RunConfig, load_toml, parse_override

EPILOG_OFFLINE = (
    "offline: --data PATH (an ImageFolder tree) or --data-dir DIR holding cifar-10-batches-py; "
    "--weights PATH (a state dict) or TRANSFERLAB_WEIGHTS"
)


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (default: {default})"
        if hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(
                flag, default=None, choices=choices, metavar=None if choices else f.name.upper(), help=help_text
            )


def _run_config(args: argparse.Namespace) -> RunConfig:
    values: dict = {}
    if args.config:
        tree = load_toml(args.config)
        values = dict(tree.get("run", tree))
    for f in dataclasses.fields(RunConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    for text in args.set or []:
        key, value = parse_override(text)
        values[key] = value
    return RunConfig.from_dict(values, where="")


def cmd_train(args) -> int:
    from .train import train

    config = _run_config(args)
    result = train(config, args.out)
    best = result.history[result.best_epoch - 1]
    print(
        f"best epoch {result.best_epoch}: val accuracy {best['val_accuracy']:.4f}, val loss {best['val_loss']:.4f} "
        f"-> {Path(args.out) / 'best.pt'}"
    )
    return 0


def cmd_evaluate(args) -> int:
    from .data import load_images
    from .evaluate import evaluate_checkpoint, load_checkpoint

    ckpt_config = load_checkpoint(args.checkpoint, "cpu").info["config"]
    values = {"data": args.data, "progress": not args.json, "skip_bad_images": args.skip_bad_images}
    if args.data_dir:  # else the run's own --data-dir
        values["data_dir"] = args.data_dir
    config = RunConfig.from_dict(values, base=RunConfig.from_dict(ckpt_config))
    data = load_images(config)
    indices = None
    if args.split != "all":
        from .data import make_split

        split = _checkpoint_split(args.checkpoint) if args.data == ckpt_config["data"] else None
        if split is None:
            split = make_split(
                data.labels,
                test_fraction=config.test_fraction,
                val_fraction=config.val_fraction,
                seed=config.split_seed,
                limit=config.limit,
                official_test=config.official_test,
            )
        indices = getattr(split, args.split)
        if args.split == "test" and split.official_test and data.test_images is not None:  # the source's own test set
            from .data import ImageSet

            data, indices = ImageSet(data.test_images, data.test_labels, data.classes, data.key), None
    result = evaluate_checkpoint(args.checkpoint, data, indices=indices, device=args.device)
    if args.json:
        print(json.dumps(result))
    else:
        from .report import print_evaluation

        print_evaluation(result)
    return 0


def _checkpoint_split(checkpoint: str):
    from .data import Split

    path = Path(checkpoint).parent / "split.json"
    return Split.from_dict(json.loads(path.read_text())) if path.exists() else None


def cmd_predict(args) -> int:
    from .evaluate import predict_files

    results = predict_files(args.checkpoint, args.images, top=args.top, device=args.device)
    if args.json:
        print(json.dumps(results))
        return 0
    for r in results:
        print(r["file"] + ": " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"]))
    return 0


def cmd_models(args) -> int:
    from .models import REGISTRY

    for name, backbone in sorted(REGISTRY.items()):
        print(f"{name}: groups {', '.join(backbone.group_names)}")
    return 0


def cmd_study_run(args) -> int:
    from .study import run_study

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
    from .study import run_worker

    run_worker(args.spec, study_dir=args.dir, storage=args.storage, overrides=args.set or [])
    return 0


def cmd_study_report(args) -> int:
    from .report import write_report

    paths = write_report(args.study, storage=args.storage)
    for p in paths:
        print(p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transferlab", description="Transfer-learning studies on image classifiers.", epilog=EPILOG_OFFLINE
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a pretrained backbone: one run", epilog=EPILOG_OFFLINE)
    p.add_argument("--out", required=True, help="run directory: metrics.json, best.pt, config.json, split.json")
    p.add_argument("--config", help="TOML file of run options ([run] table or top level); flags override it")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any run option (repeatable)")
    _add_run_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy, loss, per-class accuracy and confusion matrix of a checkpoint")
    p.add_argument("checkpoint", help="a best.pt written by train")
    p.add_argument("--data", required=True, help="'cifar10' or an ImageFolder tree; class folders are matched by name")
    p.add_argument("--data-dir", help="where a local cifar-10-batches-py lies (for --data cifar10)")
    p.add_argument(
        "--split",
        default="all",
        choices=("all", "train", "val", "test"),
        help="evaluate every image (default), or one split (the run's own split.json when --data is the training data)",
    )
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images with a counted warning")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device (default: auto)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (accuracy, loss, n, per-class accuracy, confusion matrix)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="top classes of image files")
    p.add_argument("checkpoint", help="a best.pt written by train")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top", type=int, default=3, help="how many classes to show (default: 3)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device (default: auto)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("models", help="list the registered backbones and their layer groups")
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


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .evaluate import CheckpointError
    from .models import WeightsError
    from .storage import StudyError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, WeightsError, CheckpointError, StudyError) as error:
        print(f"transferlab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "transferlab: interrupted (finished epochs and trials are saved; run the same command to resume)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
