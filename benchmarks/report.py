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


def targets(result: dict) -> list[dict]:
    """The issue's targets, each with the measured ratio and met / not met / not measured."""
    out = []

    def add(name: str, goal: str, value: float | None, ok: bool | None, detail: str = ""):
        out.append({"target": name, "goal": goal,
                    "measured": None if value is None else round(value, 3),
                    "met": ok, "detail": detail})

    serving = result.get("serving") or {}
    if not serving:
        return _engine_targets(result, out, add)
    stock = _server(serving, "torchserve-stock")
    ours_onnx = _server(serving, "onnx-server-fp32")
    s16, o16 = _closed(stock, 16), _closed(ours_onnx, 16)
    ratio = (o16["rps"] / s16["rps"]) if o16 and s16 and s16["rps"] else None
    add("ONNX server rps vs stock TorchServe, concurrency 16", ">= 10x", ratio,
        None if ratio is None else ratio >= 10,
        f"{o16['rps'] if o16 else '-'} vs {s16['rps'] if s16 else '-'} req/s")
    tail = (o16["p99_ms"] / o16["p50_ms"]) if o16 and o16.get("p50_ms") else None
    add("ONNX server p99/p50, concurrency 16", "< 4x", tail, None if tail is None else tail < 4,
        f"p50 {o16['p50_ms'] if o16 else '-'} ms, p99 {o16['p99_ms'] if o16 else '-'} ms")
    ceiling = serving.get("ceiling") or {}
    best = _best_rps(ours_onnx)
    if best and ceiling.get("throughput_images_per_s"):
        r = best["rps"] / ceiling["throughput_images_per_s"]
        add("ONNX server best rps vs in-process ceiling", ">= 0.8", r, r >= 0.8,
            f"{best['rps']} req/s at concurrency {best['concurrency']} vs "
            f"{ceiling['throughput_images_per_s']} images/s in process")
    else:
        add("ONNX server best rps vs in-process ceiling", ">= 0.8", None, None)
    o1 = _closed(ours_onnx, 1)
    if o1 and o1.get("p50_ms") and ceiling.get("single_p50_ms"):
        r = o1["p50_ms"] / ceiling["single_p50_ms"]
        add("ONNX server p50 at concurrency 1 vs in-process single image", "<= 1.3x", r,
            r <= 1.3, f"{o1['p50_ms']} ms vs {ceiling['single_p50_ms']} ms")
    else:
        add("ONNX server p50 at concurrency 1 vs in-process single image", "<= 1.3x", None, None)
    for fmt in ("onnx", "torchscript"):
        ours = _closed(_server(serving, f"torchserve-ours-{fmt}"), 16)
        r = (ours["rps"] / s16["rps"]) if ours and s16 and s16["rps"] else None
        add(f"TorchServe + our handler ({fmt}) vs stock, concurrency 16", ">= 4x", r,
            None if r is None else r >= 4,
            f"{ours['rps'] if ours else '-'} vs {s16['rps'] if s16 else '-'} req/s")
    return _engine_targets(result, out, add)


def _engine_targets(result: dict, out: list[dict], add) -> list[dict]:
    engines = result.get("engines") or {}
    if not engines:
        return out
    f8 = _engine(engines, "mobilenet_v2", "onnx_fp32", 8)
    q8 = _engine(engines, "mobilenet_v2", "onnx_int8", 8)
    r = (q8["items_per_s"] / f8["items_per_s"]) if f8 and q8 else None
    add("int8 vs float32 ONNX throughput, batch 8 (MobileNetV2)", ">= 1.8x", r,
        None if r is None else r >= 1.8,
        f"{q8['items_per_s'] if q8 else '-'} vs {f8['items_per_s'] if f8 else '-'} images/s")
    agreement = engines.get("int8_agreement") or {}
    if agreement.get("measured"):
        add("int8 top-1 agreement with float32 (validation images)", ">= 0.98",
            agreement["agreement"], agreement["agreement"] >= 0.98,
            f"{agreement['num_images']} images of {agreement['version']} "
            f"({agreement['arch']}, crop {agreement['crop']})")
    else:
        add("int8 top-1 agreement with float32 (validation images)", ">= 0.98", None, None,
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
        a = engines.get("int8_agreement") or {}
        if a.get("measured"):
            parts += ["", (f"int8 agreement: top-1 {a['agreement']:.2%} of {a['num_images']} "
                          f"validation images of {a['version']} ({a['arch']}, crop {a['crop']});"
                          f" accuracy float {a['float_accuracy']:.2%}, int8 "
                          f"{a['int8_accuracy']:.2%}.")]
        else:
            parts += ["", f"int8 agreement: not measured ({a.get('why', '')})."]
    serving = result.get("serving")
    if serving:
        parts += ["", (f"## Servers over HTTP ({serving.get('image', '')}, "
                      f"{serving.get('threads')} threads per server)"), ""]
        parts += [f"- **{s['name']}**: {json.dumps(s.get('settings', {}))}"
                  + (f" — FAILED: {s['error']}" if s.get("error") else "")
                  for s in serving["servers"]]
        c = serving.get("ceiling") or {}
        if c:
            parts += [(f"- **in-process ceiling** (Predictor, {c.get('threads')} threads): "
                      f"single image p50 {_fmt(c.get('single_p50_ms'))} ms, batch "
                      f"{c.get('batch')} throughput {_fmt(c.get('throughput_images_per_s'))}"
                      f" images/s (decode + preprocess + inference)")]
        rows = [[s["name"], r["concurrency"], _fmt(r["p50_ms"]), _fmt(r["p95_ms"]),
                 _fmt(r["p99_ms"]), _fmt(r["rps"]), r["errors"]]
                for s in serving["servers"] for r in s.get("closed", [])]
        parts += ["", "### Closed loop", "",
                  _table(["server", "concurrency", "p50 ms", "p95 ms", "p99 ms", "req/s",
                          "errors"], rows)]
        rows = [[s["name"], _fmt(r["rate"]), _fmt(r["rps"]), _fmt(r["p50_ms"]),
                 _fmt(r["p99_ms"]), r["errors"]]
                for s in serving["servers"] for r in s.get("open", [])]
        best = [[s["name"], _fmt(s.get("max_rate_p99_under_100ms"))]
                for s in serving["servers"]]
        parts += ["", "### Open loop (Poisson arrivals, latency from the intended send time)",
                  "", _table(["server", "rate req/s", "served req/s", "p50 ms", "p99 ms",
                              "errors"], rows),
                  "", _table(["server", "highest rate with p99 < 100 ms and no errors"], best)]
        if serving.get("tuning"):
            rows = [[t["server"], t["setting"], _fmt(t["p50_ms"]), _fmt(t["p99_ms"]),
                     _fmt(t["rps"]), t["errors"]] for t in serving["tuning"]]
            parts += ["", (f"### Tuning (closed loop, concurrency "
                          f"{serving.get('tuning_concurrency')})"), "",
                      _table(["server", "setting", "p50 ms", "p99 ms", "req/s", "errors"],
                             rows)]
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
