"""JPEG draft (reduced-DCT) decoding against full decoding: top-1 agreement and time.

``python -m benchmarks.draft_decode [--quick/--full]`` runs every model it finds with each
model's own preprocessing spec: every trained version under ``artifacts/*/`` (the decision
rests on these) and the random-weight benchmark backbones under
``benchmarks/scratch/models/*/latest`` (reported apart: their answers are near-ties, so
their agreement is a stress test, not a quality figure). Images: the phone photo set with
every framing for agreement (``benchmarks.photos.agreement_images``: 12 MP, 8 MP, 5 MP,
1080p) and its center crops for time (``phone_images``), and the sample dataset's own JPEGs
(a trained version's validation images, else all of ``data/sample``).

For each draft factor (the decoder keeps both sides >= factor x resize_size, then the usual
antialiased resize runs) it reports top-1 agreement with full decoding, how many images the
draft changed at all, the mean absolute difference of the model input, and the median
decode+preprocess time per image size (``benchmarks.timing.measure``). The decision rule:
draft goes on by default only with agreement >= 99.5 % on every trained model and image set,
and only if it is faster on every phone size. Writes ``benchmarks/results/draft-<stamp>``
``.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.photos import agreement_images, phone_images
from benchmarks.timing import measure
from benchmarks.versions import REPO, SCRATCH
from serving.artifacts import ModelArtifacts, read_model
from serving.atomic import atomic_write_bytes, write_json
from serving.predictor import softmax
from serving.preprocess import PreprocessSpec, decode_image, draft_target, preprocess_bytes

log = logging.getLogger(__name__)

FACTORS = (1, 2)
AGREEMENT_GOAL = 0.995
SAMPLE_ROOT = REPO / "data" / "sample"
RESULTS = REPO / "benchmarks" / "results"
BATCH = 16


def trained_versions(repo: Path = REPO) -> list[Path]:
    """Every complete version directory under ``artifacts/<model>/`` (the ``latest`` link
    is skipped: it names one of them)."""
    return sorted(p for p in (repo / "artifacts").glob("*/v*")
                  if p.is_dir() and not p.is_symlink() and (p / "model_config.json").is_file())


def random_versions(scratch: Path = SCRATCH) -> list[Path]:
    """The benchmark backbones' ``latest`` versions (random weights)."""
    return sorted(p.resolve() for p in (scratch / "models").glob("*/latest")
                  if (p / "model_config.json").is_file())


def model_runner(artifacts: ModelArtifacts) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """``(engine, logits_fn)``: ONNX Runtime when the version is exported, else the eager
    torch model rebuilt from ``model.pth``."""
    if "onnx" in artifacts.formats:
        from serving import engines
        from serving.predictor import default_threads

        return "onnx", engines.build(artifacts.model_bytes("onnx"), engines.REFERENCE,
                                     default_threads()).infer
    import torch

    from training.models import load_eager

    model = load_eager(artifacts)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    return "eager", run


def sample_images(artifacts: ModelArtifacts, root: Path | None = None) -> list[Path]:
    """The version's validation images when it lists them, else every JPEG under ``root``
    (default: ``data/sample``)."""
    listed = [REPO / p for p, _ in artifacts.validation_samples()]  # relative: to the repo
    return [p for p in listed if p.is_file()] or sorted((root or SAMPLE_ROOT).rglob("*.jpg"))


def image_sets(artifacts: ModelArtifacts, scratch: Path,
               sample_root: Path | None = None) -> dict[str, list[Path]]:
    """``{"12mp": [...], ..., "1080p": [...], "sample": [...]}`` for one model; empty sets
    (no ``data/sample`` yet) are left out."""
    sets = {**agreement_images(scratch), "sample": sample_images(artifacts, sample_root)}
    return {name: paths for name, paths in sets.items() if paths}


def _chunks(paths: list[Path], n: int) -> Iterator[list[Path]]:
    for i in range(0, len(paths), n):
        yield paths[i:i + n]


