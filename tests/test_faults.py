"""Faults around the servers and the training run, with real processes on loopback: SIGTERM
under load, a TorchServe worker killed with kill -9, bodies over the limit on both servers,
the MLflow tracking server going away mid-training, the feedback database going away."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import requests
from conftest import jpeg_bytes, make_onnx_version

from serving.feedback import FeedbackStore
from serving.http.config import ServerConfig
from serving.http.dataplane import STOP_BATCHERS_S, STOP_FEEDBACK_S
from serving.launch import (
    free_port,
    http_get,
    spawn,
    start_onnx_server,
    start_torchserve,
    stop_process,
    wait_ready,
)
from training.archive import build_archive
from training.sample_data import generate

REPO = Path(__file__).resolve().parents[1]
K8S_GRACE_S = 30.0  # Kubernetes' default terminationGracePeriodSeconds
MANAGEMENT_STOP_S = 5.0  # the management listener's own graceful stop

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def version(tmp_path_factory) -> Path:
    return make_onnx_version(tmp_path_factory.mktemp("faults") / "artifacts")


@pytest.fixture(scope="module")
def torchserve(version, tmp_path_factory):
    work = tmp_path_factory.mktemp("ts")
    build_archive(version, "onnx", export_path=work / "store")
    with start_torchserve(work / "store", {"food": "food.mar"}, work / "w") as launched:
        yield launched


@pytest.fixture(scope="module")
def onnx_server(version, tmp_path_factory):
    work = tmp_path_factory.mktemp("onnx")
    with start_onnx_server([str(version)], work / "server.log",
                           extra_args=["--management-port", "0"]) as launched:
        yield launched


def curl(*args: str) -> tuple[int, str]:
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True,
                         text=True, check=False, timeout=120)
    body, _, status = out.stdout.rpartition("\n")
    return int(status or 0), body


def urllib_post(url: str, data: bytes) -> tuple[int, bytes]:
    """POST bytes with urllib (its default content type is a form: TorchServe would parse one)."""
    sent = urllib.request.Request(url, data=data,
                                  headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(sent, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ---------------------------------------------------------------- 413 that clients read
@pytest.mark.parametrize("which", ["torchserve", "onnx_server"])
def test_body_over_the_limit_is_a_413_json_every_client_reads(which, request, tmp_path):
    server = request.getfixturevalue(which)
    url = f"{server.url}/predictions/food"
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(25 * 1024 * 1024))  # over 20 MB, under twice that
    sent = requests.post(url, data=big.read_bytes(), timeout=120)
    answers = {
        "curl -T": curl("-T", str(big), url),
        "curl -F": curl("-F", f"data=@{big}", url),
        "requests": (sent.status_code, sent.text),
        "urllib": urllib_post(url, big.read_bytes()),
    }
    for client, (status, body) in answers.items():
        assert status == 413, (client, status, body[:200])
        assert json.loads(body)["type"] == "RequestEntityTooLarge", client
    assert requests.post(url, data=jpeg_bytes(), timeout=30).status_code == 200


def test_torchserve_takes_an_image_in_a_form_text_field(torchserve, tmp_path):
    image = tmp_path / "pizza.jpg"
    image.write_bytes(jpeg_bytes(90, 70, seed=4))
    url = f"{torchserve.url}/predictions/food"
    as_text, as_file = curl("-F", f"data=<{image}", url), curl("-F", f"data=@{image}", url)
    assert as_text[0] == as_file[0] == 200 and json.loads(as_text[1]) == json.loads(as_file[1])


# ---------------------------------------------------------------- TorchServe worker kill -9
def worker_pids(frontend: psutil.Process) -> set[int]:
    """The live Python workers under TorchServe's Java frontend (a killed one may linger as
    a zombie until the frontend reaps it)."""
    pids = set()
    for p in frontend.children(recursive=True):
        try:
            if "model_service_worker" in " ".join(p.cmdline()):
                pids.add(p.pid)
        except psutil.Error:  # gone, or a zombie
            continue
    return pids


def test_torchserve_restarts_a_worker_killed_with_kill_9(torchserve):
    frontend = next(p for p in [psutil.Process(torchserve.proc.pid),
                                *psutil.Process(torchserve.proc.pid).children(recursive=True)]
                    if p.name() == "java")
    before = worker_pids(frontend)
    assert len(before) == 2, before  # model-config.yaml: two workers
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        now = worker_pids(frontend)
        status, body = http_get(f"{torchserve.management_url}/models/food")
        workers = json.loads(body)[0]["workers"] if status == 200 else []
        if victim not in now and len(now) == 2 and workers and \
                all(w["status"] == "READY" for w in workers):
            break
        assert time.monotonic() < deadline, f"worker not restarted: {now}, {workers}"
        time.sleep(0.5)
    answers = [requests.post(f"{torchserve.url}/predictions/food", data=jpeg_bytes(seed=i),
                             timeout=60) for i in range(8)]
    assert [a.status_code for a in answers] == [200] * 8


# ---------------------------------------------------------------- SIGTERM under load
def start_partial(port: int, data: bytes, sent: int) -> socket.socket:
    """A request whose body is only partly sent: in flight until the rest is sent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST /predictions/food HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 f"Content-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n"
                 f"\r\n".encode() + data[:sent])
    return sock


