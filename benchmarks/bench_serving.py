"""Servers over HTTP, side by side, on one model and one set of images:

- ``torchserve-stock``: TorchServe's stock ``image_classifier`` handler with default settings
  (batch size 1, default workers): what a user gets without this project;
- ``torchserve-ours-onnx`` / ``torchserve-ours-torchscript``: our handler and ``.mar``;
- ``onnx-server-fp32``: our server (``python -m serving``) on ONNX Runtime fp32;
  ``onnx-server-best``: the same server on its default (``--engine auto``: the fastest
  variant export validated); ``onnx-server-<variant>``: on one named variant;
- the peers (``benchmarks.peers``): PyTriton and LitServe serving the same ONNX Runtime
  fp32 model with our preprocessing, each configured as its docs recommend for CPU batching;
- the in-process ceiling: what the cores can do at best, from the core-milliseconds one
  image costs to preprocess and to infer at the batch sizes the server forms.

    python -m benchmarks.bench_serving [--quick|--full] [--server onnx-server-fp32 ...]

Every HTTP point (closed loop at concurrency 1, 4, 16, 64; open loop at Poisson rates up to
the best closed-loop rate) is the median of ``--repeats`` runs (3); the open-loop sweep
reports the highest rate whose median p99 stays under 100 ms with no errors. Then phone
photos (12 MP and 1080p uploads) and the streams comparison (two batches of one thread vs
one of two) at concurrency 16. The load generator (``benchmarks.loadgen``) is a separate
process; every server runs on free loopback ports and is stopped when its turn ends, also on
failure.
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
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from benchmarks import passive_openmp, report
from benchmarks.bench_engines import DRAFT_FACTOR
from benchmarks.timing import measure, median_spread
from benchmarks.versions import SCRATCH, backbone_version, bench_images
from serving import engines, launch

log = logging.getLogger(__name__)

PEERS = ("pytriton", "litserve")
VARIANT_SERVERS = tuple(f"onnx-server-{v.name}" for v in engines.VARIANTS[1:])
SERVERS = ("torchserve-stock", "torchserve-ours-onnx", "torchserve-ours-torchscript",
           "onnx-server-fp32", "onnx-server-best", *VARIANT_SERVERS, *PEERS)
QUICK_SERVERS = ("torchserve-stock", "torchserve-ours-onnx", "onnx-server-fp32",
                 "onnx-server-best", *PEERS)
CONCURRENCIES = (1, 4, 16, 64)
REPEATS = 3
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


def point(url: str, images: list[Path], mode: str, duration: float, timeout: float = 30.0,
          repeats: int = REPEATS, **params) -> dict:
    """One HTTP point: ``repeats`` load runs, each figure the median over them (its min and
    max kept as ``<key>_spread``), errors summed, every run kept under ``runs``."""
    runs = [loadgen(url, images, mode, duration, timeout, **params) for _ in range(repeats)]
    out = {key: value for key, value in runs[0].items() if not isinstance(value, (int, float))
           or key in ("concurrency", "rate")}
    for key in ("rps", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms",
                "client_cpu_ms_per_request"):
        spread = median_spread([r.get(key) for r in runs])
        out[key], out[f"{key}_spread"] = spread["median"], [spread["min"], spread["max"]]
    out["errors"] = sum(r["errors"] for r in runs)
    out["error_kinds"] = dict(sum((Counter(r["error_kinds"]) for r in runs), Counter()))
    out["sent"], out["ok"] = sum(r["sent"] for r in runs), sum(r["ok"] for r in runs)
    out["runs"] = [{k: r.get(k) for k in ("rps", "p50_ms", "p99_ms", "errors")} for r in runs]
    return out


def load_server(name: str, url: str, images: list[Path], settings: dict | None = None,
                concurrencies: tuple[int, ...] = CONCURRENCIES, duration: float = 5.0,
                open_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0),
                timeout: float = 30.0, repeats: int = REPEATS, metrics_url: str | None = None,
                **params) -> dict:
    """Closed loop at each concurrency, then the open-loop sweep, against one running server;
    every point the median of ``repeats`` runs. ``params`` go to the load generator (the
    request ``body`` a peer needs). With ``metrics_url`` each closed point also records the
    mean batch size the server formed.

    Open-loop rates are fractions of the best closed-loop rate; the sweep stops at the first
    rate whose p99 is over the limit or that had errors.
    """
    closed = []
    for c in concurrencies:
        warmup = max(1, math.ceil(8 / c))
        before, _ = mean_batch(metrics_url)
        r = point(url, images, "closed", duration, timeout, repeats, concurrency=c,
                  warmup=warmup, **params)
        r["mean_batch"] = mean_batch(metrics_url, before)[1]
        log.info("%s closed c=%d: %.1f req/s, p50 %s ms, p99 %s ms, %d errors", name, c,
                 r["rps"] or 0.0, r["p50_ms"], r["p99_ms"], r["errors"])
        closed.append(r)
    best = max((r["rps"] or 0.0 for r in closed), default=0.0)
    opened, highest = [], None
    for fraction in open_fractions if best > 0 else ():
        rate = round(max(0.5, best * fraction), 2)
        r = point(url, images, "open", duration, timeout, repeats, rate=rate, **params)
        log.info("%s open %.1f/s: p50 %s ms, p99 %s ms, %d errors", name, rate, r["p50_ms"],
                 r["p99_ms"], r["errors"])
        opened.append(r)
        if r["errors"] or r["p99_ms"] is None or r["p99_ms"] >= P99_LIMIT_MS:
            break
        highest = rate
    return {"name": name, "url": url, "settings": settings or {}, "repeats": repeats,
            "closed": closed, "open": opened, "max_rate_p99_under_100ms": highest}


def ceiling(version: Path, images: list[Path], cores: int, engine: str = engines.AUTO,
            precision: str = engines.AUTO, batches: tuple[int, ...] = (1, 2, 4, 8),
            quick: bool = True) -> dict:
    """What ``cores`` cores can serve at best, from in-process costs on one thread each:
    core-ms to decode and preprocess one image, and core-ms per image to infer at each
    batch size, on the variant the server would run. images/s at batch b =
    cores * 1000 / (preprocess + inference(b)): no HTTP, no queueing, every core busy.
    Also the single-image latency floor with all the threads (decode + infer)."""
    from serving.predictor import Predictor

    one = Predictor.load(version, intra_op_threads=1, allow_spinning=False, engine=engine,
                         precision=precision)
    bodies = [p.read_bytes() for p in images]
    cycle = iter(range(10**9))
    budget = 4 if quick else 12
    pre = measure(lambda: one.decode(bodies[next(cycle) % len(bodies)]), warmup=3,
                  iters=60, repeats=3, max_seconds=budget)
    pool = np.stack([one.decode(b) for b in bodies])
    per_batch = {}
    for b in batches:
        x = np.ascontiguousarray(np.resize(pool, (b, *pool.shape[1:])))
        stats = measure(lambda x=x: one.infer(x), items_per_call=b, warmup=2, iters=40,
                        repeats=3, max_seconds=budget)
        core_ms = 1000 / stats["items_per_s"]
        per_batch[b] = {"inference_core_ms_per_image": round(core_ms, 3),
                        "images_per_s": round(cores * 1000 / (pre["p50_ms"] + core_ms), 1)}
    full = Predictor.load(version, intra_op_threads=cores, allow_spinning=False, engine=engine,
                          precision=precision)
    single = measure(lambda: full.predict(bodies[next(cycle) % len(bodies)]), warmup=3,
                     iters=30 if quick else 100, repeats=3, max_seconds=budget)
    return {"variant": one.runtime, "cores": cores,
            "preprocess_core_ms": pre["p50_ms"], "per_batch": per_batch,
            "single_p50_ms": single["p50_ms"], "single_p99_ms": single["p99_ms"],
            "single_p50_ms_spread": single["p50_ms_spread"]}


def mean_batch(metrics_url: str | None, before: tuple[float, float] | None = None
               ) -> tuple[tuple[float, float] | None, float | None]:
    """(sum, count) of the server's batch-size histogram now, and the mean batch size since
    ``before`` (None when the server exposes no such metric)."""
    if not metrics_url:
        return None, None
    try:
        text = launch.http_get(metrics_url)[1].decode()
    except OSError:
        return None, None
    from prometheus_client.parser import text_string_to_metric_families

    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "onnx_server_batch_size":
            total += sum(s.value for s in family.samples if s.name.endswith("_sum"))
            count += sum(s.value for s in family.samples if s.name.endswith("_count"))
    now = (total, count)
    if before is None or count <= before[1]:
        return now, None
    return now, round((total - before[0]) / (count - before[1]), 2)


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


def ours_mar(version: Path, fmt: str, out: Path, threads: int, workers: int = 2,
             batch_size: int | None = None, batch_delay_ms: int | None = None) -> Path:
    """Our .mar (``training.archive``) with serve_config/model-config.yaml (2 workers, as
    shipped), its handler threads pinned to the shared budget (split over workers) and
    optional batch settings."""
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
    """A server under measurement: where predictions go, the request body it takes (see
    ``benchmarks.loadgen --body``), the settings it runs with and its Prometheus address."""

    name: str
    url: str
    settings: dict = field(default_factory=dict)
    body: str = "raw"
    metrics_url: str | None = None


def onnx_server(model: Path, logs: Path, threads: int = 2, max_batch_size: int = 8,
                max_batch_delay_ms: float = 5.0, preprocess_threads: int | None = None,
                spinning: bool = False, engine: str = engines.AUTO,
                precision: str = engines.AUTO, streams: int | None = None,
                extra: tuple[str, ...] = ()) -> tuple[launch.Launched, dict]:
    """Our server (``python -m serving``) on ``model``; (server, its settings)."""
    args = ["--threads", str(threads), "--max-batch-size", str(max_batch_size),
            "--max-batch-delay-ms", str(max_batch_delay_ms), "--log-level", "warning",
            "--engine", engine, "--precision", precision, *extra]
    if streams:
        args += ["--streams", str(streams)]
    if preprocess_threads:
        args += ["--preprocess-threads", str(preprocess_threads)]
    if spinning:
        args.append("--spinning")
    settings = {"threads": threads, "streams": streams or 1, "engine": engine,
                "precision": precision, "max_batch_size": max_batch_size,
                "max_batch_delay_ms": max_batch_delay_ms, "spinning": spinning,
                "preprocess_threads": preprocess_threads or "cpu count",
                **({"extra": " ".join(extra)} if extra else {})}
    tag = "-".join(f"{k}{v}" for k, v in settings.items()).replace(" ", "")
    server = launch.start_onnx_server([f"food={model}"], logs / f"serving-{tag}.log",
                                      extra_args=args, ready_timeout=120, cwd=REPO)
    described = json.loads(launch.http_get(f"{server.url}/models/food")[1])[0]
    return server, {**settings, "variant_running": described.get("runtime"),
                    "streams_running": len(described.get("workers", []))}


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


def onnx_server_options(kind: str) -> dict:
    """``--engine``/``--precision`` for one of our server kinds."""
    if kind == "onnx-server-fp32":
        return {"engine": "onnxruntime", "precision": "fp32"}
    if kind == "onnx-server-best":
        return {}
    variant = engines.variant_named(kind.removeprefix("onnx-server-"))
    return {"engine": variant.engine, "precision": variant.precision}


@contextlib.contextmanager
def start(kind: str, version: Path, scratch: Path, threads: int,
          **options) -> Iterator[Server]:
    """Server ``kind`` on ``version`` for the duration of the block; stopped afterwards."""
    env = options.pop("env", None)
    if kind in PEERS:
        from benchmarks import peers

        with peers.start_peer(kind, version, threads, scratch) as peer:
            yield Server(kind, peer.url, peer.settings, peer.body)
        return
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
    elif kind in SERVERS and kind.startswith("onnx-server-"):
        server, settings = onnx_server(version, scratch / "logs", threads=threads,
                                       **(onnx_server_options(kind) | options))
    else:
        raise ValueError(f"unknown server {kind!r}; known: {', '.join(SERVERS)}")
    with server:
        yield Server(kind, f"{server.url}/predictions/food", settings,
                     metrics_url=server.metrics_url)


TUNING = [  # (server, setting label, options): each runs closed loop at one concurrency
    ("onnx-server-fp32", "batch 1 (no batching)", {"max_batch_size": 1}),
    ("onnx-server-fp32", "batch 8, delay 0 ms", {"max_batch_delay_ms": 0.0}),
    ("onnx-server-fp32", "batch 8, delay 5 ms (default)", {}),
    ("onnx-server-fp32", "batch 16, delay 10 ms", {"max_batch_size": 16,
                                                   "max_batch_delay_ms": 10.0}),
    ("onnx-server-fp32", "spinning on", {"spinning": True}),
    ("onnx-server-fp32", "1 intra-op thread", {"threads": 1}),
    ("onnx-server-fp32", "1 preprocess thread", {"preprocess_threads": 1}),
    ("torchserve-ours-onnx", "2 workers x 1 thread, batch 8 (default)", {}),
    ("torchserve-ours-onnx", "1 worker x 2 threads, batch 8", {"workers": 1}),
    ("torchserve-ours-onnx", "2 workers, batch 1", {"batch_size": 1}),
    ("torchserve-ours-torchscript", "2 workers x 1 thread (default)", {}),
    ("torchserve-ours-torchscript", "2 workers x 1 thread, OMP_WAIT_POLICY=PASSIVE",
     {"env": {"OMP_WAIT_POLICY": "PASSIVE"}}),
    ("torchserve-ours-torchscript", "1 worker x 2 threads", {"workers": 1}),
    ("torchserve-stock", "defaults + OMP_WAIT_POLICY=PASSIVE",
     {"env": {"OMP_WAIT_POLICY": "PASSIVE"}}),
]


# One setting changed at a time against the server's default, at concurrency 16; the
# streams rows decide two batches of one thread against one batch of two threads.
STREAMS = [
    ("onnx-server-fp32", "1 stream x 2 threads (default)", {"streams": 1}),
    ("onnx-server-fp32", "2 streams x 1 thread", {"streams": 2}),
    ("onnx-server-best", "1 stream x 2 threads (default)", {"streams": 1}),
    ("onnx-server-best", "2 streams x 1 thread", {"streams": 2}),
]


def tune(version: Path, images: list[Path], scratch: Path, threads: int, concurrency: int,
         duration: float, settings: list[tuple[str, str, dict]] = TUNING,
         repeats: int = REPEATS, section: str = "tuning") -> list[dict]:
    """Closed loop at one concurrency (median of ``repeats`` runs) for each setting."""
    rows = []
    for kind, label, options in settings:
        opts = dict(options)
        server_threads = opts.pop("threads", threads)
        try:
            with start(kind, version, scratch, server_threads, **opts) as server:
                r = point(server.url, images, "closed", duration, repeats=repeats,
                          concurrency=concurrency, warmup=2, body=server.body)
        except (RuntimeError, subprocess.SubprocessError, OSError) as e:
            log.error("%s %s %s failed: %s", section, kind, label, e)
            rows.append({"server": kind, "setting": label, "p50_ms": None, "p99_ms": None,
                         "rps": None, "errors": f"failed: {str(e)[:200]}"})
            continue
        rows.append({"server": kind, "setting": label, "settings": server.settings,
                     "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "rps": r["rps"],
                     "rps_spread": r["rps_spread"], "errors": r["errors"]})
        log.info("%s %s %s: %.1f req/s p99 %s ms", section, kind, label, r["rps"] or 0.0,
                 r["p99_ms"])
    return rows


def phone_photos(version: Path, scratch: Path, threads: int, duration: float,
                 repeats: int = REPEATS, concurrency: int = 16,
                 sizes: tuple[str, ...] = ("12mp", "1080p")) -> list[dict]:
    """12 MP and 1080p uploads, closed loop at ``concurrency``: our server with full decoding
    (the default) and with JPEG draft decoding (opt-in), on fp32 and on the best variant."""
    from benchmarks.photos import phone_images

    photos = phone_images(scratch)
    rows = []
    for size in sizes:
        images = photos[size]
        for kind in ("onnx-server-fp32", "onnx-server-best"):
            for label, extra in (("full decode (default)", ()),
                                 (f"draft x{DRAFT_FACTOR}",
                                  ("--jpeg-draft", str(DRAFT_FACTOR)))):
                try:
                    with start(kind, version, scratch, threads, extra=extra) as server:
                        r = point(server.url, images, "closed", duration, repeats=repeats,
                                  concurrency=concurrency, warmup=1)
                except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                    log.error("phone %s %s %s failed: %s", size, kind, label, e)
                    rows.append({"image": size, "server": kind, "decode": label,
                                 "rps": None, "p50_ms": None, "p99_ms": None,
                                 "errors": f"failed: {str(e)[:200]}"})
                    continue
                rows.append({"image": size, "server": kind, "decode": label,
                             "files": len(images), "rps": r["rps"],
                             "rps_spread": r["rps_spread"], "p50_ms": r["p50_ms"],
                             "p99_ms": r["p99_ms"], "errors": r["errors"]})
                log.info("phone %s %s %s: %.1f req/s", size, kind, label, r["rps"] or 0.0)
    return rows


def run(quick: bool = True, kinds: list[str] | None = None, threads: int | None = None,
        scratch: Path = SCRATCH, tuning: bool | None = None, repeats: int = REPEATS,
        phone: bool = True) -> dict:
    """The serving section of a report."""
    from serving.predictor import default_threads

    threads = threads or default_threads()
    kinds = kinds or list(QUICK_SERVERS if quick else SERVERS)
    duration = 1.5 if quick else 5.0
    fractions = (0.5, 0.75, 1.0) if quick else (0.2, 0.4, 0.6, 0.8, 0.9, 1.0)
    imgs = bench_images(scratch)
    images = imgs["small"]
    version = backbone_version("mobilenet_v2", images)
    section = {"model": "mobilenet_v2 (random weights), 101 classes, resize 256 / crop 224",
               "image": f"{len(images)} JPEGs of 500x375, cycled", "threads": threads,
               "duration_s": duration, "repeats": repeats, "servers": [],
               "ceiling": {"fp32": ceiling(version, images, threads, "onnxruntime", "fp32",
                                           quick=quick),
                           "best": ceiling(version, images, threads, quick=quick)}}
    for kind in kinds:
        try:
            with start(kind, version, scratch, threads) as server:
                result = load_server(kind, server.url, images, server.settings,
                                     duration=duration, open_fractions=fractions,
                                     repeats=repeats, body=server.body,
                                     metrics_url=server.metrics_url)
                section["servers"].append(result)
        except (RuntimeError, subprocess.SubprocessError, OSError, ImportError) as e:
            log.error("%s failed: %s", kind, e)
            section["servers"].append({"name": kind, "error": str(e)[:2000], "closed": [],
                                       "open": [], "max_rate_p99_under_100ms": None})
    section["streams_concurrency"] = 16
    section["streams"] = tune(version, images, scratch, threads, 16, duration, STREAMS,
                              repeats, "streams")
    if phone:
        section["phone"] = phone_photos(version, scratch, threads, duration, repeats,
                                        sizes=("12mp",) if quick else ("12mp", "1080p"))
    if tuning if tuning is not None else not quick:
        section["tuning_concurrency"] = 16
        section["tuning"] = tune(version, images, scratch, threads, 16, duration)
    return section


def add_serving_args(p: argparse.ArgumentParser) -> None:
    """The serving section's options, shared with ``python -m benchmarks``."""
    p.add_argument("--repeats", type=int, default=REPEATS,
                   help="runs per HTTP point, the median reported (default %(default)s)")
    p.add_argument("--phone", action=argparse.BooleanOptionalAction, default=True,
                   help="measure 12 MP and 1080p uploads too (default: on)")


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench_engines import add_common_args

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--server", action="append", choices=SERVERS,
                   help="server(s) to measure (default: all)")
    p.add_argument("--tuning", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the tuning sweep (default: only with --full)")
    add_serving_args(p)
    args = p.parse_args(argv)
    passive_openmp()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    section = run(args.quick, args.server, args.threads, tuning=args.tuning,
                  repeats=args.repeats, phone=args.phone)
    paths = report.write_run({"serving": section}, args.out, quick=args.quick)
    print(paths["md"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
