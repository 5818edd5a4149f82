"""How many images per chunk a pass without gradients should take on a CPU, and what normalising before upsampling
saves. The measurements behind features.inference_batch_size and augment.Preprocess's order.

    .venv/bin/python benchmarks/inference_chunks.py

SqueezeNet 1.1's convolutional part on random 32 x 32 uint8 images (the speed does not depend on the pixels or the
weights), upsampled on the fly as transferlab does; channels_last, bf16 autocast on and off; the images per second
of transferlab's own feature pass (features.compute_features) for each chunk size, at each resolution.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.nn.functional as F
import torchvision

from transferlab.engine.device import inference_batch_size
from transferlab.engine.features import compute_features
from transferlab.engine.preprocess import Preprocess, normalisation, to_float

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def images_per_second(run, count: int, repeats: int = 2) -> float:
    run()  # warm-up: oneDNN picks its kernels on the first call of a shape
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return count / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 96, 128, 224])
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64, 128, 256, 500])
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1().features.eval().to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (args.images, 32, 32, 3), dtype=torch.uint8)
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} images per measurement")
    print("| px | precision | " + " | ".join(f"{c} / chunk" for c in args.chunks) + " | rule's chunk |")
    print("|---|---|" + "---|" * (len(args.chunks) + 1))
    for resolution in args.resolutions:
        preprocess = Preprocess(MEAN, STD, resolution, channels_last=True)
        for autocast in (True, False):
            rates = []
            for chunk in args.chunks:
                options = dict(batch_size=chunk, device=cpu, progress=False, autocast=autocast)
                run = functools.partial(compute_features, model, images, preprocess, **options)
                rates.append(images_per_second(run, len(images)))
            best = max(rates)
            cells = [f"**{r:.0f}**" if r == best else f"{r:.0f}" for r in rates]
            precision = "bf16" if autocast else "fp32"
            rule = inference_batch_size(cpu, resolution)
            print(f"| {resolution} | {precision} | " + " | ".join(cells) + f" | {rule} |")

    print("\npreprocessing alone, 128 px, chunks of 500 (images/s):")
    chunk = images[:500]
    mean, std = normalisation(MEAN, STD, cpu)

    def resize_then_normalise():
        x = F.interpolate(to_float(chunk), size=(128, 128), mode="bilinear", align_corners=False)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    preprocess = Preprocess(MEAN, STD, 128, channels_last=True)
    print(f"  resize, then normalise: {images_per_second(resize_then_normalise, 500):.0f}")
    print(f"  normalise, then resize (Preprocess): {images_per_second(lambda: preprocess(chunk), 500):.0f}")


if __name__ == "__main__":
    main()
