"""The benchmark's peer servers (PyTriton, LitServe) and the load generator's request bodies.

Each peer starts as a real process on loopback, answers a real JPEG with the in-process
Predictor's answer on the same model, and is stopped: port closed, process group gone. The
load generator's ``multipart`` and ``v2-binary`` bodies are driven against our own server.
No test asserts a latency.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import loadgen, peers
from serving import launch
from serving.predictor import Predictor


def _post(url: str, body: loadgen.Body, timeout: float = 60.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body.data, headers=body.headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


def _encode(image: bytes, kind: str) -> loadgen.Body:
    return asyncio.run(loadgen.encode_body(image, kind))


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((launch.HOST, port)) != 0


def _group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


def _assert_stopped(peer: peers.PeerServer) -> None:
    pgid = peer.launched.proc.pid  # spawned in its own session: leader pid == group id
    deadline = time.monotonic() + 15
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _group_alive(pgid) == []
    assert peer.launched.proc.poll() is not None
    assert _port_closed(peer.launched.port)


@pytest.fixture(scope="module")
def expected(onnx_version, sample_images) -> list[tuple[bytes, list[dict]]]:
    """(JPEG bytes, the in-process Predictor's top-k as dicts) for a few images."""
    predictor = Predictor.load(onnx_version, intra_op_threads=1)
    pairs = []
    for path in sample_images[:3]:
        data = path.read_bytes()
        pairs.append((data, [p.to_dict() for p in predictor.predict(data)]))
    labels = {answer[0]["label"] for _, answer in pairs}
    assert len(labels) > 1 or len(pairs) == 1, "the tiny model should tell images apart"
    return pairs


def _same_answer(got: list[dict], want: list[dict]) -> None:
    assert [p["label"] for p in got] == [p["label"] for p in want]
    assert np.allclose([p["probability"] for p in got], [p["probability"] for p in want],
                       atol=1e-6)


# ------------------------------------------------------------------ peers
@pytest.mark.integration
def test_litserve_answers_like_the_predictor_and_stops(onnx_version, expected, tmp_path):
    pytest.importorskip("litserve", reason="LitServe is in the bench extra")
    with peers.start_peer("litserve", onnx_version, threads=1, scratch=tmp_path) as peer:
        assert peer.body == "multipart" and peer.settings["max_batch_size"] == 8
        for image, want in expected:
            status, payload = _post(peer.url, _encode(image, peer.body))
            assert status == 200
            _same_answer(json.loads(payload), want)
    _assert_stopped(peer)


@pytest.fixture(scope="module")
def pytriton_ready() -> Path:
    """The PyTriton virtualenv (built once under benchmarks/scratch, minutes the first
    time), or a skip naming why it cannot be built here."""
    try:
        return peers.pytriton_python()
    except peers.PeerUnavailable as e:
        pytest.skip(f"PyTriton environment cannot be built offline here: {e}")


@pytest.mark.integration
@pytest.mark.slow
def test_pytriton_answers_like_the_predictor_and_stops(pytriton_ready, onnx_version, expected,
                                                        tmp_path):
    with peers.start_peer("pytriton", onnx_version, threads=1, scratch=tmp_path) as peer:
        assert peer.body == "v2-binary"
        for image, want in expected:
            status, payload = _post(peer.url, _encode(image, peer.body))
            assert status == 200
            (output,) = json.loads(payload)["outputs"]
            assert output["name"] == "predictions" and output["shape"] == [1, 1]
            _same_answer(json.loads(output["data"][0]), want)
    _assert_stopped(peer)


def test_start_peer_refuses_unknown_peers_and_options(onnx_version, tmp_path):
    with pytest.raises(ValueError, match="known: pytriton, litserve"), \
            peers.start_peer("bentoml", onnx_version, 1, tmp_path):
        pass
    with pytest.raises(ValueError, match="allowed"), \
            peers.start_peer("litserve", onnx_version, 1, tmp_path, batch_size=4):
        pass


@pytest.mark.integration
def test_a_peer_that_cannot_start_is_stopped_and_reported(tmp_path):
    pytest.importorskip("litserve", reason="LitServe is in the bench extra")
    with pytest.raises(RuntimeError, match="exited"), \
            peers.start_peer("litserve", tmp_path / "no-such-model", 1, tmp_path,
                             ready_timeout=60):
        pass


# ------------------------------------------------------------------ load generator bodies
@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=0, max_size=2048))
def test_v2_binary_body_is_tritons_wire_format(image):
    from tritonclient.utils import deserialize_bytes_tensor

    body = _encode(image, "v2-binary")
    length = int(body.headers[loadgen.V2_HEADER_LENGTH])
    header = json.loads(body.data[:length])
    (spec,) = header["inputs"]
    assert spec["name"] == "image" and spec["datatype"] == "BYTES" and spec["shape"] == [1, 1]
    tensor = body.data[length:]
    assert spec["parameters"]["binary_data_size"] == len(tensor)
    assert deserialize_bytes_tensor(tensor).tolist() == [image]