def agreement(spec: PreprocessSpec, logits: Callable[[np.ndarray], np.ndarray],
              paths: list[Path], factors: tuple[int, ...] = FACTORS) -> list[dict]:
    """One row per draft factor: how many of ``paths`` the draft changed, the mean absolute
    input difference, top-1 agreement with full decoding and, over the images whose top-1
    flipped, the largest full-decode margin between the first two classes (a flip of a
    near-tie is not a flip of a confident answer)."""
    stats = {f: {"changed": 0, "agree": 0, "abs_diff": 0.0, "flip_margin": None}
             for f in factors}
    for chunk in _chunks(paths, BATCH):
        datas = [p.read_bytes() for p in chunk]
        full = np.stack([preprocess_bytes(d, spec, draft_factor=None) for d in datas])
        full_probs = None
        for f in factors:
            draft = np.stack([preprocess_bytes(d, spec, draft_factor=f) for d in datas])
            same = np.array([np.array_equal(a, b) for a, b in zip(full, draft, strict=True)])
            s = stats[f]
            s["changed"] += int((~same).sum())
            s["abs_diff"] += float(np.abs(full - draft).mean(axis=(1, 2, 3)).sum())
            if same.all():  # identical inputs give identical answers: no model run needed
                s["agree"] += len(chunk)
                continue
            if full_probs is None:
                full_probs = softmax(logits(full))
            flipped = logits(draft).argmax(1) != full_probs.argmax(1)
            s["agree"] += int((~flipped).sum())
            if flipped.any():
                top2 = np.sort(full_probs[flipped], axis=1)[:, -2:]
                margin = float((top2[:, 1] - top2[:, 0]).max())
                s["flip_margin"] = max(margin, s["flip_margin"] or 0.0)
    n = len(paths)
    return [{"factor": f, "n": n, "changed": s["changed"],
             "agreement": round(s["agree"] / n, 4) if n else None,
             "mean_abs_input_diff": round(s["abs_diff"] / n, 5) if n else None,
             "max_flip_margin": None if s["flip_margin"] is None else round(s["flip_margin"], 4)}
            for f, s in stats.items()]


def model_rows(version: Path, label: str, scratch: Path, factors: tuple[int, ...] = FACTORS,
               sample_root: Path | None = None) -> dict:
    """Agreement of every draft factor on every image set, for one model version."""
    artifacts = read_model(version)
    engine, logits = model_runner(artifacts)
    sets = []
    for name, paths in image_sets(artifacts, scratch, sample_root).items():
        for row in agreement(artifacts.spec, logits, paths, factors):
            sets.append({"set": name, **row})
            log.info("%s %s draft x%d: %d images, %d changed, agreement %.4f", version, name,
                     row["factor"], row["n"], row["changed"], row["agreement"])
    return {"version": str(version), "kind": label, "arch": artifacts.arch, "engine": engine,
            "spec": artifacts.spec.to_dict(), "sets": sets}


def _decoded_size(data: bytes, spec: PreprocessSpec, factor: int | None) -> str:
    img = decode_image(data, draft_size=draft_target(spec, factor))
    return f"{img.width}x{img.height}"


def timing(spec: PreprocessSpec, sets: dict[str, list[Path]], quick: bool,
           factors: tuple[int, ...] = FACTORS) -> list[dict]:
    """Median decode+preprocess time per image of each set, full and per draft factor; each
    timed call takes the next image of the set."""
    rows = []
    for name, paths in sets.items():
        datas = [p.read_bytes() for p in paths]
        big = max(len(d) for d in datas) > 200_000
        for factor in (None, *factors):
            cycle = itertools.cycle(datas)

            def one(cycle=cycle, factor=factor) -> None:
                preprocess_bytes(next(cycle), spec, draft_factor=factor)

            stats = measure(one, warmup=2, iters=len(datas) if big else 4 * len(datas),
                            repeats=3, max_seconds=(6 if quick else 15) if big else 4)
            rows.append({"set": name, "resize": spec.resize_size, "crop": spec.crop_size,
                         "factor": factor, "decoded": _decoded_size(datas[0], spec, factor),
                         "mean_kb": round(sum(map(len, datas)) / len(datas) / 1024),
                         **stats})
            log.info("%s resize %d draft %s: p50 %.1f ms", name, spec.resize_size, factor,
                     stats["p50_ms"])
    return rows


