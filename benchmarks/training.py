"""Training throughput: images/s of the training loop per backbone, at the sample config
(crop 96) and at 224, with the share of the time spent waiting for the data loader.

    python -m benchmarks.training [--quick|--full] [--arch mobilenet_v2]

It runs the project's own pieces (``training.data`` loader and augmentation,
``training.models.build_model``, Adam, label-smoothed cross-entropy) for a fixed number of
steps on the generated sample images; weights are random (no download here), which does not
change the cost of a step.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from benchmarks import passive_openmp, report
from benchmarks.timing import median_spread
from benchmarks.versions import BACKBONES, SCRATCH, bench_images

log = logging.getLogger(__name__)

SAMPLE = {"resize": 112, "crop": 96, "batch_size": 32, "scale": (0.5, 1.0)}  # configs/sample
FULL_SIZE = {"resize": 256, "crop": 224, "batch_size": 32, "scale": (0.08, 1.0)}


def train_steps(arch: str, samples: list, num_classes: int, setting: dict, steps: int,
                repeats: int, workers: int) -> dict:
    """Time ``repeats`` blocks of ``steps`` optimizer steps after one warm-up step."""
    import torch
    from torch import nn

    from serving.preprocess import PreprocessSpec
    from training.data import make_loader, train_transform
    from training.models import build_model

    spec = PreprocessSpec(resize_size=setting["resize"], crop_size=setting["crop"])
    needed = (steps * repeats + 1) * setting["batch_size"]
    pool = samples * (needed // len(samples) + 1)
    loader = make_loader(pool, train_transform(spec, setting["scale"]), setting["batch_size"],
                         workers, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = build_model(arch, num_classes, weights="none").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
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
    return {"arch": arch, "crop": setting["crop"], "batch_size": setting["batch_size"],
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
        for setting in (SAMPLE, FULL_SIZE):
            steps = 2 if quick else (3 if setting is FULL_SIZE and arch == "resnet50" else 5)
            row = train_steps(arch, samples, len(classes), setting, steps, 2 if quick else 3,
                              workers)
            log.info("train %s crop %d: %.1f img/s, data %.0f%%", arch, row["crop"],
                     row["images_per_s"], 100 * row["data_share"])
            rows.append(row)
    return {"threads": threads, "workers": workers, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.engines import add_common_args

    p = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__)
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
