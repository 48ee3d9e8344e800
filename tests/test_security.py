"""Write access on the ONNX server: the token beyond loopback, the Host header on loopback,
the feedback rate limit, no paths on the inference port, and images sent in a form's text
field (``curl -F 'data=<pizza.jpg'``). Real servers on loopback unless noted."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from conftest import jpeg_bytes
from fastapi.testclient import TestClient

from serving import Predictor
from serving.__main__ import main as serving_main
from serving.feedback import FeedbackStore
from serving.http import security
from serving.http.app import create_app
from serving.http.config import ServerConfig
from serving.http.security import SecuritySettings, TokenBuckets
from serving.http.torchserve_api import text_field_bytes
from serving.launch import start_onnx_server
from training.feedback_data import load_feedback

TOKEN = "s3cret-token-for-tests-0123456789"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(onnx_version, tmp_path_factory):
    work = tmp_path_factory.mktemp("secure")
    token_file = work / "token"
    token_file.write_text(TOKEN + "\n")
    with start_onnx_server([str(onnx_version)], work / "server.log", extra_args=[
            "--token-file", str(token_file), "--feedback-db", f"sqlite:///{work}/fb.db",
            "--feedback-burst", "1000", "--management-port", "0"]) as launched:
        yield launched


def predict_id(server) -> str:
    answer = requests.post(f"{server.url}/predictions/food", data=jpeg_bytes(), timeout=30)
    assert answer.status_code == 200
    return answer.headers["X-Prediction-Id"]


def test_feedback_needs_the_token_and_predictions_do_not(server):
    pid = predict_id(server)
    body = {"prediction_id": pid, "label": "pizza"}
    url = f"{server.url}/feedback"
    missing = requests.post(url, json=body, timeout=10)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    assert missing.json()["type"] == "Unauthorized" and "Bearer" in missing.json()["message"]
    wrong = "x" * len(TOKEN)
    for header in (f"Bearer {wrong}", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x"):
        refused = requests.post(url, json=body, headers={"Authorization": header}, timeout=10)
        assert refused.status_code == 401, header
    ok = requests.post(url, json={**body, "source": "app"},
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert ok.status_code == 200 and ok.json()["label"] == "pizza"
    with FeedbackStore(f"sqlite:///{server.log_path.parent}/fb.db") as store:
        [confirmed] = [c for c in store.confirmed("food") if c.prediction_id == pid]
    assert confirmed.source == "app@127.0.0.1"  # the client's address is kept with it


def test_host_header_must_be_loopback(server):
    port = server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert requests.get(f"{server.url}/ping", headers={"Host": host},
                            timeout=10).status_code == 200, host
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
        refused = requests.post(f"{server.url}/predictions/food", data=jpeg_bytes(),
                                headers={"Host": host}, timeout=10)
        assert refused.status_code == 403, host
        assert refused.json()["type"] == "ForbiddenException"


def test_inference_port_shows_no_paths(server, onnx_version):
    for route in ("/models", "/models/food", "/models/food/all"):
        text = requests.get(f"{server.url}{route}", timeout=10).text
        assert str(onnx_version.parent) not in text and "/tmp" not in text, route
    listed = requests.get(f"{server.url}/models", timeout=10).json()["models"]
    assert listed == [{"modelName": "food", "modelUrl": onnx_version.name}]


def test_image_in_a_form_text_field_answers_like_a_file(server, sample_images):
    """curl -F 'data=<file' sends the file as a text field: bytes that are not UTF-8."""
    if shutil.which("curl") is None:
        pytest.fail("curl is needed to send a form field the way curl sends it")
    image = sample_images[2]
    answers = []
    for form in (f"data=<{image}", f"data=@{image}"):
        out = subprocess.run(["curl", "-sS", "-F", form, f"{server.url}/predictions/food"],
                             capture_output=True, text=True, check=True, timeout=30)
        answers.append(json.loads(out.stdout))
    raw = requests.post(f"{server.url}/predictions/food", data=image.read_bytes(), timeout=30)
    assert answers[0] == answers[1] == raw.json()
    big = jpeg_bytes(1600, 1200, seed=3, quality=98)  # over starlette's 1 MB field default
    assert len(big) > 1024 * 1024
    field = requests.post(f"{server.url}/predictions/food", files={"data": (None, big)},
                          timeout=30)
    assert field.status_code == 200, field.text


def test_text_field_bytes_are_the_bytes_sent():
    boundary = "b0undary"
    for data in (jpeg_bytes(), b"plain ascii", "pizza \u00e9".encode(), bytes(range(256)),
                 b"\x89PNG\r\n\x1a\n" + bytes(range(200))):
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"topk\"\r\n\r\n2\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\n"
                ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
        got = text_field_bytes(f"multipart/form-data; boundary={boundary}", body, "data")
        assert got == data


def test_feedback_is_rate_limited_per_client(onnx_version, tmp_path):
    with start_onnx_server([str(onnx_version)], tmp_path / "server.log", extra_args=[
            "--feedback-db", f"sqlite:///{tmp_path}/fb.db", "--feedback-rate", "0.5",
            "--feedback-burst", "3", "--management-port", "0"]) as server:
        body = {"prediction_id": "0" * 32, "label": "pizza"}
        statuses = [requests.post(f"{server.url}/feedback", json=body, timeout=10)
                    for _ in range(5)]
        assert [r.status_code for r in statuses] == [404, 404, 404, 429, 429]
        limited = statuses[-1]
        assert limited.json()["type"] == "TooManyRequests"
        assert int(limited.headers["Retry-After"]) >= 1
        # predictions are not limited
        for _ in range(5):
            assert requests.post(f"{server.url}/predictions/food", data=jpeg_bytes(),
                                 timeout=30).status_code == 200
        time.sleep(2.1)  # one token back at 0.5/s
        assert requests.post(f"{server.url}/feedback", json=body,
                             timeout=10).status_code == 404


def test_token_buckets_refill_at_the_rate_and_forget_old_clients():
    buckets = TokenBuckets(rate=2.0, burst=2, max_clients=2)
    assert [buckets.take("a", now=0.0) for _ in range(3)] == [0, 0, pytest.approx(0.5)]
    assert buckets.take("a", now=0.5) == 0  # one token back after 1/rate
    buckets.take("b", now=0.5)
    buckets.take("c", now=0.5)  # "a" is the least recently used: dropped, starts full
    assert list(buckets._buckets) == ["b", "c"]


def test_a_server_beyond_loopback_refuses_to_start_without_a_token(onnx_version, capsys,
                                                                   monkeypatch):
    monkeypatch.delenv(security.TOKEN_ENV, raising=False)
    args = ["--model", str(onnx_version), "--port", "0", "--metrics-port", "0",
            "--management-port", "0", "--feedback-db", "sqlite://"]
    assert serving_main([*args, "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--token-file" in err and "beyond loopback" in err
    monkeypatch.setenv(security.TOKEN_ENV, "short")
    assert serving_main([*args, "--host", "0.0.0.0"]) == 2
    assert "at least 16" in capsys.readouterr().err


def test_token_is_compared_in_constant_time_beyond_loopback(onnx_version, monkeypatch):
    """In process (nothing listens): a non-loopback server checks no Host, compares the
    token with hmac.compare_digest."""
    calls = []
    real = security.hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest",
                        lambda a, b: calls.append((a, b)) or real(a, b))
    config = ServerConfig(host="0.0.0.0", metrics_port=None,
                          security=SecuritySettings(token=TOKEN))
    app = create_app([Predictor.load(onnx_version)], config)
    with TestClient(app, base_url="http://food.example.com") as client:
        assert client.get("/ping").status_code == 200  # any Host beyond loopback
        body = {"prediction_id": "0" * 32, "label": "pizza"}
        assert client.post("/feedback", json=body).status_code == 401
        assert client.post("/feedback", json=body,
                           headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
    assert calls and all(isinstance(a, bytes) for a, _ in calls)



def test_retrain_caps_what_one_source_contributes(tmp_path):
    url = f"sqlite:///{tmp_path}/fb.db"
    with FeedbackStore(url, tmp_path / "images") as store:
        ids = {}
        for i in range(12):
            source = "app@10.0.0.66" if i < 9 else f"app@10.0.0.{i}"
            pid = store.log_prediction("food", "1", [{"label": "pizza", "probability": 0.9}],
                                       jpeg_bytes(seed=i), labels=["pizza", "salad"])
            ids[pid] = source
        store.flush()
        for pid, source in ids.items():
            store.add_feedback(pid, "salad", source=source)
    capped = load_feedback(url, "food", ["pizza", "salad"], seed=0, eval_fraction=0.0,
                           max_per_source=2)
    assert len(capped.train) == 2 + 3  # two of the flooding client's nine, three others
    assert capped.skipped["over_source_cap"] == 7
    uncapped = load_feedback(url, "food", ["pizza", "salad"], seed=0, eval_fraction=0.0)
    assert len(uncapped.train) == 12


def test_docker_image_exposes_only_inference_with_token_auth_on():
    """The root Dockerfile: only 8080 published and bound beyond loopback, management and
    metrics on the container's loopback, TorchServe's token authorization on."""
    import re

    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    env = dict(re.findall(r"(TS_[A-Z_]+)=(\S+)", text))
    assert env["TS_INFERENCE_ADDRESS"] == "http://0.0.0.0:8080"
    assert env["TS_MANAGEMENT_ADDRESS"].startswith("http://127.0.0.1:")
    assert env["TS_METRICS_ADDRESS"].startswith("http://127.0.0.1:")
    assert env["TS_DISABLE_TOKEN_AUTHORIZATION"] == "false"
    assert re.findall(r"^EXPOSE (.*)$", text, re.MULTILINE) == ["8080"]
    run_lines = [line for line in text.splitlines() if "docker run" in line]
    assert run_lines and all(re.findall(r"-p (\S+)", line) == ["8080:8080"]
                             for line in run_lines)