def decide(models: list[dict], times: list[dict], factors: tuple[int, ...] = FACTORS,
           goal: float = AGREEMENT_GOAL) -> dict:
    """The issue's rule per factor (agreement >= ``goal`` on every trained model and set,
    faster on every phone size); the default is the passing factor with the best worst-case
    agreement (then the fastest), or None (off)."""
    trained = [m for m in models if m["kind"] == "trained"]
    if not trained:
        return {"default_factor": None, "why": "no trained version under artifacts/: run "
                "`make train`, then this again; draft stays off", "factors": []}
    per_factor = []
    for f in factors:
        rows = [s for m in trained for s in m["sets"] if s["factor"] == f and s["n"]]
        worst = min(rows, key=lambda s: s["agreement"])
        speedups = []
        for full in (t for t in times if t["factor"] is None and t["set"] != "sample"):
            draft = next(t for t in times if t["factor"] == f and t["set"] == full["set"]
                         and t["resize"] == full["resize"])
            speedups.append(round(full["p50_ms"] / draft["p50_ms"], 2))
        ok_agree, ok_speed = worst["agreement"] >= goal, min(speedups) > 1.0
        per_factor.append({"factor": f, "worst_agreement": worst["agreement"],
                           "worst_set": worst["set"], "min_speedup": min(speedups),
                           "max_speedup": max(speedups), "agreement_ok": ok_agree,
                           "faster": ok_speed, "passes": ok_agree and ok_speed})
    passing = [p for p in per_factor if p["passes"]]
    if not passing:
        misses = "; ".join(f"x{p['factor']}: worst agreement {p['worst_agreement']:.2%} "
                           f"({p['worst_set']}), speedup {p['min_speedup']}-"
                           f"{p['max_speedup']}x" for p in per_factor)
        return {"default_factor": None, "factors": per_factor,
                "why": f"no factor meets agreement >= {goal:.1%} and faster: {misses}"}
    best = max(passing, key=lambda p: (p["worst_agreement"], p["min_speedup"]))
    return {"default_factor": best["factor"], "factors": per_factor,
            "why": f"x{best['factor']}: worst agreement {best['worst_agreement']:.2%} "
                   f"({best['worst_set']}), {best['min_speedup']}-{best['max_speedup']}x "
                   f"faster on phone photos"}


def _fmt_factor(f: int | None) -> str:
    return "full" if f is None else f"draft x{f}"


def _fmt_margin(margin: float | None) -> str:
    return "-" if margin is None else f"<= {margin:.3f}"


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(*cells: str) -> list[str]:
    return [_row(*cells), "|" + "---|" * len(cells)]


MODEL_TITLES = {
    "trained": "Trained versions (the decision rests on these)",
    "random-weight": ("Random-weight benchmark backbones (near-tie answers: a stress test, "
                      "not a quality figure)"),
}
NOTES = ("Flips' top-2 margin: over the images whose top-1 changed, the largest gap between "
         "the two most probable classes under full decoding (small: the flips are near-ties). "
         "Decoded size: the first image of the set as `decode_image` returns it (upright). "
         "`changed`: images whose model input differs at all from full decoding; a "
         "JPEG under 2 x factor x resize_size on its short side decodes in full, so small "
         "images are unchanged.")


