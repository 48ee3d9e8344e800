"""``python -m training demo``: the whole chain on the sample data, end to end.

Generate the sample data, train, export, archive, start TorchServe exactly as the README does,
classify the example images, stop TorchServe, and print what came back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from training.archive import build_archive, tool
from training.export import export_version

MODEL = Path("artifacts/food/latest")
TS_CONFIG = "serve_config/config.properties"
INFERENCE = "http://127.0.0.1:8080"
READY_TIMEOUT_S = 180


def torchserve() -> str:
    return tool("torchserve")


def run(*args: str) -> None:
    """Run a ``python -m training`` step, echoing it; stop the demo if it fails."""
    cmd = [sys.executable, "-m", "training", *args]
    print("$", " ".join(["python", *cmd[1:]]), flush=True)
    subprocess.run(cmd, check=True)


def classify(path: Path, base: str = INFERENCE, timeout: float = 30) -> tuple[int, object]:
    """PUT one image to /predictions/food, like ``curl -T``; (status, parsed JSON)."""
    # urllib would label the body form-urlencoded, which TorchServe's frontend answers with
    # a 500 before any handler runs; say it is raw bytes, as curl -T does in effect.
    request = urllib.request.Request(f"{base}/predictions/food", data=path.read_bytes(),
                                     method="PUT",
                                     headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_ready(probe: Path, base: str = INFERENCE, timeout: float = READY_TIMEOUT_S) -> None:
    """Block until the model answers a prediction (workers loaded), or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if classify(probe, base, timeout=10)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"TorchServe did not answer within {timeout:.0f}s; see logs/")


def demo_cli(args) -> int:
    """Train on the sample, export, archive, serve with TorchServe, classify, stop."""
    if not Path("data/sample").is_dir():
        run("sample-data", "data/sample")
    run("train", "--config", "configs/sample.yaml")
    print(f"$ python -m training export --model {MODEL}", flush=True)
    for result in export_version(MODEL).parity:
        print(f"  {result}")
    print(f"$ python -m training archive --model {MODEL}", flush=True)
    print(f"  wrote {build_archive(MODEL)}")

    examples = sorted(p for p in Path("examples").glob("*") if p.suffix.lower()
                      in {".jpg", ".jpeg", ".png"})
    if not examples:
        print("no images in examples/ to classify", file=sys.stderr)
        return 1
    start = [torchserve(), "--start", "--ts-config", TS_CONFIG, "--models", "food=food.mar",
             "--ncs"]
    print("$ torchserve", " ".join(start[1:]), flush=True)
    subprocess.run(start, check=True)
    try:
        wait_ready(examples[0])
        for path in examples:
            status, answer = classify(path)
            print(f"$ curl -T {path} localhost:8080/predictions/food  -> {status}")
            print(f"  {json.dumps(answer)}")
    finally:
        print("$ torchserve --stop", flush=True)
        subprocess.run([torchserve(), "--stop"], check=False)
    return 0
