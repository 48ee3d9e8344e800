"""Soak: our ONNX server and TorchServe held at 80 % of their measured maximum for a long time.

    python -m benchmarks.soak [--minutes 10] [--server onnx --server torchserve]
                              [--fraction 0.8] [--window-s 30]

Each server gets the MobileNetV2 benchmark version (``benchmarks.versions``, 224 crop, 101
classes) and the benchmark photos. Its maximum is measured closed loop (concurrency 16, also
the warm-up); then an open loop (Poisson arrivals, latency from the intended send time, the
load generator in its own process) runs at ``fraction`` of it for ``--minutes``, in windows
of ``--window-s`` seconds. Halfway through, our server switches model version under that
load through its management API (register v2, make it the default, unregister v1: the
zero-downtime path); TorchServe keeps its model.

Reported per server: errors by kind, p50/p99 and the resident memory of the server's whole
process tree (TorchServe's Java frontend and its Python workers included) per window, and
that memory after the warm-up, at the middle and at the end. Targets: no errors, the last
window's p99 within 1.5x of the first's, resident memory growing less than 10 % after the
warm-up. For our server the switch is part of the warm-up (loading a second model raises
the allocator's high-water mark once): its growth is measured from the middle sample, taken
after the switch, to the end; TorchServe's from the warm-up to the end. Written to
``benchmarks/results/soak-<timestamp>.{json,md}``; the exit status is 1 when a target is
missed. ``make soak`` runs it; it is not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

from benchmarks import passive_openmp, report
from benchmarks.bench_serving import loadgen, ours_mar, torchserve
from benchmarks.versions import SCRATCH, backbone_version, bench_images
from serving import launch

log = logging.getLogger(__name__)

SERVERS = ("onnx", "torchserve")
MAX_CONCURRENCY = 16
MAX_SECONDS = 20.0  # the closed-loop measurement of the maximum (also the warm-up)
P99_GROWTH_LIMIT = 1.5
RSS_GROWTH_LIMIT = 0.10
RESULTS = Path(__file__).resolve().parent / "results"


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants, as ``ps`` would sum them."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def second_version(v1: Path) -> Path:
    """A sibling ``v2`` of ``v1`` (same weights, version 2): what the switch loads."""
    from serving.artifacts import read_model
    from serving.atomic import publish_dir, staging_dir, write_json

    v2 = v1.parent / "v2"
    if (v2 / "model.onnx").is_file():
        return v2
    first = read_model(v1)
    with staging_dir(v1.parent, "v2") as stage:
        shutil.copyfile(v1 / "class_to_idx.json", stage / "class_to_idx.json")
        shutil.copyfile(first.model_file("onnx"), stage / "model.onnx")
        write_json(stage / "model_config.json", {**first.config, "version": 2})
        publish_dir(stage, v2)
    return v2


def switch_version(management: str, v2: Path) -> dict:
    """Our server's zero-downtime switch: register v2, make it the default, unregister v1."""
    import urllib.parse
    import urllib.request

    def call(method: str, path: str) -> int:
        request = urllib.request.Request(f"{management}{path}", method=method)
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status

    started = time.perf_counter()
    steps = {"register": call("POST", "/models?" + urllib.parse.urlencode(
                 {"url": str(v2), "model_name": "food"})),
             "set_default": call("PUT", "/models/food/2/set-default"),
             "unregister_v1": call("DELETE", "/models/food/1")}
    return {"steps": steps, "seconds": round(time.perf_counter() - started, 2)}


def soak_server(name: str, url: str, pid: int, images: list[Path], minutes: float,
                fraction: float, window_s: float, switch=None) -> dict:
    """Measure the maximum, then hold ``fraction`` of it; ``switch()`` runs halfway."""
    peak = loadgen(url, images, "closed", MAX_SECONDS, concurrency=MAX_CONCURRENCY,
                   warmup=2)
    rate = round(max(0.5, peak["rps"] * fraction), 2)
    windows = max(2, math.ceil(minutes * 60 / window_s))
    log.info("%s: max %.1f req/s closed loop; soaking at %.1f req/s for %d x %.0f s", name,
             peak["rps"], rate, windows, window_s)
    rss = {"after_warmup": tree_rss(pid)}
    rows, errors, switched = [], {}, None
    for i in range(windows):
        timer = None
        if switch is not None and i == windows // 2:
            def do_switch() -> None:
                nonlocal switched
                try:
                    switched = switch()
                except Exception as e:  # noqa: BLE001 - reported, not raised from a thread
                    switched = {"error": f"{type(e).__name__}: {e}"}
            timer = threading.Timer(window_s / 2, do_switch)
            timer.start()
        r = loadgen(url, images, "open", window_s, rate=rate, seed=i)
        if timer is not None:
            timer.join()
        for kind, n in r["error_kinds"].items():
            errors[kind] = errors.get(kind, 0) + n
        rows.append({"window": i, "t_end_s": round((i + 1) * window_s), "sent": r["sent"],
                     "ok": r["ok"], "errors": r["errors"], "p50_ms": r["p50_ms"],
                     "p99_ms": r["p99_ms"], "rps": r["rps"],
                     "rss_mb": round(tree_rss(pid) / 2**20, 1)})
        log.info("%s window %d/%d: %d sent, %d errors, p50 %s ms, p99 %s ms", name, i + 1,
                 windows, r["sent"], r["errors"], r["p50_ms"], r["p99_ms"])
        if i == windows // 2:
            rss["middle"] = tree_rss(pid)
    rss["end"] = tree_rss(pid)
    first, last = rows[0]["p99_ms"], rows[-1]["p99_ms"]
    base = rss["middle"] if switch is not None else rss["after_warmup"]
    growth = (rss["end"] - base) / base if base else None
    checks = {"no_errors": sum(errors.values()) == 0,
              "p99_end_within_1.5x_start": bool(first and last
                                                and last <= P99_GROWTH_LIMIT * first),
              "rss_growth_under_10pct": growth is not None and growth < RSS_GROWTH_LIMIT}
    if switch is not None:
        checks["switched"] = bool(switched) and "error" not in switched
    return {"server": name, "max_rps_closed": peak["rps"], "rate": rate, "fraction": fraction,
            "minutes": minutes, "window_s": window_s, "windows": rows, "errors": errors,
            "rss_mb": {k: round(v / 2**20, 1) for k, v in rss.items()},
            "rss_growth": None if growth is None else round(growth, 4),
            "p99_first_ms": first, "p99_last_ms": last, "switch": switched,
            "checks": checks, "ok": all(checks.values())}


