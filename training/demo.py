"""``python -m training demo``: the whole chain on the sample data, end to end.

Generate the sample data, train, export, archive, start TorchServe on free loopback ports
(``serving.launch``, so a server already on 8080 does not get in the way), classify the
example images, stop TorchServe, and print what came back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from serving.launch import start_torchserve
from training.archive import build_archive
from training.export import export_version

MODEL = Path("artifacts/food/latest")
WORKDIR = Path("logs/demo")  # TorchServe's config, logs and pid file for this run
READY_TIMEOUT_S = 180


def run(*args: str) -> None:
    """Run a ``python -m training`` step, echoing it; stop the demo if it fails."""
    cmd = [sys.executable, "-m", "training", *args]
    print("$", " ".join(["python", *cmd[1:]]), flush=True)
    subprocess.run(cmd, check=True)


def classify(path: Path, base: str, timeout: float = 30) -> tuple[int, object]:
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


def demo_cli(args) -> int:
    """Train on the sample, export, archive, serve with TorchServe, classify, stop."""
    if not Path("data/sample").is_dir():
        run("sample-data", "data/sample")
    run("train", "--config", "configs/sample.yaml")
    print(f"$ python -m training export --model {MODEL}", flush=True)
    for result in export_version(MODEL).parity:
        print(f"  {result}")
    print(f"$ python -m training archive --model {MODEL}", flush=True)
    mar = build_archive(MODEL)
    print(f"  wrote {mar}")

    examples = sorted(p for p in Path("examples").glob("*") if p.suffix.lower()
                      in {".jpg", ".jpeg", ".png"})
    if not examples:
        print("no images in examples/ to classify", file=sys.stderr)
        return 1
    print(f"$ torchserve --start --models food={mar.name} --ncs  (free loopback ports, "
          f"config and logs in {WORKDIR}/)", flush=True)
    with start_torchserve(mar.parent, {"food": mar.name}, WORKDIR,
                          ready_timeout=READY_TIMEOUT_S) as server:
        for path in examples:
            status, answer = classify(path, server.url)
            print(f"$ curl -T {path} {server.url}/predictions/food  -> {status}")
            print(f"  {json.dumps(answer)}")
        print("$ torchserve --stop", flush=True)
    return 0
