"""A real TorchServe serving our .mar on free loopback ports: the Dockerfile's own CMD.

One server for the whole module, started in a temp directory laid out like the repo root
(serve_config/, model_store/food.mar) with a private TMPDIR (TorchServe's pid file lives
there, so stopping it can never touch another TorchServe) and private log directories.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import TINY_CLASSES, free_port, jpeg_bytes

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
    ports = [free_port() for _ in range(3)]
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TMPDIR": str(root / "tmp"), "LOG_LOCATION": str(root / "logs"),
        "METRICS_LOCATION": str(root / "logs"),
        "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{ports[0]}",
        "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{ports[1]}",
        "TS_METRICS_ADDRESS": f"http://127.0.0.1:{ports[2]}",
    }
    env.pop("TS_CONFIG_FILE", None)  # the Makefile exports it; the CMD names its own config
    cmd = dockerfile_json("CMD")
    assert cmd[:2] == ["torchserve", "--foreground"]
    with open(root / "launcher.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        base = env["TS_INFERENCE_ADDRESS"]
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"torchserve exited {proc.returncode}: "
                                f"{(root / 'launcher.log').read_text()[-3000:]}")
                try:
                    r = requests.put(f"{base}/predictions/food", data=jpeg_bytes(), timeout=10)
                    if r.status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"TorchServe not ready after {READY_TIMEOUT_S}s; logs in {root}")
                time.sleep(1)
            yield {"base": base, "metrics": env["TS_METRICS_ADDRESS"],
                   "management": env["TS_MANAGEMENT_ADDRESS"], "env": env, "root": root}
        finally:
            subprocess.run(["torchserve", "--stop"], cwd=root, env=env, timeout=90,
                           capture_output=True, check=False)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


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
