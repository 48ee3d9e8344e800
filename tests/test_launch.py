"""serving.launch: free ports, environments, readiness and stopping a whole process group.

Starting the real servers through it is covered where they are used: test_server.py and
test_benchmarks.py (our server), test_torchserve.py (TorchServe).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from serving.launch import (
    RESERVED_PORTS,
    child_env,
    free_port,
    spawn,
    start_onnx_server,
    stop_process,
    wait_ready,
)


def test_free_port_is_bindable_and_never_reserved():
    ports = {free_port() for _ in range(20)}
    assert not ports & RESERVED_PORTS
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))


def test_child_env_sets_and_removes_without_touching_the_base():
    base = {"KEEP": "1", "DROP": "2"}
    assert child_env({"DROP": None, "NEW": "3", "ABSENT": None}, base) == {"KEEP": "1",
                                                                          "NEW": "3"}
    assert base == {"KEEP": "1", "DROP": "2"}
    assert child_env()["PATH"] == os.environ["PATH"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_not_ready_in_time_names_the_url_and_stop_reaches_the_children(tmp_path):
    log = tmp_path / "child.log"
    # the leader prints its child's pid, then both sleep; SIGTERM must reach the child too
    script = ("import subprocess, time\n"
              "child = subprocess.Popen(['sleep', '60'])\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(60)\n")
    proc = spawn([sys.executable, "-c", script], log)
    try:
        url = f"http://127.0.0.1:{free_port()}/ping"
        with pytest.raises(RuntimeError, match="not ready") as e:
            wait_ready(url, proc, timeout=1.5, log_path=log)
        assert url in str(e.value)
        child = int(log.read_text().split()[0])  # written long before the 1.5 s are up
        assert _alive(child)
    finally:
        code = stop_process(proc, grace=5)
    assert code is not None
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)  # reaped by init once its parent is gone
    assert not _alive(child)


def test_process_that_dies_first_is_reported_with_its_log(tmp_path):
    log = tmp_path / "dies.log"
    proc = spawn([sys.executable, "-c", "import sys; print('it broke'); sys.exit(3)"], log)
    with pytest.raises(RuntimeError, match=r"exited with 3[\s\S]*it broke"):
        wait_ready(f"http://127.0.0.1:{free_port()}/ping", proc, timeout=30, log_path=log)


@pytest.mark.integration
def test_onnx_server_answers_on_its_ports_and_stops(onnx_version, tmp_path):
    import requests

    with start_onnx_server([f"food={onnx_version}"], tmp_path / "server.log",
                           extra_args=["--max-batch-size", "2"]) as server:
        assert requests.get(f"{server.url}/ping", timeout=10).json() == {"status": "Healthy"}
        assert f":{server.port}" in server.url
        assert server.management_url and server.management_url != server.url
        assert requests.get(f"{server.management_url}/models", timeout=10).status_code == 200
        assert "# TYPE" in requests.get(server.metrics_url, timeout=10).text
    assert server.proc.poll() is not None
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/ping", timeout=5)


@pytest.mark.integration
def test_onnx_server_that_cannot_start_is_not_left_running(tmp_path):
    with pytest.raises(RuntimeError, match="does not exist"):
        start_onnx_server([str(tmp_path / "missing")], tmp_path / "server.log")
    assert not subprocess.run(["pgrep", "-f", str(tmp_path / "missing")],
                              capture_output=True, check=False).stdout
