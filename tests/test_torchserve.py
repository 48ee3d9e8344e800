"""A real TorchServe serving our .mar on free loopback ports: the Dockerfile's own CMD.

One server for the whole module, started in a temp directory laid out like the repo root
(serve_config/, model_store/food.mar) with a private TMPDIR and TEMP (TorchServe's pid file
and its workers' sockets live there, so it can never meet another TorchServe) and private log
directories.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import TINY_CLASSES

from serving.launch import (
    Launched,
    child_env,
    free_port,
    spawn,
    start_torchserve,
    wait_ready,
    workers_ready,
)
from training.archive import build_archive
from training.export import export_version

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 180

pytestmark = pytest.mark.integration


def dockerfile_json(instruction: str) -> list[str]:
    """The exec-form (JSON) arguments of the Dockerfile's CMD or HEALTHCHECK ... CMD."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith(instruction))
    return json.loads(re.search(r"CMD\s+(\[.*\])", line).group(1))


@pytest.fixture(scope="module")
def server(tiny_version, sample_images, tmp_path_factory):
    if shutil.which("java") is None:
        pytest.fail("TorchServe needs Java 17 (apt-get install openjdk-17-jre-headless)")
    if not (tiny_version / "model.onnx").exists():
        export_version(tiny_version, images=sample_images)
    root = tmp_path_factory.mktemp("torchserve")
    (root / "serve_config").mkdir()
    shutil.copy(REPO / "serve_config" / "config.properties", root / "serve_config")
    shutil.copy(REPO / "serve_config" / "healthcheck.py", root / "serve_config")
    build_archive(tiny_version, "onnx", export_path=root / "model_store")
    (root / "tmp").mkdir()
    inference, management, metrics = (f"http://127.0.0.1:{free_port()}" for _ in range(3))
    env = child_env({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TMPDIR": str(root / "tmp"), "TEMP": str(root / "tmp"),
        "LOG_LOCATION": str(root / "logs"), "METRICS_LOCATION": str(root / "logs"),
        "TS_INFERENCE_ADDRESS": inference, "TS_MANAGEMENT_ADDRESS": management,
        "TS_METRICS_ADDRESS": metrics,
        "TS_CONFIG_FILE": None,  # the Makefile exports it; the CMD names its own config
    })
    cmd = dockerfile_json("CMD")
    assert cmd[:2] == ["torchserve", "--foreground"]
    log = root / "launcher.log"
    with Launched(spawn(cmd, log, env=env, cwd=root), inference, f"{metrics}/metrics",
                  management, log) as launched:
        wait_ready(f"{management}/models/food", launched.proc, READY_TIMEOUT_S, log,
                   accept=workers_ready)
        yield {"base": inference, "metrics": metrics, "management": management, "env": env,
               "root": root}


def test_healthcheck_command_passes(server):
    cmd = dockerfile_json("HEALTHCHECK")
    result = subprocess.run([sys.executable if cmd[0] == "python" else cmd[0], *cmd[1:]],
                            cwd=server["root"], env=server["env"], timeout=30, check=False)
    assert result.returncode == 0


def test_classifies_an_image(server, sample_images):
    r = requests.put(f"{server['base']}/predictions/food", data=sample_images[0].read_bytes(),
                     timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    top = r.json()
    assert [t["label"] for t in top] and {t["label"] for t in top} == set(TINY_CLASSES)
    probs = [t["probability"] for t in top]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-4)


def test_multipart_and_topk(server, sample_images):
    img = sample_images[1].read_bytes()
    r = requests.post(f"{server['base']}/predictions/food", files={"data": img},
                      data={"topk": "1"}, timeout=30)
    assert r.status_code == 200 and len(r.json()) == 1
    r = requests.put(f"{server['base']}/predictions/food", data=img,
                     headers={"X-TopK": "2"}, timeout=30)
    assert r.status_code == 200 and len(r.json()) == 2


def bad_inputs(sample_images) -> dict[str, tuple[bytes, int]]:
    import io

    from PIL import Image

    good = sample_images[0].read_bytes()
    bomb = io.BytesIO()
    Image.new("1", (8000, 7000)).save(bomb, format="PNG")
    buf = io.BytesIO()
    Image.new("F", (10, 10)).save(buf, format="TIFF")
    return {"not an image": (b"hello, not a JPEG", 400), "truncated": (good[:200], 400),
            "empty": (b"", 400), "bomb": (bomb.getvalue(), 413),
            "float mode": (buf.getvalue(), 415)}


def test_bad_inputs_get_4xx_with_a_message_and_server_keeps_serving(server, sample_images):
    for name, (body, status) in bad_inputs(sample_images).items():
        r = requests.put(f"{server['base']}/predictions/food", data=body, timeout=30)
        assert r.status_code == status, (name, r.status_code, r.text)
        error = r.json()
        assert error["code"] == status and error["message"] and error["type"], name
    r = requests.put(f"{server['base']}/predictions/food?topk=2",
                     data=sample_images[2].read_bytes(), timeout=30)
    assert r.status_code == 200
    assert requests.get(f"{server['base']}/ping", timeout=10).json()["status"] == "Healthy"


def test_concurrent_mixed_requests_each_get_their_own_answer(server, sample_images):
    from concurrent.futures import ThreadPoolExecutor

    bodies = [(p.read_bytes(), 200) for p in sample_images[:4]]
    bodies += [(b"junk", 400), (sample_images[0].read_bytes()[:100], 400)]

    def send(item):
        return requests.put(f"{server['base']}/predictions/food", data=item[0],
                            timeout=60).status_code

    with ThreadPoolExecutor(len(bodies)) as pool:
        statuses = list(pool.map(send, bodies))
    assert statuses == [s for _, s in bodies]


def test_models_and_metrics(server):
    described = requests.get(f"{server['management']}/models/food", timeout=10).json()[0]
    assert described["modelVersion"] == "1" and described["batchSize"] == 8
    text = requests.get(f"{server['metrics']}/metrics", timeout=10).text
    assert "# TYPE" in text and 'model_name="food"' in text


@pytest.mark.parametrize("token_auth", [False, True], ids=["default", "token-auth"])
def test_launcher_serves_the_mar_on_free_ports_and_stops_it(server, sample_images, tmp_path,
                                                            token_auth):
    config = {"disable_token_authorization": "false"} if token_auth else None
    image = sample_images[0].read_bytes()
    with start_torchserve(server["root"] / "model_store", {"food": "food.mar"},
                          tmp_path / "ts", config=config) as ts:
        assert ts.url != server["base"] and ts.management_url != server["management"]
        headers = {}
        if token_auth:
            keys = json.loads((tmp_path / "ts" / "key_file.json").read_text())
            refused = requests.put(f"{ts.url}/predictions/food", data=image, timeout=30)
            assert refused.status_code in (400, 401), refused.text
            headers = {"Authorization": f"Bearer {keys['inference']['key']}"}
        r = requests.put(f"{ts.url}/predictions/food", data=image, headers=headers, timeout=30)
        assert r.status_code == 200 and {t["label"] for t in r.json()} == set(TINY_CLASSES)
    assert ts.proc.poll() is not None
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{ts.url}/ping", timeout=5)
