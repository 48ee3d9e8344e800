"""Start, wait for and stop our ONNX Runtime server and TorchServe on free loopback ports.

The tests, the benchmarks and ``python -m training demo`` start every server through this
module, so "pick free ports, start, wait until it answers, stop it and its children, show the
log when it fails" is written once. Standard library only (no torch, no requests).

    with start_onnx_server(["artifacts/food/latest"], Path("server.log")) as server:
        urllib.request.urlopen(f"{server.url}/ping")

Every process runs in its own session, so stopping it reaches its whole process group
(TorchServe's Java frontend and Python workers included). TorchServe gets a private
``config.properties``, model store, log directories and ``TMPDIR`` in ``workdir`` (its pid
file lives there, so one instance can never stop another).
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# The fixed ports of `make serve`, `make serve-onnx` and `make mlflow-ui`: never hand them out.
RESERVED_PORTS = frozenset({5000, 8080, 8081, 8082})
PACKAGE_ROOT = Path(__file__).resolve().parents[1]

Env = Mapping[str, str | None]
Headers = Mapping[str, str] | Callable[[], Mapping[str, str]]


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that nothing listens on right now (never a reserved one)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port


def console_script(name: str) -> str:
    """A console script (``torchserve``, ``torch-model-archiver``) next to this Python, else on
    PATH, so the commands work from a virtual environment without activating it."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: pip install -e '.[torchserve]'")
    return found


