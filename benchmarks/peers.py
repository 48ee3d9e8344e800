"""The serving frameworks a user would pick instead of ours, each serving the same model (our
ONNX file, our preprocessing, the same thread budget) so one load generator measures them
all in one run:

- ``pytriton``: PyTriton, i.e. Triton Inference Server's C++ HTTP front end and dynamic
  batcher in front of a Python inference callable (KServe v2 protocol, binary BYTES input);
- ``litserve``: LitServe (FastAPI/uvicorn front end, a separate inference worker process)
  with its request batching on (multipart upload).

    with start_peer("litserve", model, threads=2, scratch=SCRATCH) as peer:
        loadgen(peer.url, images, "closed", 4.0, concurrency=16, body=peer.body)

Each peer runs as its own process group on free loopback ports, through ``serving.launch``,
and is stopped (the whole group) when the block ends, also on failure. The peer scripts live
in ``benchmarks/peer_servers/``; they load the model with ``serving.predictor.Predictor`` and
run its decode / infer / encode stages inside each framework's own hooks. PyTriton pins
numpy<2, so it runs from its own virtualenv, built once under
``benchmarks/scratch/venvs/pytriton`` from the pinned
``peer_servers/pytriton-requirements.txt``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from serving import launch
from serving.atomic import clean_stale, publish_dir, staging_dir

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
PEER_SCRIPTS = REPO / "benchmarks" / "peer_servers"
PYTRITON_REQUIREMENTS = PEER_SCRIPTS / "pytriton-requirements.txt"
VENVS = REPO / "benchmarks" / "scratch" / "venvs"  # git-ignored; kept across runs
PEERS = ("pytriton", "litserve")
MODEL_NAME = "food"
PIP_TIMEOUT_S = 900

# What each peer runs with unless the caller overrides it: the same batch budget as our
# server's defaults (8 images), each framework's own batching knobs otherwise as its docs
# recommend for a first configuration (see SETTINGS_NOTES).
DEFAULTS = {
    "pytriton": {"max_batch_size": 8, "max_queue_delay_us": 0, "instances": 1},
    "litserve": {"max_batch_size": 8, "batch_timeout_s": 0.005, "workers": 1,
                 "api_servers": 1, "fast_queue": True},
}
SETTINGS_NOTES = {
    "pytriton": "Triton dynamic batcher as its guide's recommended first step: "
                "max_batch_size set, dynamic_batching with default settings (no queue delay: "
                "batches are whatever queued while the instance was busy); one instance with "
                "all intra-op threads; decode and encode inside the batched inference callable "
                "(@batch). https://docs.nvidia.com/deeplearning/triton-inference-server/"
                "user-guide/docs/batcher.html",
    "litserve": "LitAPI(max_batch_size, batch_timeout) with batch/unbatch, as in LitServe's "
                "batching guide; one CPU inference worker holding all intra-op threads, one "
                "API server (num_api_servers defaults to the worker count); fast_queue "
                "(ZeroMQ), which LitServer's docs advise above 100 requests/s, the rate this "
                "model reaches here. https://lightning.ai/docs/litserve/features/batching",
}


class PeerUnavailable(RuntimeError):
    """A peer cannot run here (its package or environment is missing and cannot be built)."""


@dataclass
class PeerServer:
    """A running peer: where the load generator posts, how it sends each image (``body``:
    ``raw``, ``multipart`` or ``v2-binary``, see ``benchmarks.loadgen``) and the settings it
    runs with."""

    name: str
    url: str
    body: str
    settings: dict = field(default_factory=dict)
    launched: launch.Launched | None = field(default=None, repr=False)


def _ready(launched: launch.Launched, url: str, timeout: float) -> None:
    """Wait until GET ``url`` answers 200; stop the peer (never left running) if it does not."""
    try:
        launch.wait_ready(url, launched.proc, timeout, launched.log_path)
    except BaseException:
        launched.stop(grace=5.0)
        raise


def _requirements_key() -> str:
    """What the PyTriton venv was built from: the requirements and the base interpreter."""
    digest = hashlib.sha256(PYTRITON_REQUIREMENTS.read_bytes())
    digest.update(f"{sys.version}|{sys.base_prefix}".encode())
    return digest.hexdigest()


def pytriton_python(root: Path = VENVS) -> Path:
    """The Python of the PyTriton virtualenv ``root/pytriton``, built on first use (python -m
    venv, pip install -r the pinned requirements) and rebuilt when the requirements or the
    interpreter change; PeerUnavailable with pip's answer when it cannot be built."""
    root = Path(root)
    venv = root / "pytriton"
    stamp, key = venv / ".requirements-sha256", _requirements_key()
    if stamp.is_file() and stamp.read_text().strip() == key:
        return venv / "bin" / "python"
    root.mkdir(parents=True, exist_ok=True)
    clean_stale(root)
    log.info("building the PyTriton environment in %s (once; takes a few minutes)", venv)
    with staging_dir(root, "pytriton-venv") as stage:
        steps = [[sys.executable, "-m", "venv", str(stage)],
                 [str(stage / "bin" / "python"), "-m", "pip", "install", "--quiet",
                  "--disable-pip-version-check", "-r", str(PYTRITON_REQUIREMENTS)]]
        for cmd in steps:
            try:
                done = subprocess.run(cmd, capture_output=True, text=True,
                                      timeout=PIP_TIMEOUT_S, check=False)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise PeerUnavailable(f"cannot build the PyTriton environment in {venv}: "
                                      f"{' '.join(cmd[:4])} failed: {e}") from e
            if done.returncode != 0:
                raise PeerUnavailable(
                    f"cannot build the PyTriton environment in {venv}: {' '.join(cmd[:4])} "
                    f"exited {done.returncode} (nvidia-pytriton needs PyPI and Linux with "
                    f"glibc >= 2.35):\n{(done.stderr or done.stdout)[-2000:]}")
        (stage / ".requirements-sha256").write_text(key + "\n")
        shutil.rmtree(venv, ignore_errors=True)
        publish_dir(stage, venv)
    return venv / "bin" / "python"