def read_status(sock: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            return 0
        head += chunk
    return int(head.split()[1])


def test_shutdown_budget_fits_the_kubernetes_grace_period():
    budget = ServerConfig().drain_s + MANAGEMENT_STOP_S + STOP_BATCHERS_S + STOP_FEEDBACK_S
    assert budget < K8S_GRACE_S


def test_sigterm_under_load_finishes_in_flight_requests_and_exits_in_the_drain(version,
                                                                                tmp_path):
    drain = 4.0
    server = start_onnx_server([str(version)], tmp_path / "server.log", extra_args=[
        "--management-port", "0", "--drain-s", str(drain)])
    try:
        image = jpeg_bytes(120, 90, seed=7)
        stop, results = threading.Event(), []

        def load() -> None:  # closed-loop clients, keep-alive connections
            with requests.Session() as session:
                while not stop.is_set():
                    try:
                        r = session.post(f"{server.url}/predictions/food", data=image,
                                         timeout=30)
                        results.append(r.status_code)
                    except requests.ConnectionError as e:  # refused/closed once stopping
                        results.append(type(e).__name__)
                        time.sleep(0.05)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        in_flight = [start_partial(server.port, image, 100) for _ in range(3)]
        stuck = start_partial(server.port, image, 100)  # never finishes: cut at the drain
        time.sleep(0.3)
        sent_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.proc.poll() is None, "exited with requests in flight"
        for sock in in_flight:
            sock.sendall(image[100:])
        statuses = [read_status(sock) for sock in in_flight]
        rc = server.proc.wait(drain + MANAGEMENT_STOP_S + STOP_BATCHERS_S + STOP_FEEDBACK_S)
        took = time.monotonic() - sent_at
        stop.set()
        for t in threads:
            t.join(30)
        stuck.close()
    finally:
        server.stop(grace=5)
    assert statuses == [200, 200, 200]
    # uvicorn re-raises the SIGTERM it handled once its shutdown is complete
    assert rc in (0, -signal.SIGTERM) and "Application shutdown complete" in \
        server.log_path.read_text()
    assert took < drain + MANAGEMENT_STOP_S + STOP_BATCHERS_S + STOP_FEEDBACK_S
    answered = [s for s in results if isinstance(s, int)]
    assert len(answered) > 20 and set(answered) == {200}, sorted(set(map(str, results)))


# ---------------------------------------------------------------- MLflow server goes away
def test_training_continues_when_the_tracking_server_goes_away(tmp_path):
    data = tmp_path / "data" / "sample"
    generate(data, examples_dir=tmp_path / "examples", per_class=4, seed=1)
    port = free_port()
    mlflow_log = tmp_path / "mlflow.log"
    mlflow_server = spawn([str(Path(sys.executable).parent / "mlflow"), "server",
                           "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
                           "--default-artifact-root", str(tmp_path / "mlartifacts"),
                           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                          mlflow_log, cwd=tmp_path)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", mlflow_server, 120, mlflow_log)
        env = {**os.environ, "PYTHONPATH": str(REPO),
               "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
               # a dead server costs one failed call, not MLflow's default retry schedule
               "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
        args = {"resize_size": 36, "crop_size": 32, "epochs": 2, "batch_size": 8,
                "workers": 0, "weights": "none", "freeze": "none", "data_dir": data,
                "artifacts_dir": tmp_path / "artifacts",
                "checkpoint_dir": tmp_path / "checkpoints"}
        training = subprocess.Popen(
            [sys.executable, "-m", "training", "train", "--config",
             str(REPO / "configs/sample.yaml"),
             *(f"--{k.replace('_', '-')}={v}" for k, v in args.items())],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        lines = []
        for line in training.stderr:
            lines.append(line)
            if "epoch 1/2" in line and "train_loss" in line:
                break
        training.send_signal(signal.SIGSTOP)  # hold it at epoch 1 while the server dies
        stop_process(mlflow_server, grace=5)
        training.send_signal(signal.SIGCONT)
        lines += training.stderr.readlines()
        assert training.wait(300) == 0, "".join(lines[-30:])
    finally:
        stop_process(mlflow_server, grace=5)
    log = "".join(lines)
    assert log.count("MLflow tracking disabled") == 1, log[-3000:]
    assert "epoch 2/2" in log  # the epoch after the server went away was trained
    assert (tmp_path / "artifacts" / "food" / "v1" / "model.pth").is_file()


# ---------------------------------------------------------------- the feedback DB goes away
def metric(metrics_url: str, name: str) -> float:
    _, body = http_get(metrics_url)
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith(name))


def test_feedback_database_unavailable_predictions_go_on_nothing_acknowledged_is_lost(
        version, tmp_path):
    db = tmp_path / "fb.db"
    server = start_onnx_server([str(version)], tmp_path / "server.log", extra_args=[
        "--management-port", "0", "--feedback-db", f"sqlite:///{db}"])
    predict = f"{server.url}/predictions/food"
    acknowledged = []
    try:
        for i in range(5):
            pid = requests.post(predict, data=jpeg_bytes(seed=i), timeout=30
                                ).headers["X-Prediction-Id"]
            r = requests.post(f"{server.url}/feedback",
                              json={"prediction_id": pid, "label": "salad"}, timeout=30)
            assert r.status_code == 200
            acknowledged.append(pid)
        # another process takes the database: every write of the server now fails
        holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import sqlite3, time
            db = sqlite3.connect({str(db)!r}, isolation_level=None)
            db.execute("BEGIN EXCLUSIVE")
            print("locked", flush=True)
            time.sleep(600)
            """)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            during = []
            pending = threading.Thread(target=lambda: during.append(requests.post(
                f"{server.url}/feedback", json={"prediction_id": acknowledged[0],
                                                "label": "sushi"}, timeout=60)))
            pending.start()
            statuses = [requests.post(predict, data=jpeg_bytes(seed=i), timeout=30).status_code
                        for i in range(20)]
            pending.join()
            assert statuses == [200] * 20  # predictions never wait for the store
            assert during[0].status_code == 503
            assert during[0].json()["type"] == "ServiceUnavailableException"
            deadline = time.monotonic() + 30
            while metric(server.metrics_url, "prediction_log_failures_total") < 1:
                assert time.monotonic() < deadline, "failed log writes were not counted"
                time.sleep(0.5)
        finally:
            holder.kill()
            holder.wait()
        # the store is back: logging and feedback work again
        pid = requests.post(predict, data=jpeg_bytes(seed=99), timeout=30
                            ).headers["X-Prediction-Id"]
        assert requests.post(f"{server.url}/feedback", json={"prediction_id": pid,
                             "label": "pizza"}, timeout=30).status_code == 200
    finally:
        server.stop(grace=10)
    with FeedbackStore(f"sqlite:///{db}") as store:
        confirmed = {c.prediction_id: c.label for c in store.confirmed("food")}
    assert all(confirmed.get(p) == "salad" for p in acknowledged)  # the 503 changed nothing
    assert confirmed[pid] == "pizza"