def test_raw_body_is_the_file_itself():
    body = _encode(b"\xff\xd8jpeg", "raw")
    assert body.data == b"\xff\xd8jpeg"
    assert body.headers == {"Content-Type": "application/octet-stream"}
    with pytest.raises(ValueError, match="allowed raw, multipart, v2-binary"):
        _encode(b"x", "base64")


def test_v2_answers_with_binary_outputs_count_as_json():
    head = json.dumps({"model_name": "food", "outputs": []}).encode()
    tail = struct.pack("<4f", 0.1, 0.2, 0.3, 0.4)
    split = {loadgen.V2_HEADER_LENGTH: str(len(head))}
    assert loadgen.json_answer(head + tail, split)
    assert not loadgen.json_answer(head + tail, {})
    assert not loadgen.json_answer(head + tail, {loadgen.V2_HEADER_LENGTH: "x"})


@pytest.fixture(scope="module")
def our_server(onnx_version, tmp_path_factory):
    log = tmp_path_factory.mktemp("peers-server") / "serving.log"
    with launch.start_onnx_server([f"food={onnx_version}"], log,
                                  extra_args=["--threads", "1", "--log-level", "warning"]) as s:
        yield s


@pytest.mark.integration
@pytest.mark.parametrize("body,path", [("raw", "/predictions/food"),
                                       ("multipart", "/predictions/food"),
                                       ("v2-binary", "/v2/models/food/infer")])
def test_each_body_drives_our_server_without_errors(our_server, sample_images, body, path):
    result = loadgen.run(our_server.url + path, sample_images[:3], "closed", concurrency=2,
                         duration=0.5, warmup=1, timeout=10, body=body)
    assert result["body"] == body
    assert result["ok"] > 0 and result["errors"] == 0


@pytest.mark.integration
def test_a_body_the_endpoint_does_not_read_is_counted_as_errors(our_server, sample_images):
    """A v2 request sent to the TorchServe endpoint is not an image: 4xx, never an answer."""
    result = loadgen.run(our_server.url + "/predictions/food", sample_images[:1], "closed",
                         concurrency=1, duration=0.3, warmup=0, timeout=10, body="v2-binary")
    assert result["sent"] > 0 and result["ok"] == 0
    assert set(result["error_kinds"]) == {"http_400"}


@pytest.mark.integration
def test_the_cli_takes_the_body(our_server, sample_images, tmp_path):
    out = tmp_path / "result.json"
    rc = loadgen.main(["--url", our_server.url + "/v2/models/food/infer", "--image",
                       str(sample_images[0]), "--body", "v2-binary", "--duration", "0.3",
                       "--warmup", "0", "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["body"] == "v2-binary" and result["ok"] > 0
    with pytest.raises(SystemExit) as refused:
        loadgen.main(["--url", our_server.url, "--image", str(sample_images[0]),
                      "--body", "grpc"])
    assert refused.value.code == 2


def test_a_pytriton_environment_that_cannot_be_built_is_reported_not_published(tmp_path,
                                                                               monkeypatch):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"{tmp_path / 'missing-0.0.0-py3-none-any.whl'}\n")
    monkeypatch.setattr(peers, "PYTRITON_REQUIREMENTS", requirements)
    with pytest.raises(peers.PeerUnavailable, match="cannot build the PyTriton environment"):
        peers.pytriton_python(tmp_path / "venvs")
    assert not (tmp_path / "venvs" / "pytriton").exists()
    assert list((tmp_path / "venvs").iterdir()) == []  # no half-built staging left behind
