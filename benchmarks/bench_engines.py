"""Engines in process: eager PyTorch, TorchScript and every engine variant of
``serving.engines`` (ONNX Runtime fp32 and int8, OpenVINO bf16 and int8), per backbone and
batch size, plus the preprocessing cost for a small and a phone-sized JPEG.

    python -m benchmarks.bench_engines [--quick] [--arch mobilenet_v2] [--threads 2]

Every engine gets the same intra-op thread budget (``--threads``, default: the CPUs this
process may use). Inputs are real preprocessed images, not zeros.
"""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path

import numpy as np

from benchmarks import passive_openmp, report
from benchmarks.photos import phone_images
from benchmarks.timing import measure
from benchmarks.versions import (
    BACKBONES,
    SCRATCH,
    backbone_version,
    bench_images,
    variant_agreement,
)
from serving import engines

log = logging.getLogger(__name__)

ENGINES = ("eager", "torchscript", *(v.name for v in engines.VARIANTS))
BATCH_SIZES = (1, 8)


def _runner(engine: str, version: Path, threads: int, spinning: bool = True):
    """A function (N,3,H,W) float32 -> logits for one engine, with ``threads`` threads."""
    if engine in ("eager", "torchscript"):
        import torch

        torch.set_num_threads(threads)
        if engine == "eager":
            from training.models import load_eager
            from training.version import load_version

            model = load_eager(load_version(version))
        else:
            model = torch.jit.load(str(version / "model.ts"), map_location="cpu").eval()

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()
        return run

    from serving.artifacts import MODEL_FILES

    variant = engines.variant_named(engine)
    model = (version / MODEL_FILES[variant.model_format]).read_bytes()
    return engines.build(model, variant, threads, spinning).infer


def bench_engines(versions: dict[str, Path], images: list[Path], threads: int,
                  quick: bool) -> list[dict]:
    """One row per (arch, engine, batch size); ``versions`` maps a backbone to an exported
    version directory (model.pth, model.ts, model.onnx, model.int8.onnx)."""
    from serving.preprocess import preprocess_bytes
    from training.version import load_version

    rows = []
    for arch, version in versions.items():
        spec = load_version(version).spec
        pool = np.stack([preprocess_bytes(p.read_bytes(), spec) for p in images])
        for engine in ENGINES:
            why = engines.unavailable(engines.BY_NAME[engine]) if engine in engines.BY_NAME \
                else None
            if why:
                log.warning("%s skipped: %s", engine, why)
                continue
            infer = _runner(engine, version, threads)
            for bs in BATCH_SIZES:
                x = np.ascontiguousarray(np.resize(pool, (bs, *pool.shape[1:])))
                stats = measure(partial(infer, x), items_per_call=bs, warmup=2 if quick else 5,
                                iters=15 if quick else 40, repeats=3,
                                max_seconds=6 if quick else 12)
                rows.append({"arch": arch, "engine": engine, "batch": bs, **stats})
                log.info("%s %s batch %d: p50 %.1f ms, %.1f img/s", arch, engine, bs,
                         stats["p50_ms"], stats["items_per_s"])
    return rows


DRAFT_FACTOR = 2  # the factor to opt in with (benchmarks.draft_decode measured it)


def bench_preprocess(images: dict[str, Path], quick: bool) -> list[dict]:
    """Decode and decode+resize+crop+normalize at crop 224, with full decoding (the default)
    and with JPEG draft decoding at DRAFT_FACTOR, for each ``label -> image``."""
    from PIL import Image

    from serving.preprocess import PreprocessSpec, decode_image, draft_target, preprocess_bytes

    spec = PreprocessSpec(resize_size=256, crop_size=224)
    rows = []
    for label, path in images.items():
        data = path.read_bytes()
        with Image.open(path) as img:
            size = f"{img.width}x{img.height}"
        big = img.width * img.height > 1_000_000
        for draft in (False, True):
            factor = DRAFT_FACTOR if draft else None
            for step, fn in (("decode", partial(decode_image, data,
                                                draft_size=draft_target(spec, factor))),
                             ("decode+preprocess",
                              partial(preprocess_bytes, data, spec, draft_factor=factor))):
                stats = measure(fn, warmup=1 if big else 3,
                                iters=(5 if quick else 15) if big else 40,
                                repeats=3, max_seconds=6 if quick else 15)
                rows.append({"image": label, "size": size, "bytes": len(data),
                             "draft": draft, "step": step, **stats})
    return rows


def run(quick: bool = True, archs: list[str] | None = None, threads: int | None = None,
        trained: Path | None = None, scratch: Path = SCRATCH) -> dict:
    """The engines section of a report."""
    from serving.predictor import default_threads

    threads = threads or default_threads()
    archs = archs or (["mobilenet_v2"] if quick else list(BACKBONES))
    imgs = bench_images(scratch)
    return {"threads": threads, "archs": archs,
            "rows": bench_engines({a: backbone_version(a, imgs["small"]) for a in archs},
                                  imgs["small"], threads, quick),
            "preprocess": bench_preprocess(
                {"small": imgs["small"][0],
                 **{size: photos[0] for size, photos in phone_images(scratch).items()
                    if size in ("1080p", "12mp")}}, quick),
            "variant_agreement": variant_agreement(trained, scratch)}


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="the short set (make bench)")
    p.add_argument("--full", dest="quick", action="store_false", help="the long set")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads for every engine/server (default: CPU count)")
    p.add_argument("--out", type=Path, default=report.RESULTS,
                   help="where <timestamp>.json/.md/.png go (default: %(default)s)")
    p.add_argument("--trained", type=Path, default=Path("artifacts/food/latest"),
                   help="a trained version for int8 agreement (default: %(default)s)")
    p.set_defaults(quick=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_engines", description=__doc__)
    add_common_args(p)
    p.add_argument("--arch", action="append", choices=BACKBONES,
                   help="backbone(s) (default: mobilenet_v2 with --quick, all with --full)")
    args = p.parse_args(argv)
    passive_openmp()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    section = run(args.quick, args.arch, args.threads, args.trained)
    paths = report.write_run({"engines": section}, args.out, quick=args.quick)
    print(paths["md"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
