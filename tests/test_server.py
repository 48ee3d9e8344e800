"""The ONNX Runtime server (python -m serving) over real HTTP on loopback ports."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPResponse
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import TINY_CLASSES, jpeg_bytes, make_onnx_version
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from serving import Predictor
from serving.launch import Launched, start_onnx_server

pytestmark = pytest.mark.integration


def run_server(models: list[str], log: Path, *extra: str) -> Launched:
    """``python -m serving`` on free loopback ports, ready (GET /ping); stops on context exit."""
    return start_onnx_server(models, log, extra_args=extra)


def scrape(server: Launched) -> dict[str, list]:
    """Samples by family name, parsed by prometheus-client's own parser."""
    text = requests.get(server.metrics_url, timeout=10).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def in_flight(server: Launched) -> float:
    return scrape(server)["onnx_server_requests_in_flight"][0].value


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> tuple[Path, Path]:
    """food v1 and v2 with different weights, each with model.onnx."""
    root = tmp_path_factory.mktemp("server_artifacts")
    return make_onnx_version(root, seed=0), make_onnx_version(root, seed=1)


@pytest.fixture(scope="module")
def predictors(versions) -> tuple[Predictor, Predictor]:
    return Predictor.load(versions[0]), Predictor.load(versions[1])


@pytest.fixture(scope="module")
def server(versions, tmp_path_factory):
    v1, v2 = versions
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with run_server([str(v1), str(v2.parent / "latest"), f"dessert={v1}"], log,
                    "--max-batch-size", "8", "--max-batch-delay-ms", "20",
                    "--max-body-mb", "0.25", "--max-pixels", "1000000") as s:
        yield s


def expected_json(predictor: Predictor, image: bytes, k: int | None = None) -> list[dict]:
    return [p.to_dict() for p in predictor.predict(image, k)]


