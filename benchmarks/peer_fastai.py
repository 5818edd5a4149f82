"""The peer in benchmarks/time_to_accuracy.py: fastai's vision_learner + fine_tune on the same images and weights.

Runs in its own virtual environment (fastai is not a transferlab dependency):

    python3.11 -m venv .venv-peer
    .venv-peer/bin/pip install -c benchmarks/peer-constraints.txt torch torchvision fastai
    .venv-peer/bin/python benchmarks/peer_fastai.py --files FILES.json --weights W.pth --out RESULT.json

FILES.json (written by time_to_accuracy.py) lists the train, validation and test files and their classes. The model
is torchvision's squeezenet1_1 as fastai cuts and heads it (its own model_meta entry); the ImageNet weights are the
local state dict, loaded into the body, which is then frozen as vision_learner freezes a pretrained body. Every
setting not named here is fastai's default: item_tfms Resize (per image, in the DataLoader's workers), ImageNet
normalisation, fp32, fine_tune's learning rates and one-cycle schedules.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the heavy imports: the process's own start-up is part of its time

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torchvision  # noqa: E402
from fastai.vision.all import (  # noqa: E402
    Callback,
    CategoryBlock,
    DataBlock,
    ImageBlock,
    IndexSplitter,
    Normalize,
    Recorder,
    Resize,
    accuracy,
    imagenet_stats,
    vision_learner,
)


class EpochClock(Callback):
    """After each epoch (and its validation): the wall clock and the recorder's figures."""

    order = Recorder.order + 1

    def __init__(self, timeline: list, freeze_epochs: int):
        self.timeline, self.freeze_epochs = timeline, freeze_epochs

    def after_epoch(self):
        values = dict(zip(self.recorder.metric_names, self.recorder.log))
        epoch = len(self.timeline) + 1
        self.timeline.append({
            "time": time.time(),
            "epoch": epoch,
            "phase": "frozen" if epoch <= self.freeze_epochs else "unfrozen",
            "train_loss": float(values["train_loss"]),
            "val_loss": float(values["valid_loss"]),
            "val_accuracy": float(values["accuracy"]),
        })  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", required=True, help="the JSON file list written by time_to_accuracy.py")
    parser.add_argument("--weights", required=True, help="squeezenet1_1 state dict (features.* keys)")
    parser.add_argument("--out", required=True, help="where to write the result (JSON)")
    parser.add_argument("--resolution", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--epochs", type=int, default=1, help="fine_tune's unfrozen epochs")
    parser.add_argument("--freeze-epochs", type=int, default=1)
    args = parser.parse_args()

    files = json.loads(Path(args.files).read_text())
    classes = files["classes"]
    label_of = {path: classes[label] for part in ("train", "val", "test") for path, label in files[part]}
    items = [Path(p) for p, _ in files["train"] + files["val"]]
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        get_y=lambda path: label_of[str(path)],
        splitter=IndexSplitter(range(len(files["train"]), len(items))),
        item_tfms=Resize(args.resolution),
        batch_tfms=Normalize.from_stats(*imagenet_stats),
    )
    dls = block.dataloaders(items, bs=args.batch_size)

    # pretrained=False only because fastai would download torchvision's weights: the local ones are loaded instead,
    # and the body is frozen as vision_learner(pretrained=True) freezes it
    learn = vision_learner(dls, torchvision.models.squeezenet1_1, pretrained=False, normalize=False, metrics=accuracy)
    state = torch.load(args.weights, map_location="cpu", weights_only=True)
    learn.model[0][0].load_state_dict({k.removeprefix("features."): v for k, v in state.items()})
    learn.freeze()

    timeline: list[dict] = []
    learn.fine_tune(args.epochs, freeze_epochs=args.freeze_epochs, cbs=[EpochClock(timeline, args.freeze_epochs)])

    test_dl = learn.dls.test_dl([Path(p) for p, _ in files["test"]], with_labels=True)
    probabilities, targets = learn.get_preds(dl=test_dl)
    correct = int((probabilities.argmax(1) == targets).sum())
    result = {
        "started": STARTED,
        "finished": time.time(),
        "timeline": timeline,
        "test_correct": correct,
        "n_test": len(targets),
        "test_accuracy": correct / len(targets),
        "settings": vars(args),
        "versions": {"fastai": __import__("fastai").__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "workers": dls.num_workers,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
