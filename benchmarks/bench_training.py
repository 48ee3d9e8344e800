"""Training throughput: images/s of the training loop per backbone, with the share of the
time spent waiting for the data loader, for two recipes: ``configs/sample.yaml`` as it is, and
the same at the production size (resize 256, crop 224, RandomResizedCrop scale 0.08-1).

    python -m benchmarks.bench_training [--quick|--full] [--arch mobilenet_v2]

It runs the project's own pieces (``training.config`` recipe, ``training.data`` loader and
augmentation, ``training.models.build_model``, the recipe's optimizer and label-smoothed
cross-entropy) for a fixed number of steps on the generated sample images; weights are random
(no download here), which does not change the cost of a step.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from benchmarks import passive_openmp, report
from benchmarks.timing import median_spread
from benchmarks.versions import BACKBONES, CROP, REPO, RESIZE, SCRATCH, bench_images

log = logging.getLogger(__name__)

SAMPLE_CONFIG = REPO / "configs" / "sample.yaml"
PRODUCTION_SIZE = {"resize_size": RESIZE, "crop_size": CROP, "random_crop_scale": [0.08, 1.0]}


def recipes(data_dir: Path) -> list:
    """The sample recipe as ``configs/sample.yaml`` has it, then the same at the production
    size, both reading ``data_dir``."""
    from training.config import load_config

    return [load_config(SAMPLE_CONFIG, {"data_dir": str(data_dir)}),
            load_config(SAMPLE_CONFIG, {"data_dir": str(data_dir), **PRODUCTION_SIZE})]


def train_steps(arch: str, samples: list, num_classes: int, recipe, steps: int,
                repeats: int, workers: int) -> dict:
    """Time ``repeats`` blocks of ``steps`` optimizer steps of ``recipe`` (a TrainConfig)
    after one warm-up step."""
    import torch
    from torch import nn

    from training.data import make_loader, train_transform
    from training.models import build_model
    from training.train import make_optimizer

    needed = (steps * repeats + 1) * recipe.batch_size
    pool = samples * (needed // len(samples) + 1)
    loader = make_loader(pool, train_transform(recipe.spec, recipe.random_crop_scale),
                         recipe.batch_size, workers, shuffle=True,
                         generator=torch.Generator().manual_seed(0))
    model = build_model(arch, num_classes, weights="none").train()
    optimizer = make_optimizer(recipe, model.parameters())
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    batches = iter(loader)

    def step() -> tuple[float, float, int]:
        t0 = time.perf_counter()
        x, y = next(batches)
        t1 = time.perf_counter()
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return t1 - t0, time.perf_counter() - t1, len(y)

    step()  # loader workers start, allocator warms up
    rates, shares = [], []
    for _ in range(repeats):
        wait = compute = 0.0
        seen = 0
        for _ in range(steps):
            w, c, n = step()
            wait, compute, seen = wait + w, compute + c, seen + n
        rates.append(seen / (wait + compute))
        shares.append(wait / (wait + compute))
    rate = median_spread(rates)
    return {"arch": arch, "crop": recipe.crop_size, "batch_size": recipe.batch_size,
            "images_per_s": rate["median"], "images_per_s_spread": [rate["min"], rate["max"]],
            "data_share": round(median_spread(shares)["median"], 3), "steps": steps * repeats}


def run(quick: bool = True, archs: list[str] | None = None, threads: int | None = None,
        scratch: Path = SCRATCH, workers: int = 2) -> dict:
    """The training section of a report."""
    import torch

    from serving.predictor import default_threads

    threads = threads or default_threads()
    torch.set_num_threads(threads)
    archs = archs or (["mobilenet_v2"] if quick else list(BACKBONES))
    sample_root = bench_images(scratch)["sample_root"][0]
    classes = sorted(p.name for p in sample_root.iterdir() if p.is_dir())
    samples = [(str(p), i) for i, c in enumerate(classes)
               for p in sorted((sample_root / c).glob("*.jpg"))]
    rows = []
    for arch in archs:
        for recipe in recipes(sample_root):
            large = recipe.crop_size >= CROP and arch == "resnet50"
            steps = 2 if quick else (3 if large else 5)
            row = train_steps(arch, samples, len(classes), recipe, steps, 2 if quick else 3,
                              workers)
            log.info("train %s crop %d: %.1f img/s, data %.0f%%", arch, row["crop"],
                     row["images_per_s"], 100 * row["data_share"])
            rows.append(row)
    return {"threads": threads, "workers": workers, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench_engines import add_common_args

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_training", description=__doc__)
    add_common_args(p)
    p.add_argument("--arch", action="append", choices=BACKBONES)
    p.add_argument("--workers", type=int, default=2, help="data loader workers")
    args = p.parse_args(argv)
    passive_openmp()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    section = run(args.quick, args.arch, args.threads, workers=args.workers)
    paths = report.write_run({"training": section}, args.out, quick=args.quick)
    print(paths["md"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