def assert_client_error(response: requests.Response, status: int, server: Launched) -> dict:
    """A 4xx TorchServe-shaped JSON error, after which the server still answers /ping."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"code", "type", "message"} and body["code"] == status
    assert body["message"]
    assert requests.get(f"{server.url}/ping", timeout=10).json() == {"status": "Healthy"}
    return body


def test_raw_body_and_multipart_answer_like_the_predictor(server, predictors, sample_images):
    v1, v2 = predictors
    for path in sample_images[:4]:
        image = path.read_bytes()
        want = json.dumps(expected_json(v2, image))
        put = requests.put(f"{server.url}/predictions/food", data=image, timeout=30)  # curl -T
        assert put.status_code == 200 and put.headers["content-type"] == "application/json"
        assert put.text == want
        post = requests.post(f"{server.url}/predictions/food", data=image, timeout=30)
        assert post.text == want
        form = requests.post(f"{server.url}/predictions/food/1?topk=2",
                             files={"data": ("x.jpg", image, "image/jpeg")}, timeout=30)
        assert form.json() == expected_json(v1, image, 2)
        other_field = requests.post(f"{server.url}/predictions/food/v1",
                                    files={"file": ("x.jpg", image)}, timeout=30)
        assert other_field.json() == expected_json(v1, image)
        # TorchServe drops ?topk= before the handler: the header and form field work on both.
        header = requests.put(f"{server.url}/predictions/food", data=image,
                              headers={"X-TopK": "1"}, timeout=30)
        assert header.json() == expected_json(v2, image, 1)
        form_field = requests.post(f"{server.url}/predictions/food", data={"topk": "2"},
                                   files={"data": ("x.jpg", image)}, timeout=30)
        assert form_field.json() == expected_json(v2, image, 2)


def test_versions_and_models(server, predictors, versions):
    image = jpeg_bytes(70, 50, seed=3)
    v1, v2 = predictors
    assert expected_json(v1, image) != expected_json(v2, image)  # the versions differ
    assert requests.post(f"{server.url}/predictions/food/1", data=image).json() == \
        expected_json(v1, image)
    assert requests.post(f"{server.url}/predictions/food/2.0", data=image).json() == \
        expected_json(v2, image)
    assert requests.post(f"{server.url}/predictions/dessert", data=image).json() == \
        expected_json(v1, image)
    listed = requests.get(f"{server.url}/models").json()["models"]
    assert [m["modelName"] for m in listed] == ["dessert", "food"]
    [described] = requests.get(f"{server.url}/models/food").json()
    assert described["modelVersion"] == "2" and described["batchSize"] == 8
    assert described["maxBatchDelay"] == 20 and described["workers"][0]["status"] == "READY"
    every = requests.get(f"{server.url}/models/food/all").json()
    assert sorted(d["modelVersion"] for d in every) == ["1", "2"]


def png_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 100, 50)).save(buf, format="PNG")
    return buf.getvalue()


BAD_REQUESTS = {
    "non-image": ({"data": b"this is plain text, not a photo"}, 400, "InvalidImage"),
    "truncated": ({"data": jpeg_bytes(200, 150)[:300]}, 400, "InvalidImage"),
    "empty": ({"data": b""}, 400, "EmptyBody"),
    "oversized body": ({"data": os.urandom(300 * 1024)}, 413, "RequestEntityTooLarge"),
    "huge dimensions": ({"data": png_bytes(1200, 1000)}, 413, "ImageTooLarge"),
    "text in multipart": ({"files": {"data": ("x.jpg", b"hello")}}, 400, "InvalidImage"),
    "multipart without data": ({"files": {"a": ("a", jpeg_bytes()), "b": ("b", b"x")}}, 400,
                               "InvalidMultipart"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_and_the_server_keeps_serving(server, case):
    kwargs, status, kind = BAD_REQUESTS[case]
    response = requests.post(f"{server.url}/predictions/food", timeout=30, **kwargs)
    assert assert_client_error(response, status, server)["type"] == kind


def test_unknown_model_version_topk_and_route(server):
    image = jpeg_bytes()
    body = assert_client_error(requests.post(f"{server.url}/predictions/pasta", data=image),
                               404, server)
    assert "dessert" in body["message"] and "food" in body["message"]
    body = assert_client_error(requests.post(f"{server.url}/predictions/food/7", data=image),
                               404, server)
    assert "'1', '2'" in body["message"]
    for bad in ("0", "4", "two"):
        body = assert_client_error(
            requests.post(f"{server.url}/predictions/food?topk={bad}", data=image), 400, server)
        assert "allowed: 1..3" in body["message"]
    assert_client_error(requests.get(f"{server.url}/no/such/route"), 404, server)


def test_concurrent_clients_form_batches_and_get_their_own_answers(server, predictors):
    v2 = predictors[1]
    images = [jpeg_bytes(48 + 5 * i, 40 + 3 * i, seed=100 + i) for i in range(16)]
    expected = [expected_json(v2, image) for image in images]

    def batches_over_one() -> float:
        samples = scrape(server)["onnx_server_batch_size"]
        # 0 before the first batch of food v2 (a test run on its own)
        count = next((s.value for s in samples if s.name.endswith("_count")
                      and s.labels == {"model": "food", "version": "2"}), 0.0)
        ones = next((s.value for s in samples if s.name.endswith("_bucket")
                     and s.labels == {"model": "food", "version": "2", "le": "1.0"}), 0.0)
        return count - ones

    before = batches_over_one()
    with ThreadPoolExecutor(16) as pool:
        for _ in range(5):  # rounds until the scheduler lets requests overlap
            answers = list(pool.map(
                lambda img: requests.put(f"{server.url}/predictions/food", data=img,
                                         timeout=60), images))
            for answer, want in zip(answers, expected):
                assert answer.status_code == 200
                got = answer.json()
                assert [g["label"] for g in got] == [w["label"] for w in want]
                assert [g["probability"] for g in got] == pytest.approx(
                    [w["probability"] for w in want], abs=2e-6)
            if batches_over_one() > before:
                break
    assert batches_over_one() > before, "no batch of more than one image was formed"


def test_metrics_parse_and_count_by_model_version_and_code(server):
    requests.post(f"{server.url}/predictions/food/1", data=jpeg_bytes())
    requests.post(f"{server.url}/predictions/food/1", data=b"nope")
    families = scrape(server)
    codes = {(s.labels["model"], s.labels["version"], s.labels["code"]): s.value
             for s in families["onnx_server_requests"] if s.name.endswith("_total")}
    assert codes[("food", "1", "200")] >= 1 and codes[("food", "1", "400")] >= 1
    for name in ("onnx_server_request_latency_seconds", "onnx_server_queue_wait_seconds",
                 "onnx_server_preprocess_seconds", "onnx_server_inference_seconds",
                 "onnx_server_batch_size"):
        count = [s for s in families[name]
                 if s.name == f"{name}_count" and s.labels.get("version") == "1"]
        assert count and count[0].value >= 1, name
    assert "onnx_server_requests_in_flight" in families


def test_kserve_v2_with_tritonclient_bytes_and_fp32(server, predictors, sample_images):
    import tritonclient.http as httpclient

    v2 = predictors[1]
    images = [p.read_bytes() for p in sample_images[:3]]
    want = np.stack([[d["probability"] for d in sorted(expected_json(v2, i, 3),
                                                       key=lambda d: TINY_CLASSES.index(
                                                           d["label"]))] for i in images])
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("food")
        meta = client.get_model_metadata("food")
        assert {i["datatype"] for i in meta["inputs"]} == {"BYTES", "FP32"}

        encoded = httpclient.InferInput("image", [len(images)], "BYTES")
        encoded.set_data_from_numpy(np.array(images, dtype=np.object_))
        result = client.infer("food", [encoded])
        np.testing.assert_allclose(result.as_numpy("probabilities"), want, atol=2e-6)
        top1 = [expected_json(v2, i, 1)[0]["label"].encode() for i in images]
        assert list(result.as_numpy("label")) == top1

        batch = np.stack([v2.decode(i) for i in images])
        for binary in (True, False):
            tensor = httpclient.InferInput("input", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch, binary_data=binary)
            outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
            result = client.infer("food", [tensor], model_version="2", outputs=outputs)
            np.testing.assert_allclose(result.as_numpy("probabilities"), want, atol=2e-6)
    finally:
        client.close()


def test_kserve_v2_json_base64_and_bad_requests(server, predictors):
    v1 = predictors[0]
    image = jpeg_bytes(60, 60, seed=9)
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(image).decode()]}]}
    answer = requests.post(f"{server.url}/v2/models/food/versions/1/infer", json=body).json()
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["label"]["data"] == [expected_json(v1, image, 1)[0]["label"]]
    assert outputs["probabilities"]["shape"] == [1, 3]
    bad = [
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]},
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 8, 8],
                     "data": [0.0] * 192}]},
        {"inputs": [{"name": "input", "datatype": "INT8", "shape": [1], "data": [1]}]},
        {"inputs": []},
    ]
    for request in bad:
        response = requests.post(f"{server.url}/v2/models/food/infer", json=request)
        assert assert_client_error(response, 400, server)["error"]
    response = requests.post(f"{server.url}/v2/models/pasta/infer", json=body)
    assert_client_error(response, 404, server)


def send_partial(port: int, path: str, body: bytes, sent: int) -> socket.socket:
    """Start a request and send only part of its body, so it stays in flight."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    s.sendall(head + body[:sent])
    return s