def http_get(url: str, timeout: float = 5.0,
             headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """``(status, body)`` of a GET; HTTP error statuses are returned, not raised."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def child_env(env: Env | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with ``env`` applied; a None value
    removes that variable."""
    out = dict(os.environ if base is None else base)
    for key, value in (env or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def spawn(cmd: list[str], log_path: Path, *, env: Mapping[str, str] | None = None,
          cwd: Path | str | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own session (so :func:`stop_process` reaches its children) with
    stdout and stderr going to ``log_path``; ``env`` is the whole environment (None: inherit)."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("starting %s (log %s)", " ".join(cmd), log_path)
    with open(log_path, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def stop_process(proc: subprocess.Popen, grace: float = 30.0) -> int | None:
    """SIGTERM the process group, SIGKILL what is left after ``grace`` seconds; the exit code.

    The group is killed even after the leader exited: workers may outlive their parent.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    return proc.returncode


def wait_ready(url: str, proc: subprocess.Popen, timeout: float, log_path: Path, *,
               accept: Callable[[int, bytes], bool] | None = None,
               headers: Headers | None = None) -> None:
    """Poll GET ``url`` until ``accept(status, body)`` (default: status 200); ``headers`` may
    be a function, called before each try (for a token written after the start).

    Raises RuntimeError with the log's tail if the process exits or ``timeout`` runs out.
    """
    accept = accept or (lambda status, _body: status == 200)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready; "
                               f"log {log_path}:\n{log_tail(log_path)}")
        with contextlib.suppress(OSError, ValueError):
            sent = headers() if callable(headers) else headers
            if accept(*http_get(url, timeout=5.0, headers=sent)):
                return
        time.sleep(0.25)
    raise RuntimeError(f"server not ready at {url} after {timeout:.0f}s; log {log_path}:\n"
                       f"{log_tail(log_path)}")


@dataclass
class Launched(contextlib.AbstractContextManager):
    """A running server: where to reach it, its process and its log; stops on context exit.

    ``url`` is the inference base (``/ping``, ``/predictions/<model>`` go after it),
    ``metrics_url`` the Prometheus scrape address itself, ``management_url`` the management
    API base (None when the server has none).
    """

    proc: subprocess.Popen
    url: str
    metrics_url: str | None
    management_url: str | None
    log_path: Path

    @property
    def port(self) -> int:
        """The inference port."""
        return urlsplit(self.url).port

    def stop(self, grace: float = 30.0) -> int | None:
        """Stop the server and its process group; its exit code."""
        return stop_process(self.proc, grace)

    def __exit__(self, *exc) -> None:
        self.stop()


def _started(launched: Launched, ready_url: str, timeout: float,
             accept: Callable[[int, bytes], bool] | None = None,
             headers: Headers | None = None) -> Launched:
    """``launched`` once ready; stopped (never left running) if it does not get there."""
    try:
        wait_ready(ready_url, launched.proc, timeout, launched.log_path, accept=accept,
                   headers=headers)
    except BaseException:
        launched.stop(grace=5.0)
        raise
    return launched


def start_onnx_server(models: list[str], log_path: Path, *, extra_args: Iterable[str] = (),
                      env: Env | None = None, ready_timeout: float = 90,
                      cwd: Path | str | None = None) -> Launched:
    """``python -m serving --model M ...`` on free loopback ports, once GET /ping answers 200.

    ``models`` are ``--model`` values (``[NAME=]PATH``); ``extra_args`` go on the command line
    as they are; ``env`` is applied over this process's environment (None removes a variable).
    """
    port, metrics_port, management_port = free_port(), free_port(), free_port()
    extra_args = list(extra_args)
    if "--management-port" in extra_args:  # the caller's own (0: none)
        management_port = int(extra_args[extra_args.index("--management-port") + 1])
    cmd = [sys.executable, "-m", "serving", "--host", HOST, "--port", str(port),
           "--metrics-port", str(metrics_port), "--management-port", str(management_port),
           *extra_args]
    for model in models:
        cmd += ["--model", str(model)]
    # `-m serving` must find this very package, whatever the working directory.
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = spawn(cmd, log_path, env=child_env({"PYTHONPATH": path, **(env or {})}), cwd=cwd)
    base = f"http://{HOST}:{port}"
    management = f"http://{HOST}:{management_port}" if management_port else None
    launched = Launched(proc, base, f"http://{HOST}:{metrics_port}/metrics", management,
                        Path(log_path))
    return _started(launched, f"{base}/ping", ready_timeout)


def torchserve_config(path: Path, model_store: Path, ports: Mapping[str, int],
                      config: Mapping[str, str] | None = None) -> Path:
    """Write a ``config.properties`` with every address (gRPC included) on ``ports``;
    ``config`` adds or overrides entries."""
    entries = {
        "inference_address": f"http://{HOST}:{ports['inference']}",
        "management_address": f"http://{HOST}:{ports['management']}",
        "metrics_address": f"http://{HOST}:{ports['metrics']}",
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_port": str(ports["grpc_management"]),
        "model_store": str(model_store),
        "disable_token_authorization": "true",
        "enable_model_api": "false",
        "install_py_dep_per_model": "false",
        # as serve_config/config.properties: twice the handler's 20 MB body limit, so a body
        # over that limit arrives whole and gets the handler's 413 JSON
        "max_request_size": str(40 * 1024 * 1024),
        "max_response_size": str(20 * 1024 * 1024),
        **(config or {}),
    }
    path.write_text("".join(f"{k}={v}\n" for k, v in entries.items()))
    return path


def workers_ready(status: int, body: bytes) -> bool:
    """True when a management ``GET /models/<name>`` answer lists workers, all READY."""
    described = json.loads(body) if status == 200 else []
    workers = described[0].get("workers", []) if described else []
    return bool(workers) and all(w.get("status") == "READY" for w in workers)


def management_headers(workdir: Path) -> dict[str, str]:
    """The management API's bearer token when token authorization wrote ``key_file.json``."""
    key_file = Path(workdir) / "key_file.json"
    if not key_file.is_file():
        return {}
    return {"Authorization": f"Bearer {json.loads(key_file.read_text())['management']['key']}"}


def start_torchserve(model_store: Path, models: dict[str, str], workdir: Path, *,
                     config: Mapping[str, str] | None = None, env: Env | None = None,
                     ready_timeout: float = 180) -> Launched:
    """TorchServe in the foreground serving ``models`` (name -> ``.mar`` in ``model_store``),
    once every model's workers are READY.

    ``workdir`` receives the private config.properties, ``logs/``, ``tmp/`` (the pid file
    and the workers' sockets) and the launcher's output ``torchserve.log``. ``config`` adds
    or overrides config.properties entries (``disable_token_authorization=false`` turns token
    authorization on). TorchServe does not inherit ``TS_*`` variables (make exports
    TS_CONFIG_FILE); OMP_WAIT_POLICY is PASSIVE, as ``make serve`` sets it. ``env`` is applied
    last (None removes a variable).
    """
    if shutil.which("java") is None:
        raise RuntimeError("TorchServe needs Java 17: apt-get install openjdk-17-jre-headless")
    workdir, model_store = Path(workdir).resolve(), Path(model_store).resolve()
    for name, mar in models.items():
        if not (model_store / mar).is_file():
            raise FileNotFoundError(f"model {name}: no {mar} in {model_store}")
    tmp = workdir / "tmp"  # TMPDIR (pid file) and TEMP (java.io.tmpdir: worker sockets)
    if len(str(tmp / ".ts.sock.65535")) > 107:
        raise ValueError(f"workdir {workdir} is too deep for TorchServe's worker sockets "
                         f"(a Unix socket path has at most 107 bytes); use a shorter path")
    tmp.mkdir(parents=True, exist_ok=True)
    # TorchServe binds its ports only after loading the models, seconds after free_port
    # chose them; a client connection (our own readiness polls) may take one of them as its
    # ephemeral port meanwhile. Then it exits with "Address already in use": new ports.
    for _ in range(BIND_ATTEMPTS - 1):
        try:
            return _start_torchserve_once(model_store, models, workdir, config, env,
                                          ready_timeout)
        except RuntimeError as e:
            if "Address already in use" not in str(e):
                raise
            log.warning("TorchServe could not bind a port (taken meanwhile); new ports")
    return _start_torchserve_once(model_store, models, workdir, config, env, ready_timeout)


BIND_ATTEMPTS = 3


def _start_torchserve_once(model_store: Path, models: dict[str, str], workdir: Path,
                           config: Mapping[str, str] | None, env: Env | None,
                           ready_timeout: float) -> Launched:
    tmp = workdir / "tmp"
    ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc_inference",
                                      "grpc_management")}
    properties = torchserve_config(workdir / "config.properties", model_store, ports, config)
    token_auth = str((config or {}).get("disable_token_authorization", "true")).lower() != "true"
    base = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
    environment = child_env({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TMPDIR": str(tmp), "TEMP": str(tmp),
        "LOG_LOCATION": str(workdir / "logs"), "METRICS_LOCATION": str(workdir / "logs"),
        "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}, base)
    cmd = [console_script("torchserve"), "--start", "--foreground", "--ts-config",
           str(properties), "--model-store", str(model_store), "--models",
           *(f"{name}={mar}" for name, mar in models.items()), "--ncs"]
    if not token_auth:
        cmd.append("--disable-token-auth")
    log_path = workdir / "torchserve.log"
    proc = spawn(cmd, log_path, env=environment, cwd=workdir)
    management = f"http://{HOST}:{ports['management']}"
    launched = Launched(proc, f"http://{HOST}:{ports['inference']}",
                        f"http://{HOST}:{ports['metrics']}/metrics", management, log_path)
    deadline = time.monotonic() + ready_timeout
    for name in models:
        _started(launched, f"{management}/models/{name}",
                 max(1.0, deadline - time.monotonic()), accept=workers_ready,
                 headers=(lambda: management_headers(workdir)) if token_auth else None)
    return launched
