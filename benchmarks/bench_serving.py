"""Servers over HTTP, side by side, on one model and one set of images:

- ``torchserve-stock``: TorchServe's stock ``image_classifier`` handler with default settings
  (batch size 1, default workers): what a user gets without this project;
- ``torchserve-ours-onnx`` / ``torchserve-ours-torchscript``: our handler and ``.mar``;
- ``onnx-server-fp32`` / ``onnx-server-int8``: our ONNX Runtime server (``python -m serving``);
- the in-process ceiling: ``serving.Predictor`` doing the same work with the same threads.

    python -m benchmarks.bench_serving [--quick|--full] [--server onnx-server-fp32 ...]

--quick measures all but the TorchScript archive for 4 s per point; --full all five for 8 s,
then the tuning sweep (:data:`TUNING`) at concurrency 16.

Closed loop at concurrency 1, 4, 16, 64, then open loop at Poisson rates up to the best
closed-loop rate, reporting the highest rate whose p99 stays under 100 ms with no errors. The
load generator (``benchmarks.loadgen``) is a separate process; every server runs on free
loopback ports (``serving.launch``) and is stopped when its turn ends, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchmarks import passive_openmp, report
from benchmarks.timing import measure
from benchmarks.versions import SCRATCH, backbone_version, bench_images, int8_view
from serving import launch

log = logging.getLogger(__name__)

SERVERS = ("torchserve-stock", "torchserve-ours-onnx", "torchserve-ours-torchscript",
           "onnx-server-fp32", "onnx-server-int8")
QUICK_SERVERS = ("torchserve-stock", "torchserve-ours-onnx", "onnx-server-fp32",
                 "onnx-server-int8")
CONCURRENCIES = (1, 4, 16, 64)
P99_LIMIT_MS = 100.0
REPO = Path(__file__).resolve().parents[1]


def loadgen(url: str, images: list[Path], mode: str, duration: float, timeout: float = 30.0,
            **params) -> dict:
    """One ``python -m benchmarks.loadgen`` run in its own process; its JSON result."""
    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.loadgen", "--url", url, "--mode", mode,
               "--duration", str(duration), "--timeout", str(timeout), "--out", str(out)]
        for image in images:
            cmd += ["--image", str(image)]
        for key, value in params.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                              timeout=duration * 3 + timeout + 120, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"loadgen failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def load_server(name: str, url: str, images: list[Path], settings: dict | None = None,
                concurrencies: tuple[int, ...] = CONCURRENCIES, duration: float = 5.0,
                open_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0),
                timeout: float = 30.0) -> dict:
    """Closed loop at each concurrency, then the open-loop sweep, against one running server.

    Open-loop rates are fractions of the best closed-loop rate; the sweep stops at the first
    rate whose p99 is over the limit or that had errors.
    """
    closed = []
    for c in concurrencies:
        warmup = max(1, math.ceil(8 / c))
        r = loadgen(url, images, "closed", duration, timeout, concurrency=c, warmup=warmup)
        log.info("%s closed c=%d: %.1f req/s, p50 %s ms, p99 %s ms, %d errors", name, c,
                 r["rps"], r["p50_ms"], r["p99_ms"], r["errors"])
        closed.append(r)
    best = max((r["rps"] for r in closed), default=0.0)
    opened, highest = [], None
    for fraction in open_fractions if best > 0 else ():
        rate = round(max(0.5, best * fraction), 2)
        r = loadgen(url, images, "open", duration, timeout, rate=rate)
        log.info("%s open %.1f/s: p50 %s ms, p99 %s ms, %d errors", name, rate, r["p50_ms"],
                 r["p99_ms"], r["errors"])
        opened.append(r)
        if r["errors"] or r["p99_ms"] is None or r["p99_ms"] >= P99_LIMIT_MS:
            break
        highest = rate
    return {"name": name, "url": url, "settings": settings or {}, "closed": closed,
            "open": opened, "max_rate_p99_under_100ms": highest}


def ceiling(version: Path, images: list[Path], threads: int, batch: int = 8,
            quick: bool = True) -> dict:
    """The in-process Predictor, same model, images and threads: one image at a time (the
    latency floor) and batches of ``batch`` (the throughput ceiling), decode included."""
    from serving.predictor import Predictor

    predictor = Predictor.load(version, intra_op_threads=threads, allow_spinning=False)
    bodies = [p.read_bytes() for p in images]
    cycle = iter(range(10**9))
    single = measure(lambda: predictor.predict(bodies[next(cycle) % len(bodies)]),
                     warmup=3, iters=30 if quick else 100, repeats=3,
                     max_seconds=6 if quick else 20)
    group = [bodies[i % len(bodies)] for i in range(batch)]
    batched = measure(lambda: predictor.predict_batch(group), items_per_call=batch, warmup=2,
                      iters=10 if quick else 30, repeats=3, max_seconds=6 if quick else 20)
    return {"threads": threads, "spinning": False, "batch": batch,
            "single_p50_ms": single["p50_ms"], "single_p99_ms": single["p99_ms"],
            "single_p50_ms_spread": single["p50_ms_spread"],
            "throughput_images_per_s": batched["items_per_s"],
            "throughput_spread": batched["items_per_s_spread"]}


def stock_mar(version: Path, out: Path) -> Path:
    """A .mar for TorchServe's stock image_classifier: the TorchScript model (``.pt``, which
    the base handler torch.jit.loads) and index_to_name.json; nothing else."""
    from serving.atomic import atomic_write, staging_dir, write_json
    from training.archive import index_to_name, model_archiver
    from training.version import load_version

    target = out / "food.mar"
    if target.is_file():
        return target
    with staging_dir(out, "stock-mar") as stage:
        shutil.copyfile(version / "model.ts", stage / "model.pt")
        write_json(stage / "index_to_name.json", index_to_name(load_version(version)))
        subprocess.run([model_archiver(), "--model-name", "food", "--version", "1",
                        "--serialized-file", str(stage / "model.pt"), "--handler",
                        "image_classifier", "--extra-files", str(stage / "index_to_name.json"),
                        "--export-path", str(stage), "--force"], check=True,
                       capture_output=True)
        atomic_write(target, lambda tmp: (stage / "food.mar").replace(tmp))
    return target


def ours_mar(version: Path, fmt: str, out: Path, threads: int, workers: int = 1,
             batch_size: int | None = None, batch_delay_ms: int | None = None) -> Path:
    """Our .mar (``training.archive``) with serve_config/model-config.yaml, its handler
    threads pinned to the shared budget (split over workers) and optional batch settings."""
    from training.archive import MODEL_CONFIG_YAML, build_archive

    config = yaml.safe_load(MODEL_CONFIG_YAML.read_text()) or {}
    config["minWorkers"] = config["maxWorkers"] = workers
    if batch_size is not None:
        config["batchSize"] = batch_size
    if batch_delay_ms is not None:
        config["maxBatchDelay"] = batch_delay_ms
    config.setdefault("handler", {})["threads"] = max(1, threads // workers)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "model-config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return build_archive(version, fmt, name="food", export_path=out, config_yaml=config_path)


def _torchserve_settings(mar: Path) -> dict:
    import zipfile

    with zipfile.ZipFile(mar) as z:
        if "model-config.yaml" in z.namelist():
            config = yaml.safe_load(z.read("model-config.yaml"))
            return {k: config.get(k) for k in ("minWorkers", "maxWorkers", "batchSize",
                                               "maxBatchDelay")} | {
                "handler_threads": (config.get("handler") or {}).get("threads")}
    return {"batchSize": 1, "workers": "TorchServe default (default_workers_per_model)",
            "handler": "image_classifier"}


@dataclass
class Server:
    """A server under measurement: where predictions go and the settings it runs with."""

    name: str
    url: str
    settings: dict = field(default_factory=dict)


def onnx_server(model: Path, logs: Path, threads: int = 2, max_batch_size: int = 8,
                max_batch_delay_ms: float = 5.0, preprocess_threads: int | None = None,
                spinning: bool = False) -> tuple[launch.Launched, dict]:
    """Our ONNX Runtime server (``python -m serving``) on ``model``; (server, its settings)."""
    args = ["--threads", str(threads), "--max-batch-size", str(max_batch_size),
            "--max-batch-delay-ms", str(max_batch_delay_ms), "--log-level", "warning"]
    if preprocess_threads:
        args += ["--preprocess-threads", str(preprocess_threads)]
    if spinning:
        args.append("--spinning")
    settings = {"threads": threads, "max_batch_size": max_batch_size,
                "max_batch_delay_ms": max_batch_delay_ms, "spinning": spinning,
                "preprocess_threads": preprocess_threads or "cpu count"}
    tag = "-".join(f"{k}{v}" for k, v in settings.items()).replace(" ", "")
    server = launch.start_onnx_server([f"food={model}"], logs / f"serving-{tag}.log",
                                      extra_args=args, ready_timeout=120, cwd=REPO)
    return server, settings


def torchserve(mar: Path, workdir: Path, settings: dict,
               env: dict[str, str] | None = None) -> tuple[launch.Launched, dict]:
    """TorchServe serving one ``.mar`` from a fresh ``workdir``; (server, its settings with
    the workers and batch size it actually runs). TorchServe keeps its default OpenMP policy
    unless ``env`` sets one: the stock baseline is TorchServe as a user gets it."""
    shutil.rmtree(workdir, ignore_errors=True)
    store = workdir / "model_store"
    store.mkdir(parents=True)
    shutil.copyfile(mar, store / "food.mar")
    server = launch.start_torchserve(store, {"food": "food.mar"}, workdir,
                                     env={"OMP_WAIT_POLICY": None, **(env or {})},
                                     ready_timeout=240)
    described = json.loads(launch.http_get(f"{server.management_url}/models/food")[1])[0]
    return server, {**settings, "workers_running": len(described.get("workers", [])),
                    "batchSize_running": described.get("batchSize")}


@contextlib.contextmanager
def start(kind: str, version: Path, scratch: Path, threads: int,
          **options) -> Iterator[Server]:
    """Server ``kind`` on ``version`` for the duration of the block; stopped afterwards."""
    env = options.pop("env", None)
    if kind == "torchserve-stock":
        mar = stock_mar(version, scratch / "mar" / "stock")
        server, settings = torchserve(mar, scratch / "ts-stock",
                                      _torchserve_settings(mar) | {"env": env}, env)
    elif kind.startswith("torchserve-ours-"):
        fmt = kind.removeprefix("torchserve-ours-")
        tag = "-".join(f"{k}{v}" for k, v in sorted(options.items())) + f"-t{threads}"
        mar = ours_mar(version, fmt, scratch / "mar" / f"ours-{fmt}-{tag}", threads, **options)
        server, settings = torchserve(mar, scratch / f"ts-ours-{fmt}",
                                      _torchserve_settings(mar) | {"env": env}, env)
    elif kind in ("onnx-server-fp32", "onnx-server-int8"):
        model = version if kind == "onnx-server-fp32" else int8_view(version)
        server, settings = onnx_server(model, scratch / "logs", threads=threads, **options)
    else:
        raise ValueError(f"unknown server {kind!r}; known: {', '.join(SERVERS)}")
    with server:
        yield Server(kind, f"{server.url}/predictions/food", settings)


TUNING = [  # (server, setting label, options): each runs closed loop at one concurrency
    ("onnx-server-fp32", "batch 1 (no batching)", {"max_batch_size": 1}),
    ("onnx-server-fp32", "batch 8, delay 0 ms", {"max_batch_delay_ms": 0.0}),
    ("onnx-server-fp32", "batch 8, delay 5 ms (default)", {}),
    ("onnx-server-fp32", "batch 16, delay 10 ms", {"max_batch_size": 16,
                                                   "max_batch_delay_ms": 10.0}),
    ("onnx-server-fp32", "spinning on", {"spinning": True}),
    ("onnx-server-fp32", "1 intra-op thread", {"threads": 1}),
    ("onnx-server-fp32", "1 preprocess thread", {"preprocess_threads": 1}),
    ("torchserve-ours-onnx", "1 worker x 2 threads, batch 8 (default)", {}),
    ("torchserve-ours-onnx", "2 workers x 1 thread, batch 8", {"workers": 2}),
    ("torchserve-ours-onnx", "1 worker, batch 1", {"batch_size": 1}),
    ("torchserve-ours-torchscript", "1 worker x 2 threads (default)", {}),
    ("torchserve-ours-torchscript", "1 worker x 2 threads, OMP_WAIT_POLICY=PASSIVE",
     {"env": {"OMP_WAIT_POLICY": "PASSIVE"}}),
    ("torchserve-ours-torchscript", "1 worker x 1 thread", {"threads": 1}),
    ("torchserve-stock", "defaults + OMP_WAIT_POLICY=PASSIVE",
     {"env": {"OMP_WAIT_POLICY": "PASSIVE"}}),
]


def tune(version: Path, images: list[Path], scratch: Path, threads: int, concurrency: int,
         duration: float) -> list[dict]:
    """Closed loop at one concurrency for each setting in :data:`TUNING`."""
    rows = []
    for kind, label, options in TUNING:
        opts = dict(options)
        server_threads = opts.pop("threads", threads)
        try:
            with start(kind, version, scratch, server_threads, **opts) as server:
                r = loadgen(server.url, images, "closed", duration, concurrency=concurrency,
                            warmup=2)
        except (RuntimeError, subprocess.SubprocessError, OSError) as e:
            log.error("tuning %s %s failed: %s", kind, label, e)
            rows.append({"server": kind, "setting": label, "p50_ms": None, "p99_ms": None,
                         "rps": None, "errors": f"failed: {str(e)[:200]}"})
            continue
        rows.append({"server": kind, "setting": label, "p50_ms": r["p50_ms"],
                     "p99_ms": r["p99_ms"], "rps": r["rps"], "errors": r["errors"]})
        log.info("tuning %s %s: %.1f req/s p99 %s ms", kind, label, r["rps"], r["p99_ms"])
    return rows


def run(quick: bool = True, kinds: list[str] | None = None, threads: int | None = None,
        scratch: Path = SCRATCH, tuning: bool | None = None) -> dict:
    """The serving section of a report."""
    from serving.predictor import default_threads

    threads = threads or default_threads()
    kinds = kinds or list(QUICK_SERVERS if quick else SERVERS)
    duration = 4.0 if quick else 8.0
    fractions = (0.25, 0.5, 0.75, 1.0) if quick else (0.2, 0.4, 0.6, 0.8, 0.9, 1.0)
    imgs = bench_images(scratch)
    images = imgs["small"]
    version = backbone_version("mobilenet_v2", images)
    section = {"model": "mobilenet_v2 (random weights), 101 classes, resize 256 / crop 224",
               "image": f"{len(images)} JPEGs of 500x375, cycled", "threads": threads,
               "duration_s": duration, "servers": [],
               "ceiling": ceiling(version, images, threads, quick=quick)}
    for kind in kinds:
        try:
            with start(kind, version, scratch, threads) as server:
                section["servers"].append(load_server(kind, server.url, images,
                                                      server.settings, duration=duration,
                                                      open_fractions=fractions))
        except (RuntimeError, subprocess.SubprocessError, OSError) as e:
            log.error("%s failed: %s", kind, e)
            section["servers"].append({"name": kind, "error": str(e)[:2000], "closed": [],
                                       "open": [], "max_rate_p99_under_100ms": None})
    if tuning if tuning is not None else not quick:
        section["tuning_concurrency"] = 16
        section["tuning"] = tune(version, images, scratch, threads, 16, duration)
    return section


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench_engines import add_common_args

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--server", action="append", choices=SERVERS,
                   help="server(s) to measure (default: all)")
    p.add_argument("--tuning", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the tuning sweep (default: only with --full)")
    args = p.parse_args(argv)
    passive_openmp()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    section = run(args.quick, args.server, args.threads, tuning=args.tuning)
    paths = report.write_run({"serving": section}, args.out, quick=args.quick)
    print(paths["md"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