def read_response(s: socket.socket) -> tuple[int, bytes]:
    response = HTTPResponse(s)
    response.begin()
    return response.status, response.read()


def wait_in_flight(server: Launched, n: int) -> None:
    deadline = time.monotonic() + 30
    while in_flight(server) < n:
        assert time.monotonic() < deadline, "request never became in-flight"
        time.sleep(0.05)


def test_full_queue_gets_503_and_slow_request_times_out(versions, tmp_path):
    with run_server([str(versions[0])], tmp_path / "server.log",
                    "--max-queue", "1", "--timeout-s", "2") as server:
        image = jpeg_bytes()
        # one queue slot per image, taken once the body is in: two images > max_queue=1
        two = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                           "data": [base64.b64encode(image).decode()] * 2}]}
        full = requests.post(f"{server.url}/v2/models/food/infer", json=two, timeout=10)
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert full.json()["type"] == "ServiceUnavailableException"
        slow = send_partial(server.port, "/predictions/food", image, 10)
        try:
            wait_in_flight(server, 1)
            ok = requests.post(f"{server.url}/predictions/food", data=image, timeout=10)
            assert ok.status_code == 200  # a slow upload holds no slot
            status, body = read_response(slow)  # its body never came: 408 at the timeout
            assert status == 408 and json.loads(body)["type"] == "RequestTimeout"
        finally:
            slow.close()


def test_sigterm_finishes_in_flight_requests(versions, predictors, tmp_path):
    with run_server([str(versions[0])], tmp_path / "server.log") as server:
        image = jpeg_bytes(90, 60, seed=5)
        pending = send_partial(server.port, "/predictions/food", image, 100)
        try:
            wait_in_flight(server, 1)
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert server.proc.poll() is None, "exited with a request in flight"
            pending.sendall(image[100:])
            status, body = read_response(pending)
        finally:
            pending.close()
        assert status == 200
        assert json.loads(body) == expected_json(predictors[0], image)
        # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit is by signal
        assert server.proc.wait(30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.log_path.read_text()


def test_cli_defaults_come_from_server_config():
    from serving.__main__ import build_parser
    from serving.http.config import ServerConfig

    args = build_parser().parse_args(["--model", "artifacts/food/latest"])
    config = ServerConfig()
    assert (args.host, args.port, args.metrics_port) == (config.host, config.port,
                                                          config.metrics_port)
    assert (args.max_batch_size, args.max_batch_delay_ms, args.max_queue) == (
        config.max_batch_size, config.max_batch_delay_ms, config.max_queue)
    assert int(args.max_body_mb * 2**20) == config.max_body_bytes
    assert args.timeout_s == config.request_timeout_s
    assert args.preprocess_threads == config.preprocess_threads


def test_server_modules_pull_in_no_torch():
    import subprocess
    import sys

    code = ("import sys, serving.__main__, serving.http.app\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
