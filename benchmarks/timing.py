"""Latency statistics and the repeat-and-take-the-median timing loop every benchmark uses.

A figure is the median over ``repeats`` measurement blocks, kept with its spread (the lowest
and highest block value), so a noisy neighbour shows up as a wide spread instead of hiding in
one number.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

PERCENTILES = (50, 90, 95, 99)


def summarize(latencies_s: Sequence[float]) -> dict:
    """Percentiles (ms) and count of a list of latencies in seconds; empty lists give None."""
    if len(latencies_s) == 0:
        return {"n": 0, **{f"p{p}_ms": None for p in PERCENTILES}, "mean_ms": None}
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000
    out = {"n": int(ms.size)}
    for p in PERCENTILES:
        out[f"p{p}_ms"] = round(float(np.percentile(ms, p)), 3)
    out["mean_ms"] = round(float(ms.mean()), 3)
    return out


def median_spread(values: Sequence[float | None]) -> dict:
    """``{"median", "min", "max"}`` of the non-None values (all None when there are none)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(vals), 3), "min": round(min(vals), 3),
            "max": round(max(vals), 3)}


def measure(fn: Callable[[], object], items_per_call: int = 1, warmup: int = 3,
            iters: int = 20, repeats: int = 3, max_seconds: float = 10.0) -> dict:
    """Time ``fn()`` in ``repeats`` blocks of up to ``iters`` calls (each block stops early
    after ``max_seconds / repeats``); report medians over blocks with their spread.

    ``items_per_call`` (e.g. the batch size) turns calls/s into items/s.
    """
    for _ in range(warmup):
        fn()
    blocks = []
    budget = max_seconds / max(1, repeats)
    for _ in range(repeats):
        latencies = []
        block_start = time.perf_counter()
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            latencies.append(time.perf_counter() - t0)
            if time.perf_counter() - block_start > budget and len(latencies) >= 3:
                break
        stats = summarize(latencies)
        stats["items_per_s"] = round(items_per_call * len(latencies) / sum(latencies), 2)
        blocks.append(stats)
    result = {"repeats": len(blocks), "calls": sum(b["n"] for b in blocks)}
    for key in ("p50_ms", "p90_ms", "p99_ms", "items_per_s"):
        spread = median_spread([b[key] for b in blocks])
        result[key] = spread["median"]
        result[f"{key}_spread"] = [spread["min"], spread["max"]]
    return result
