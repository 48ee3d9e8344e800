"""Writing a run: ``<timestamp>.json`` (machine, versions, every figure), ``<timestamp>.md``
(the tables and where we stand on the issue's targets) and ``<timestamp>-serving.png``
(latency against throughput, one line per server)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from serving.atomic import atomic_write, atomic_write_bytes, write_json
from training.tracking import git_commit

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "torchvision", "onnxruntime", "onnx", "torchserve", "numpy", "pillow",
            "fastapi", "uvicorn", "aiohttp")


def machine() -> dict:
    """CPU model, cores, load, OS and the versions of everything measured."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True,
                              timeout=20, check=False).stderr.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        java = None
    return {"cpu": cpu, "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "platform": platform.platform(), "python": sys.version.split()[0],
            "java": java, "versions": versions, "git_commit": git_commit(),
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                                   "MKL_NUM_THREADS")}}


def write_run(sections: dict, out_dir: Path, quick: bool, started: datetime | None = None,
              load_before: tuple | None = None) -> dict[str, Path]:
    """Write the JSON, Markdown and (when there is a serving section) PNG of one run."""
    started = started or datetime.now(timezone.utc)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"timestamp": started.isoformat(timespec="seconds"),
              "mode": "quick" if quick else "full", "machine": machine(),
              "load_average": {"before": list(load_before or os.getloadavg()),
                               "after": list(os.getloadavg())},
              **sections}
    result["targets"] = targets(result)
    paths = {"json": out_dir / f"{stamp}.json", "md": out_dir / f"{stamp}.md"}
    write_json(paths["json"], result)
    if "serving" in sections and sections["serving"].get("servers"):
        paths["png"] = out_dir / f"{stamp}-serving.png"
        plot_serving(sections["serving"], paths["png"])
    atomic_write_bytes(paths["md"], markdown(result, paths.get("png")).encode())
    return paths


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _spread(row: dict, key: str, digits: int = 1) -> str:
    lo, hi = row.get(f"{key}_spread", [None, None])
    if lo is None or row.get(key) is None:
        return _fmt(row.get(key), digits)
    return f"{row[key]:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _server(serving: dict, name: str) -> dict | None:
    return next((s for s in serving.get("servers", []) if s["name"] == name), None)


def _closed(server: dict | None, concurrency: int) -> dict | None:
    if not server:
        return None
    return next((r for r in server.get("closed", []) if r["concurrency"] == concurrency), None)


def _best_rps(server: dict | None) -> dict | None:
    if not server or not server.get("closed"):
        return None
    return max(server["closed"], key=lambda r: r["rps"])


def _engine(engines: dict, arch: str, engine: str, batch: int) -> dict | None:
    return next((r for r in engines.get("rows", []) if (r["arch"], r["engine"], r["batch"])
                 == (arch, engine, batch)), None)


