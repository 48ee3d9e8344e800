"""Start and stop the servers under test on free loopback ports, always cleaning up.

``onnx_server(...)`` runs ``python -m serving``; ``torchserve(...)`` runs TorchServe in the
foreground with a private config (its own ports, including gRPC, model store, logs, and a
private ``TMPDIR`` so ``torchserve --stop`` can only ever find this instance's pid file).
Both are context managers yielding a :class:`Server`; the process group is killed on exit if
the polite stop did not end it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from training.archive import tool

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
FORBIDDEN_PORTS = {5000, 8080, 8081, 8082}


@dataclass
class Server:
    """A running server: where to send predictions and what it was started with."""

    name: str
    url: str
    settings: dict = field(default_factory=dict)
    log_path: Path | None = None


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (never one of the fixed ports other tools use)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in FORBIDDEN_PORTS:
            return port


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(check, proc: subprocess.Popen, timeout: float, log_path: Path) -> None:
    """Poll ``check()`` until True; fail with the log's tail if the process dies or time
    runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready; "
                               f"log {log_path}:\n{_tail(log_path)}")
        try:
            if check():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout:.0f}s; log {log_path}:\n"
                       f"{_tail(log_path)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _kill_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):  # workers may outlive their parent
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@contextlib.contextmanager
def onnx_server(model: str | Path, scratch: Path, name: str = "food", threads: int = 2,
                max_batch_size: int = 8, max_batch_delay_ms: float = 5.0,
                preprocess_threads: int | None = None, spinning: bool = False,
                timeout: float = 120.0) -> Iterator[Server]:
    """Our ONNX Runtime server (``python -m serving``) on a free port."""
    port, metrics_port = free_port(), free_port()
    scratch.mkdir(parents=True, exist_ok=True)
    log_path = scratch / f"serving-{port}.log"
    cmd = [sys.executable, "-m", "serving", "--model", f"{name}={model}", "--host", HOST,
           "--port", str(port), "--metrics-port", str(metrics_port), "--threads", str(threads),
           "--max-batch-size", str(max_batch_size),
           "--max-batch-delay-ms", str(max_batch_delay_ms), "--log-level", "warning"]
    if preprocess_threads:
        cmd += ["--preprocess-threads", str(preprocess_threads)]
    if spinning:
        cmd.append("--spinning")
    settings = {"threads": threads, "max_batch_size": max_batch_size,
                "max_batch_delay_ms": max_batch_delay_ms, "spinning": spinning,
                "preprocess_threads": preprocess_threads or "cpu count"}
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    try:
        wait_ready(lambda: _get(f"http://{HOST}:{port}/ping")[0] == 200, proc, timeout,
                   log_path)
        yield Server(name, f"http://{HOST}:{port}/predictions/{name}", settings, log_path)
    finally:
        _kill_group(proc)


def ts_config(scratch: Path, model_store: Path, ports: dict[str, int],
              extra: dict[str, str] | None = None) -> Path:
    """A private config.properties: every address on its own free loopback port."""
    lines = {
        "inference_address": f"http://{HOST}:{ports['inference']}",
        "management_address": f"http://{HOST}:{ports['management']}",
        "metrics_address": f"http://{HOST}:{ports['metrics']}",
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_port": str(ports["grpc_management"]),
        "model_store": str(model_store),
        "disable_token_authorization": "true",
        "enable_model_api": "false",
        "install_py_dep_per_model": "false",
        "max_request_size": str(20 * 1024 * 1024),
        "max_response_size": str(20 * 1024 * 1024),
        **(extra or {}),
    }
    path = scratch / "config.properties"
    path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    return path


def _workers_ready(management: str, name: str) -> bool:
    status, body = _get(f"{management}/models/{name}")
    if status != 200:
        return False
    workers = json.loads(body)[0].get("workers", [])
    return bool(workers) and all(w.get("status") == "READY" for w in workers)


def torchserve_bin() -> str:
    return tool("torchserve")


@contextlib.contextmanager
def torchserve(mar: Path, scratch: Path, name: str = "food", settings: dict | None = None,
               extra_config: dict[str, str] | None = None, env_extra: dict[str, str] | None = None,
               timeout: float = 240.0) -> Iterator[Server]:
    """TorchServe serving one ``.mar`` with a private config; stopped (and its process group
    killed) on exit. ``env_extra`` reaches the Python workers (they inherit the environment)."""
    if scratch.exists():
        shutil.rmtree(scratch)
    store = scratch / "model_store"
    store.mkdir(parents=True)
    shutil.copyfile(mar, store / f"{name}.mar")
    ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc_inference",
                                      "grpc_management")}
    config = ts_config(scratch, store, ports, extra_config)
    # TorchServe runs with its defaults: no TS_* overrides (make exports TS_CONFIG_FILE) and
    # no OpenMP policy inherited from the harness, unless env_extra sets one.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TS_") and k != "OMP_WAIT_POLICY"}
    tmp = scratch / "tmp"
    tmp.mkdir()
    env.update(TMPDIR=str(tmp), TEMP=str(tmp), LOG_LOCATION=str(scratch / "logs"),
               METRICS_LOCATION=str(scratch / "logs"), **(env_extra or {}))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log_path = scratch / "torchserve.out"
    cmd = [torchserve_bin(), "--start", "--foreground", "--ts-config", str(config),
           "--model-store", str(store), "--models", f"{name}={name}.mar", "--ncs",
           "--disable-token-auth"]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                cwd=scratch, start_new_session=True)
    management = f"http://{HOST}:{ports['management']}"
    try:
        wait_ready(lambda: _workers_ready(management, name), proc, timeout, log_path)
        described = json.loads(_get(f"{management}/models/{name}")[1])[0]
        settings = {**(settings or {}), "workers_running": len(described.get("workers", [])),
                    "batchSize_running": described.get("batchSize")}
        yield Server(name, f"http://{HOST}:{ports['inference']}/predictions/{name}",
                     settings, log_path)
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run([torchserve_bin(), "--stop", "--foreground"], env=env, cwd=scratch,
                           timeout=60, capture_output=True, check=False)
        _kill_group(proc)