def run_onnx(version: Path, images: list[Path], args, scratch: Path) -> dict:
    v2 = second_version(version)
    server = launch.start_onnx_server(
        [f"food={version}"], scratch / "logs" / "soak-onnx.log", ready_timeout=120,
        extra_args=["--threads", "2", "--log-level", "warning",
                    "--model-dir-allowed", str(version.parent)])
    with server:
        return soak_server("onnx-server", f"{server.url}/predictions/food", server.proc.pid,
                           images, args.minutes, args.fraction, args.window_s,
                           switch=lambda: switch_version(server.management_url, v2))


def run_torchserve(version: Path, images: list[Path], args, scratch: Path) -> dict:
    mar = ours_mar(version, "onnx", scratch / "mar" / "soak-onnx", threads=2, workers=2)
    server, _settings = torchserve(mar, scratch / "ts-soak", {},
                                   env={"OMP_WAIT_POLICY": "PASSIVE"})
    with server:
        return soak_server("torchserve", f"{server.url}/predictions/food", server.proc.pid,
                           images, args.minutes, args.fraction, args.window_s)


def markdown(result: dict) -> str:
    """The soak report as Markdown."""
    lines = [f"# Soak, {result['started']}", "",
             (f"{result['machine'].get('cpu', '?')}, load before "
             f"{result['load_before']}; {result['minutes']} min per server at "
             f"{result['fraction']:.0%} of the closed-loop maximum."), ""]
    for s in result["servers"]:
        lines += [f"## {s['server']}: {'targets met' if s['ok'] else 'TARGETS MISSED'}", "",
                  (f"max {s['max_rps_closed']} req/s (closed, c={MAX_CONCURRENCY}); soak rate "
                  f"{s['rate']} req/s; errors {s['errors'] or 'none'}; RSS MB "
                  f"{s['rss_mb']} (growth {s['rss_growth']:+.1%}); p99 first "
                  f"{s['p99_first_ms']} ms, last {s['p99_last_ms']} ms"), ""]
        if s.get("switch"):
            lines += [f"model switch midway: {s['switch']}", ""]
        lines += ["| window end (s) | sent | errors | p50 ms | p99 ms | RSS MB |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {w['t_end_s']} | {w['sent']} | {w['errors']} | {w['p50_ms']} | "
                  f"{w['p99_ms']} | {w['rss_mb']} |" for w in s["windows"]]
        lines += ["", "checks: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}"
                                              for k, v in s["checks"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="soak per server (default 10)")
    p.add_argument("--server", action="append", choices=SERVERS,
                   help="which servers (default: both)")
    p.add_argument("--fraction", type=float, default=0.8,
                   help="share of the measured maximum to hold (default 0.8)")
    p.add_argument("--window-s", type=float, default=30.0,
                   help="seconds per reporting window (default 30)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.minutes <= 0 or not 0 < args.fraction <= 1 or args.window_s <= 0:
        print("error: --minutes and --window-s must be > 0, --fraction in (0, 1]",
              file=sys.stderr)
        return 2
    passive_openmp()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    started, load_before = datetime.now(timezone.utc), os.getloadavg()
    images = bench_images()["small"]
    version = backbone_version("mobilenet_v2", images, int8=False)
    results = []
    for kind in args.server or SERVERS:
        run = run_onnx if kind == "onnx" else run_torchserve
        results.append(run(version, images, args, SCRATCH))
    result = {"started": started.isoformat(timespec="seconds"),
              "load_before": [round(x, 2) for x in load_before],
              "load_after": [round(x, 2) for x in os.getloadavg()],
              "machine": report.machine(), "minutes": args.minutes,
              "fraction": args.fraction, "servers": results}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"soak-{started.strftime('%Y%m%dT%H%M%SZ')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {stem}.json, {stem}.md")
    return 0 if all(s["ok"] for s in results) else 1


if __name__ == "__main__":
    sys.exit(main())