def ceiling_at(ceil: dict, mean_batch: float | None) -> float | None:
    """The ceiling's images/s at the server's mean batch size (the nearest measured batch
    size at or below it; batch 1 without a measurement)."""
    if not ceil or not ceil.get("per_batch"):
        return None
    sizes = sorted(int(b) for b in ceil["per_batch"])
    chosen = max([b for b in sizes if b <= (mean_batch or 1)] or sizes[:1])
    return ceil["per_batch"][chosen if chosen in ceil["per_batch"] else str(chosen)][
        "images_per_s"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(result: dict) -> list[dict]:
    """The issues' targets, each with the measured ratio and met / not met / not measured."""
    out = []

    def add(name: str, goal: str, value: float | None, ok: bool | None, detail: str = ""):
        out.append({"target": name, "goal": goal,
                    "measured": None if value is None else round(value, 3),
                    "met": None if value is None else ok, "detail": detail})

    serving = result.get("serving") or {}
    if serving:
        _peer_targets(serving, add)
        _server_targets(serving, add)
    return _engine_targets(result, out, add)


def _peer_targets(serving: dict, add) -> None:
    """Our fp32 server against each peer on the same engine (ONNX Runtime fp32)."""
    ours = _server(serving, "onnx-server-fp32")
    for peer in ("pytriton", "litserve", "bentoml"):
        theirs = _server(serving, peer)
        if theirs is None:
            continue
        o16, t16 = _closed(ours, 16), _closed(theirs, 16)
        r = _ratio(o16 and o16["rps"], t16 and t16["rps"])
        add(f"ours vs {peer}, req/s at 16 clients (both ONNX Runtime fp32)", ">= 1.2x", r,
            r is not None and r >= 1.2,
            f"{o16 and o16['rps']} vs {t16 and t16['rps']} req/s")
        o1, t1 = _closed(ours, 1), _closed(theirs, 1)
        r = _ratio(o1 and o1["p50_ms"], t1 and t1["p50_ms"])
        add(f"ours vs {peer}, p50 at 1 client", "<= 1.0x", r, r is not None and r <= 1.0,
            f"{o1 and o1['p50_ms']} vs {t1 and t1['p50_ms']} ms")
        ro, rt = ours and ours.get("max_rate_p99_under_100ms"), theirs.get(
            "max_rate_p99_under_100ms")
        r = _ratio(ro, rt)
        add(f"ours vs {peer}, open-loop rate with p99 <= 100 ms", ">= 1.0x", r,
            r is not None and r >= 1.0, f"{ro} vs {rt} req/s")


def _server_targets(serving: dict, add) -> None:
    stock = _server(serving, "torchserve-stock")
    fp32, best = _server(serving, "onnx-server-fp32"), _server(serving, "onnx-server-best")
    s16, o16, b16 = _closed(stock, 16), _closed(fp32, 16), _closed(best, 16)
    ceilings = serving.get("ceiling") or {}
    for label, server, point, ceil in (("fp32", fp32, o16, ceilings.get("fp32")),
                                       ("best variant", best, b16, ceilings.get("best"))):
        limit = ceiling_at(ceil or {}, point and point.get("mean_batch"))
        r = _ratio(point and point["rps"], limit)
        add(f"our server ({label}) at 16 clients vs the 2-core ceiling", ">= 0.9", r,
            r is not None and r >= 0.9,
            f"{point and point['rps']} req/s vs {limit} images/s at mean batch "
            f"{point and point.get('mean_batch')} ({(ceil or {}).get('variant')})")
    r = _ratio(b16 and b16["rps"], o16 and o16["rps"])
    add("our server on the best variant vs on fp32, 16 clients", ">= 1.8x", r,
        r is not None and r >= 1.8,
        f"{b16 and b16['rps']} ({(best or {}).get('settings', {}).get('variant_running')}) "
        f"vs {o16 and o16['rps']} req/s")
    for label, point in (("fp32", o16), ("best variant", b16)):
        r = _ratio(point and point["rps"], s16 and s16["rps"])
        add(f"our server ({label}) vs stock TorchServe, 16 clients", "(was >= 10x)", r,
            r is not None and r >= 10, f"{point and point['rps']} vs {s16 and s16['rps']}")
    ours_ts = _closed(_server(serving, "torchserve-ours-onnx"), 16)
    r = _ratio(ours_ts and ours_ts["rps"], s16 and s16["rps"])
    add("TorchServe + our handler (onnx) vs stock, 16 clients", ">= 4x", r,
        r is not None and r >= 4, f"{ours_ts and ours_ts['rps']} vs {s16 and s16['rps']}")
    phone = {(p["image"], p["server"], p["decode"]): p for p in serving.get("phone") or []}
    for size in ("12mp", "1080p"):
        today = phone.get((size, "onnx-server-fp32", "full decode (default)"))
        goal = ">= 3x" if size == "12mp" else "(reported)"
        for decode in ("full decode (default)", "draft x2"):
            now = phone.get((size, "onnx-server-best", decode))
            r = _ratio(now and now["rps"], today and today["rps"])
            add(f"{size} uploads: best variant, {decode} vs today's path (fp32, full "
                f"decode), 16 clients", goal, r,
                r is not None and (r >= 3 if size == "12mp" else True),
                f"{now and now['rps']} vs {today and today['rps']} req/s")
    streams = {(t["server"], t["setting"]): t for t in serving.get("streams") or []}
    for kind in ("onnx-server-fp32", "onnx-server-best"):
        one = streams.get((kind, "1 stream x 2 threads (default)"))
        two = streams.get((kind, "2 streams x 1 thread"))
        r = _ratio(two and two["rps"], one and one["rps"])
        add(f"{kind}: 2 streams x 1 thread vs 1 x 2 threads, 16 clients", "(decides)", r,
            r is not None and r > 1.0, f"{two and two['rps']} vs {one and one['rps']} req/s")


def _engine_targets(result: dict, out: list[dict], add) -> list[dict]:
    engines = result.get("engines") or {}
    if not engines:
        return out
    for arch in engines.get("archs", []):
        ref = _engine(engines, arch, "onnxruntime-fp32", 8)
        variants = [r for r in engines.get("rows", []) if r["arch"] == arch
                    and r["batch"] == 8 and r["engine"] not in
                    ("eager", "torchscript", "onnxruntime-fp32")]
        if not ref or not variants:
            continue
        top = max(variants, key=lambda r: r["items_per_s"])
        r = _ratio(top["items_per_s"], ref["items_per_s"])
        goal = ">= 2x" if arch == "mobilenet_v2" else "(reported)"
        add(f"best variant vs ONNX Runtime fp32 in process, batch 8 ({arch})", goal, r,
            r is not None and (r >= 2 if arch == "mobilenet_v2" else True),
            f"{top['engine']} {top['items_per_s']} vs {ref['items_per_s']} images/s")
    agreement = engines.get("variant_agreement") or {}
    if agreement.get("measured"):
        for name, value in agreement["agreement"].items():
            if name == "onnxruntime-fp32":
                continue
            add(f"{name} top-1 agreement with fp32 (validation images)", ">= 0.99", value,
                value >= 0.99, f"{agreement['num_images']} images of {agreement['version']} "
                f"({agreement['arch']}, crop {agreement['crop']})")
    else:
        add("variant top-1 agreement with fp32 (validation images)", ">= 0.99", None, None,
            agreement.get("why", ""))
    return out


def markdown(result: dict, png: Path | None = None) -> str:
    """The run as Markdown tables."""
    m = result["machine"]
    load = result["load_average"]
    parts = [f"# Benchmark run {result['timestamp']} ({result['mode']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
             f"{m['platform']}, Python {m['python']}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
             + f". Load average before/after: {load['before'][0]:.2f} / {load['after'][0]:.2f}."
             + f" Harness OMP_WAIT_POLICY={m.get('env', {}).get('OMP_WAIT_POLICY')}.",
             "", "Figures: median over repeated blocks, (min-max) in brackets where repeated."]
    engines = result.get("engines")
    if engines:
        parts += ["", f"## Engines in process ({engines['threads']} intra-op threads)", "",
                  _table(["backbone", "engine", "batch", "p50 ms", "p90 ms", "p99 ms",
                          "images/s"],
                         [[r["arch"], r["engine"], r["batch"], _spread(r, "p50_ms"),
                           _fmt(r["p90_ms"]), _fmt(r["p99_ms"]), _spread(r, "items_per_s")]
                          for r in engines["rows"]]),
                  "", "### Preprocessing (resize 256, crop 224), one image", "",
                  _table(["image", "size", "KB", "JPEG draft", "step", "p50 ms", "p99 ms"],
                         [[r["image"], r["size"], r["bytes"] // 1024,
                           "on" if r["draft"] else "off", r["step"], _spread(r, "p50_ms"),
                           _fmt(r["p99_ms"])] for r in engines["preprocess"]])]
        a = engines.get("variant_agreement") or {}
        if a.get("measured"):
            parts += ["", (f"Top-1 agreement with onnxruntime-fp32 on {a['num_images']} "
                          f"validation images of {a['version']} ({a['arch']}, crop "
                          f"{a['crop']}): " + ", ".join(
                              f"{k} {v:.2%}" for k, v in a["agreement"].items()
                              if k != "onnxruntime-fp32")
                          + (f"; accuracy fp32 {a['float_accuracy']:.2%}, int8 "
                             f"{a['int8_accuracy']:.2%}" if a.get("int8_accuracy") is not None
                             else "") + ".")]
        else:
            parts += ["", f"Variant agreement: not measured ({a.get('why', '')})."]
    serving = result.get("serving")
    if serving:
        parts += ["", (f"## Servers over HTTP ({serving.get('image', '')}, "
                      f"{serving.get('threads')} threads per server)"), ""]
        parts += [f"- **{s['name']}**: {json.dumps(s.get('settings', {}))}"
                  + (f" — FAILED: {s['error']}" if s.get("error") else "")
                  for s in serving["servers"]]
        for label, c in (serving.get("ceiling") or {}).items():
            per_batch = ", ".join(f"batch {b}: {v['inference_core_ms_per_image']} core-ms -> "
                                  f"{v['images_per_s']} images/s"
                                  for b, v in c.get("per_batch", {}).items())
            parts += [(f"- **ceiling, {label}** ({c.get('variant')}, {c.get('cores')} cores): "
                      f"preprocess {_fmt(c.get('preprocess_core_ms'), 2)} core-ms per image; "
                      f"inference per image {per_batch}; single image end to end p50 "
                      f"{_fmt(c.get('single_p50_ms'))} ms")]
        rows = [[s["name"], r["concurrency"], _fmt(r["p50_ms"]), _fmt(r["p95_ms"]),
                 _fmt(r["p99_ms"]), _spread(r, "rps"), _fmt(r.get("mean_batch"), 2),
                 r["errors"]]
                for s in serving["servers"] for r in s.get("closed", [])]
        parts += ["", (f"### Closed loop (median of {serving.get('repeats', 1)} runs of "
                      f"{serving.get('duration_s')} s per point, (min-max) of req/s)"), "",
                  _table(["server", "concurrency", "p50 ms", "p95 ms", "p99 ms", "req/s",
                          "mean batch", "errors"], rows)]
        rows = [[s["name"], _fmt(r["rate"]), _fmt(r["rps"]), _fmt(r["p50_ms"]),
                 _fmt(r["p99_ms"]), r["errors"]]
                for s in serving["servers"] for r in s.get("open", [])]
        best = [[s["name"], _fmt(s.get("max_rate_p99_under_100ms"))]
                for s in serving["servers"]]
        parts += ["", "### Open loop (Poisson arrivals, latency from the intended send time)",
                  "", _table(["server", "rate req/s", "served req/s", "p50 ms", "p99 ms",
                              "errors"], rows),
                  "", _table(["server", "highest rate with p99 < 100 ms and no errors"], best)]
        for key, title in (("streams", "Streams: two batches of one thread vs one of two"),
                           ("tuning", "Tuning")):
            if not serving.get(key):
                continue
            rows = [[t["server"], t["setting"], _fmt(t["p50_ms"]), _fmt(t["p99_ms"]),
                     _spread(t, "rps"), t["errors"]] for t in serving[key]]
            parts += ["", f"### {title} (closed loop, concurrency 16)", "",
                      _table(["server", "setting", "p50 ms", "p99 ms", "req/s", "errors"],
                             rows)]
        if serving.get("phone"):
            rows = [[p["image"], p["server"], p["decode"], _fmt(p["p50_ms"]),
                     _fmt(p["p99_ms"]), _spread(p, "rps"), p["errors"]]
                    for p in serving["phone"]]
            parts += ["", "### Phone photos (closed loop, concurrency 16)", "",
                      _table(["upload", "server", "decode", "p50 ms", "p99 ms", "req/s",
                              "errors"], rows)]
        if png is not None:
            parts += ["", f"![latency vs throughput]({png.name})"]
    training = result.get("training")
    if training:
        parts += ["", (f"## Training loop ({training.get('threads')} threads, "
                      f"{training.get('workers')} loader workers)"), "",
                  _table(["backbone", "crop", "batch", "images/s", "data-loading share",
                          "steps"],
                         [[r["arch"], r["crop"], r["batch_size"],
                           _spread(r, "images_per_s"),
                           f"{r['data_share']:.0%}", r["steps"]] for r in training["rows"]])]
    if result.get("targets"):
        status = {True: "met", False: "NOT met", None: "not measured"}
        parts += ["", "## Targets", "",
                  _table(["target", "goal", "measured", "status", "detail"],
                         [[t["target"], t["goal"], _fmt(t["measured"], 2), status[t["met"]],
                           t["detail"]] for t in result["targets"]])]
    return "\n".join(parts) + "\n"


def plot_serving(serving: dict, path: Path) -> None:
    """p50 (solid) and p99 (dashed) latency against requests/s, closed loop, per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, server in enumerate(serving["servers"]):
        points = [r for r in server.get("closed", []) if r.get("p50_ms") is not None]
        if not points:
            continue
        color = f"C{i}"
        xs = [r["rps"] for r in points]
        ax.plot(xs, [r["p50_ms"] for r in points], "o-", color=color,
                label=f"{server['name']} p50")
        ax.plot(xs, [r["p99_ms"] for r in points], "x--", color=color, alpha=0.6,
                label=f"{server['name']} p99")
        for r in points:
            ax.annotate(str(r["concurrency"]), (r["rps"], r["p50_ms"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms, log)")
    ax.set_yscale("log")
    ax.set_title("Closed loop at concurrency 1/4/16/64 (numbers on the p50 points)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