def markdown(result: dict) -> str:
    """The agreement and time tables and the decision, for a person."""
    mode = "--quick" if result["quick"] else "--full"
    box, load = result["machine"], result["load_average"]
    decision = result["decision"]
    lines = [f"# JPEG draft decoding vs full decoding ({result['timestamp']})", "",
             (f"`python -m benchmarks.draft_decode {mode}` on {box['cpu']} "
              f"({box['usable_cores']} cores), load average {load['before'][0]:.2f} before, "
              f"{load['after'][0]:.2f} after."), "",
             "## Decision", "",
             (f"Default draft factor: **{decision['default_factor']}** (None = off). "
              f"{decision['why']}."), ""]
    if decision["factors"]:
        lines += _header("factor", "worst agreement (set)", "speedup on phone photos",
                         "agreement >= 99.5 %", "faster", "passes")
        lines += [_row(f"x{p['factor']}", f"{p['worst_agreement']:.2%} ({p['worst_set']})",
                       f"{p['min_speedup']}-{p['max_speedup']}x", p["agreement_ok"],
                       p["faster"], p["passes"]) for p in decision["factors"]]
        lines.append("")
    for kind, title in MODEL_TITLES.items():
        lines += [f"## {title}", ""]
        models = [m for m in result["models"] if m["kind"] == kind]
        if not models:
            lines += ["none found", ""]
            continue
        lines += _header("version", "engine", "resize/crop", "set", "images", "factor",
                         "changed", "top-1 agreement", "flips' top-2 margin",
                         "mean abs input diff")
        for m in models:
            spec = f"{m['spec']['resize_size']}/{m['spec']['crop_size']}"
            name = os.path.relpath(m["version"], REPO)
            lines += [_row(name, m["engine"], spec, s["set"], s["n"], f"x{s['factor']}",
                           s["changed"], f"{s['agreement']:.2%}",
                           _fmt_margin(s.get("max_flip_margin")),
                           f"{s['mean_abs_input_diff']:.4f}") for s in m["sets"]]
        lines.append("")
    lines += ["## Decode + preprocess time per image (median of 3 blocks, ms)", ""]
    lines += _header("set", "mean KB", "resize/crop", "decode", "decoded size",
                     "p50 ms (spread)", "images/s", "speedup")
    for t in result["timing"]:
        full = next(u for u in result["timing"] if u["set"] == t["set"]
                    and u["resize"] == t["resize"] and u["factor"] is None)
        lo, hi = t["p50_ms_spread"]
        lines.append(_row(t["set"], t["mean_kb"], f"{t['resize']}/{t['crop']}",
                          _fmt_factor(t["factor"]), t["decoded"],
                          f"{t['p50_ms']:.1f} ({lo:.1f}-{hi:.1f})", f"{t['items_per_s']:.1f}",
                          f"{full['p50_ms'] / t['p50_ms']:.2f}x"))
    lines += ["", NOTES, ""]
    return "\n".join(lines)


def run(quick: bool = True, scratch: Path = SCRATCH, out_dir: Path = RESULTS,
        versions: list[Path] | None = None) -> dict[str, Path]:
    """Measure, decide, write ``draft-<stamp>.json`` and ``.md``; returns their paths."""
    from benchmarks.report import machine

    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()
    found = ([(v, "trained") for v in versions] if versions is not None else
             [(v, "trained") for v in trained_versions()] +
             [(v, "random-weight") for v in random_versions(scratch)])
    models = [model_rows(v, label, scratch) for v, label in found]
    specs = {PreprocessSpec.from_dict(m["spec"]) for m in models} or {PreprocessSpec()}
    sets = {**phone_images(scratch), "sample": sorted(SAMPLE_ROOT.rglob("*.jpg"))}
    sets = {k: v for k, v in sets.items() if v}
    times = [row for spec in sorted(specs, key=lambda s: s.resize_size)
             for row in timing(spec, sets, quick)]
    result = {"timestamp": started.isoformat(timespec="seconds"), "quick": quick,
              "machine": machine(),
              "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
              "factors": list(FACTORS), "agreement_goal": AGREEMENT_GOAL,
              "photos": {k: [p.name for p in v] for k, v in phone_images(scratch).items()},
              "models": models, "timing": times, "decision": decide(models, times)}
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    paths = {"json": out_dir / f"draft-{stamp}.json", "md": out_dir / f"draft-{stamp}.md"}
    write_json(paths["json"], result)
    atomic_write_bytes(paths["md"], markdown(result).encode())
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.draft_decode",
                                     description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="quick", action="store_true", default=True,
                      help="shorter timing blocks (default)")
    mode.add_argument("--full", dest="quick", action="store_false", help="longer timing blocks")
    parser.add_argument("--model", action="append", type=Path, dest="versions",
                        help="a trained version to measure (repeatable; default: every "
                             "version under artifacts/ plus the benchmark backbones)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    paths = run(args.quick, out_dir=args.out, versions=args.versions)
    print(paths["md"].read_text())
    print(f"wrote {paths['json']} and {paths['md']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