def _peer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with the repo on PYTHONPATH (the peers import ``serving``)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return launch.child_env({"PYTHONPATH": path, **(extra or {})})


def _pytriton(model: Path, threads: int, scratch: Path, options: dict,
              ready_timeout: float, home: Path) -> PeerServer:
    python = pytriton_python()
    http, grpc, metrics = launch.free_port(), launch.free_port(), launch.free_port()
    cmd = [str(python), str(PEER_SCRIPTS / "pytriton_server.py"), "--model", str(model),
           "--name", MODEL_NAME, "--host", launch.HOST, "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--threads", str(threads),
           "--instances", str(options["instances"]),
           "--max-batch-size", str(options["max_batch_size"]),
           "--max-queue-delay-us", str(options["max_queue_delay_us"])]
    # Triton's Python backend stub links libpython3.X.so: the one of the interpreter the venv
    # was made from (PyTriton's install guide: put its LIBDIR on LD_LIBRARY_PATH).
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    library_path = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)
    env = _peer_env({"LD_LIBRARY_PATH": library_path, "PYTRITON_HOME": str(home)})
    log_path = Path(scratch) / "logs" / f"peer-pytriton-{http}.log"
    proc = launch.spawn(cmd, log_path, env=env, cwd=REPO)
    base = f"http://{launch.HOST}:{http}"
    launched = launch.Launched(proc, base, f"http://{launch.HOST}:{metrics}/metrics", None,
                               log_path)
    _ready(launched, f"{base}/v2/models/{MODEL_NAME}/ready", ready_timeout)
    settings = {"framework": f"PyTriton {_pinned('nvidia-pytriton')}",
                "protocol": "KServe v2 (binary BYTES input 'image', JSON output)",
                "output": "BYTES 'predictions': the top-k JSON text", "threads": threads,
                "intra_op_threads_per_instance": max(1, threads // options["instances"]),
                **options, "docs": SETTINGS_NOTES["pytriton"]}
    return PeerServer("pytriton", f"{base}/v2/models/{MODEL_NAME}/infer", "v2-binary",
                      settings, launched)


def _litserve(model: Path, threads: int, scratch: Path, options: dict,
              ready_timeout: float, home: Path) -> PeerServer:
    if importlib.util.find_spec("litserve") is None:
        raise PeerUnavailable("litserve is not installed: pip install -e '.[bench]'")
    port = launch.free_port()
    cmd = [sys.executable, str(PEER_SCRIPTS / "litserve_server.py"), "--model", str(model),
           "--host", launch.HOST, "--port", str(port), "--threads", str(threads),
           "--max-batch-size", str(options["max_batch_size"]),
           "--batch-timeout-s", str(options["batch_timeout_s"]),
           "--workers", str(options["workers"]), "--api-servers", str(options["api_servers"])]
    if options["fast_queue"]:
        cmd.append("--fast-queue")
    log_path = Path(scratch) / "logs" / f"peer-litserve-{port}.log"
    proc = launch.spawn(cmd, log_path, env=_peer_env(), cwd=REPO)
    base = f"http://{launch.HOST}:{port}"
    launched = launch.Launched(proc, base, None, None, log_path)
    _ready(launched, f"{base}/health", ready_timeout)
    settings = {"framework": f"LitServe {metadata.version('litserve')}",
                "protocol": "POST /predict, multipart field 'data'",
                "output": "the top-k JSON", "threads": threads,
                "intra_op_threads_per_worker": max(1, threads // options["workers"]),
                **options, "docs": SETTINGS_NOTES["litserve"]}
    return PeerServer("litserve", f"{base}/predict", "multipart", settings, launched)


def _pinned(package: str) -> str:
    """The version ``package`` is pinned to in the PyTriton requirements."""
    for line in PYTRITON_REQUIREMENTS.read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip() == package:
            return version.strip()
    return "unpinned"


@contextlib.contextmanager
def start_peer(kind: str, model: Path, threads: int, scratch: Path,
               ready_timeout: float = 180.0, **options) -> Iterator[PeerServer]:
    """Peer ``kind`` serving ``model`` (a version directory with model.onnx) with ``threads``
    intra-op threads for the duration of the block; ``options`` override :data:`DEFAULTS`.
    Stopped, with its whole process group, when the block ends."""
    if kind not in PEERS:
        raise ValueError(f"unknown peer {kind!r}; known: {', '.join(PEERS)}")
    unknown = set(options) - set(DEFAULTS[kind])
    if unknown:
        raise ValueError(f"{kind}: unknown option(s) {sorted(unknown)}; allowed: "
                         f"{sorted(DEFAULTS[kind])}")
    opts = {**DEFAULTS[kind], **options}
    start = _pytriton if kind == "pytriton" else _litserve
    # The peer's own workspace (PyTriton's sockets and Triton copy): a short path, since a
    # Unix socket path has at most 107 bytes; removed after the peer stops.
    with tempfile.TemporaryDirectory(prefix=f"peer-{kind}-") as home:
        peer = start(Path(model).resolve(), threads, Path(scratch).resolve(), opts,
                     ready_timeout, Path(home))
        try:
            yield peer
        finally:
            peer.launched.stop(grace=15.0)
