"""The load generator, run as its own process so it never shares an interpreter (or a GIL)
with the server it measures:

    python -m benchmarks.loadgen --url http://127.0.0.1:PORT/predictions/food \\
        --image a.jpg --mode closed --concurrency 16 --duration 10 --out result.json
    python -m benchmarks.loadgen ... --mode open --rate 40 --duration 10 --out result.json
    python -m benchmarks.loadgen --url http://127.0.0.1:PORT/v2/models/food/infer \\
        --body v2-binary --image a.jpg ...

``--body`` is how each image travels: ``raw`` (the file as the body, TorchServe's
``curl -T``), ``multipart`` (form field ``data``, ``curl -F data=@a.jpg``) or ``v2-binary``
(KServe v2 / Open Inference Protocol with the binary tensor data extension: a JSON header
naming one BYTES input ``image`` of shape [1, 1], then the image in Triton's BYTES layout,
as tritonclient sends it). Every body is built once per image, before the clock starts.

Closed loop: ``concurrency`` clients, each sends its next request when the last one answers.
Open loop: requests start at Poisson arrival times drawn from ``--seed``, whatever the server
is doing, and latency is measured from the *intended* send time, so time spent queueing (in
the client or the server) is counted instead of hidden (no coordinated omission).

A request counts as ok only with a 200 whose body is a JSON answer (for a v2 answer with
binary outputs, its JSON header); any other status, a malformed body, a timeout or a
connection error is counted as an error, by kind, and its latency is left out of the
percentiles. Every run is bounded in time and request count, and only 127.0.0.1 /
localhost URLs are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import numpy as np

from benchmarks.timing import summarize

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
BODIES = ("raw", "multipart", "v2-binary")
MULTIPART_FIELD = "data"  # TorchServe's field name, which our server and LitServe's peer read
V2_INPUT = "image"  # the BYTES input of our server's and the peers' v2 models
V2_HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class Body:
    """One request, ready to send: its bytes and the headers that say how to read them."""

    data: bytes
    headers: dict[str, str] = field(default_factory=dict)


def check_loopback(url: str) -> None:
    """Refuse any target but this machine."""
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"--url {url}: the load generator only sends to loopback "
                         f"({', '.join(sorted(LOOPBACK))}), not {host!r}")


async def encode_body(image: bytes, body: str) -> Body:
    """``image`` as a request of kind ``body`` (one of :data:`BODIES`)."""
    if body == "raw":
        return Body(image, {"Content-Type": "application/octet-stream"})
    if body == "multipart":
        with aiohttp.MultipartWriter("form-data") as form:
            part = form.append(image, {"Content-Type": "application/octet-stream"})
            part.set_content_disposition("form-data", name=MULTIPART_FIELD,
                                         filename="image.jpg")
            return Body(await form.as_bytes(), {"Content-Type": form.content_type})
    if body == "v2-binary":
        tensor = struct.pack("<I", len(image)) + image  # Triton's BYTES element layout
        header = json.dumps({"inputs": [{
            "name": V2_INPUT, "datatype": "BYTES", "shape": [1, 1],
            "parameters": {"binary_data_size": len(tensor)}}]}).encode()
        return Body(header + tensor, {"Content-Type": "application/octet-stream",
                                      V2_HEADER_LENGTH: str(len(header))})
    raise ValueError(f"--body {body!r}: allowed {', '.join(BODIES)}")


def json_answer(payload: bytes, headers) -> bool:
    """True when the answer is JSON: the whole body, or the JSON header of a v2 answer
    with binary outputs."""
    length = headers.get(V2_HEADER_LENGTH)
    try:
        json.loads(payload[:int(length)] if length is not None else payload)
    except ValueError:
        return False
    return True


async def _one(session: aiohttp.ClientSession, url: str, body: Body, errors: Counter,
               timeout: aiohttp.ClientTimeout) -> bool:
    """Send one image; True when the answer is a 200 JSON body, else count the error."""
    try:
        async with session.post(url, data=body.data, timeout=timeout,
                                headers=body.headers) as resp:
            payload = await resp.read()
            if resp.status != 200:
                errors[f"http_{resp.status}"] += 1
                return False
            if not json_answer(payload, resp.headers):
                errors["bad_body"] += 1
                return False
            return True
    except asyncio.TimeoutError:
        errors["timeout"] += 1
    except aiohttp.ClientError as e:
        errors[type(e).__name__] += 1
    return False


async def closed_loop(url: str, bodies: list[Body], concurrency: int, duration: float,
                      max_requests: int, warmup: int, timeout: float) -> dict:
    """``concurrency`` clients in lock-step with the server, for ``duration`` seconds or
    ``max_requests`` measured requests, after ``warmup`` unmeasured requests per client."""
    errors: Counter = Counter()
    latencies: list[float] = []
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    counter = iter(range(10**9))
    async with aiohttp.ClientSession(connector=connector) as session:
        async def warm(worker: int) -> None:
            for i in range(warmup):
                await _one(session, url, bodies[(worker + i) % len(bodies)], Counter(),
                           client_timeout)

        await asyncio.gather(*(warm(w) for w in range(concurrency)))
        start, cpu0 = time.perf_counter(), time.process_time()
        deadline = start + duration
        sent = 0

        async def worker() -> None:
            nonlocal sent
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                body = bodies[next(counter) % len(bodies)]
                t0 = time.perf_counter()
                if await _one(session, url, body, errors, client_timeout):
                    latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return _result("closed", latencies, errors, sent, wall, time.process_time() - cpu0,
                   concurrency=concurrency)


async def open_loop(url: str, bodies: list[Body], rate: float, duration: float,
                    max_requests: int, timeout: float, seed: int,
                    max_connections: int) -> dict:
    """Poisson arrivals at ``rate`` per second for ``duration`` seconds; latency from the
    intended send time."""
    errors: Counter = Counter()
    latencies: list[float] = []
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=max(1, min(max_requests, int(rate * duration * 2))))
    arrivals = np.cumsum(gaps)
    arrivals = arrivals[arrivals < duration][:max_requests]
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    connector = aiohttp.TCPConnector(limit=max_connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        await _one(session, url, bodies[0], Counter(), client_timeout)  # open a connection
        start, cpu0 = time.perf_counter(), time.process_time()

        async def fire(i: int, intended: float) -> None:
            if await _one(session, url, bodies[i % len(bodies)], errors, client_timeout):
                latencies.append(time.perf_counter() - intended)

        tasks = []
        for i, offset in enumerate(arrivals):
            intended = start + float(offset)
            delay = intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(fire(i, intended)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return _result("open", latencies, errors, len(arrivals), wall, time.process_time() - cpu0,
                   rate=rate)


def _result(mode: str, latencies: list[float], errors: Counter, sent: int, wall: float,
            cpu: float, **params) -> dict:
    """The run's summary; ``cpu`` is the client's own CPU time while measuring (on a small
    machine the load generator competes with the server for the cores)."""
    ok = len(latencies)
    return {"mode": mode, **params, "sent": sent, "ok": ok,
            "errors": sum(errors.values()), "error_kinds": dict(errors),
            "wall_s": round(wall, 3), "rps": round(ok / wall, 2) if wall > 0 else 0.0,
            "client_cpu_s": round(cpu, 3),
            "client_cpu_ms_per_request": round(1000 * cpu / sent, 3) if sent else None,
            **summarize(latencies)}


async def _load(url: str, files: list[bytes], body: str, mode: str, **params) -> dict:
    """Encode every image as ``body`` (before the clock starts), then run the ``mode`` loop."""
    bodies = [await encode_body(data, body) for data in files]
    if mode == "closed":
        return await closed_loop(url, bodies, **params)
    return await open_loop(url, bodies, **params)


def run(url: str, images: list[Path], mode: str, concurrency: int = 1, rate: float = 1.0,
        duration: float = 10.0, max_requests: int = 100_000, warmup: int = 2,
        timeout: float = 30.0, seed: int = 0, max_connections: int = 256,
        body: str = "raw") -> dict:
    """One load run (the CLI's work), as a dict; ``body`` is how each image is sent."""
    check_loopback(url)
    if body not in BODIES:
        raise ValueError(f"--body {body!r}: allowed {', '.join(BODIES)}")
    if mode == "closed":
        params = {"concurrency": concurrency, "warmup": warmup}
    elif mode == "open":
        params = {"rate": rate, "seed": seed, "max_connections": max_connections}
    else:
        raise ValueError(f"--mode {mode!r}: allowed closed, open")
    files = [Path(p).read_bytes() for p in images]
    result = asyncio.run(_load(url, files, body, mode, duration=duration,
                               max_requests=max_requests, timeout=timeout, **params))
    return {**result, "body": body}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="POST target on 127.0.0.1")
    p.add_argument("--image", action="append", required=True, type=Path,
                   help="request body file; repeat to cycle through several")
    p.add_argument("--mode", choices=["closed", "open"], default="closed")
    p.add_argument("--body", choices=BODIES, default="raw",
                   help="how each image is sent: the raw file, multipart field 'data', or "
                        "a KServe v2 binary BYTES tensor 'image' (default: raw)")
    p.add_argument("--concurrency", type=int, default=1, help="closed loop: clients")
    p.add_argument("--rate", type=float, default=10.0, help="open loop: requests/s")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of measured load")
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--warmup", type=int, default=2,
                   help="closed loop: unmeasured requests per client first")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, s")
    p.add_argument("--seed", type=int, default=0, help="open loop: arrival schedule seed")
    p.add_argument("--out", type=Path, help="write the JSON result here (default: stdout)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("concurrency", "rate", "duration", "max_requests"):
        if getattr(args, name) <= 0:
            print(f"error: --{name.replace('_', '-')} must be > 0", file=sys.stderr)
            return 2
    try:
        result = run(args.url, args.image, args.mode, args.concurrency, args.rate,
                     args.duration, args.max_requests, args.warmup, args.timeout, args.seed,
                     body=args.body)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
