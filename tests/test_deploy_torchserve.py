"""``python -m training deploy --torchserve``: a real TorchServe switches from v1 to v2 through
its management API while clients keep sending requests, and none of them fails; then
``retrain --deploy-torchserve`` trains, promotes and switches the same TorchServe.

Which version answered is read from the answer itself: the two tiny versions have different
random weights, so their probabilities for the test image differ by far more than the float
noise between batch sizes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import requests
from conftest import jpeg_bytes, make_onnx_version

from serving.launch import start_torchserve
from training.archive import build_archive
from training.cli import main as cli_main
from training.deploy import Management
from training.sample_data import CLASSES, generate

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

TOLERANCE = 1e-3  # two answers of one version differ by less (batching, float noise)


def _probabilities(answer: list[dict]) -> dict[str, float]:
    return {p["label"]: p["probability"] for p in answer}


def _distance(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory):
    """TorchServe serving v1 as ``food`` (from ``food.mar``, as ``make serve`` does), with
    its model API enabled; v2 exists as a version directory only."""
    root = tmp_path_factory.mktemp("deploy")
    v1 = make_onnx_version(root / "artifacts", seed=0)
    v2 = make_onnx_version(root / "artifacts", seed=1)
    assert (v1.name, v2.name) == ("v1", "v2")
    store = root / "model_store"
    build_archive(v1, "onnx", export_path=store)
    with start_torchserve(store, {"food": "food.mar"}, root / "ts",
                          config={"enable_model_api": "true"}) as ts:
        yield {"ts": ts, "v1": v1, "v2": v2, "store": store}


class Load:
    """Threads sending the same image to the default version until stopped."""

    def __init__(self, url: str, image: bytes, threads: int = 3) -> None:
        self.url, self.image = url, image
        self.answers: list[dict[str, float]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                try:
                    r = session.put(self.url, data=self.image, timeout=60)
                    ok = r.status_code == 200
                    result = _probabilities(r.json()) if ok else f"{r.status_code} {r.text}"
                except (requests.RequestException, ValueError) as e:
                    ok, result = False, f"{type(e).__name__}: {e}"
                with self._lock:
                    (self.answers if ok else self.failures).append(result)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)

    def count(self) -> int:
        with self._lock:
            return len(self.answers) + len(self.failures)


@contextlib.contextmanager
def steady_load(url: str, image: bytes) -> Iterator[Load]:
    load = Load(url, image)
    load.start()
    try:
        yield load
    finally:
        load.stop()


def _wait_for(load: Load, n: int, timeout: float = 60) -> None:
    start = load.count()
    deadline = time.monotonic() + timeout
    while load.count() < start + n and time.monotonic() < deadline:
        time.sleep(0.05)


def test_switch_under_load_has_zero_failures(torchserve):
    ts, v2 = torchserve["ts"], torchserve["v2"]
    image = jpeg_bytes(64, 48, seed=7)
    url = f"{ts.url}/predictions/food"
    ref1 = _probabilities(requests.put(f"{url}/1", data=image, timeout=30).json())

    with steady_load(url, image) as load:
        _wait_for(load, 20)  # steady traffic on v1 first
        code = cli_main(["deploy", "--torchserve", ts.management_url, "--model", str(v2),
                         "--model-store", str(torchserve["store"]), "--inference", ts.url])
        _wait_for(load, 20)  # and on v2 after the switch
    assert code == 0

    management = Management(ts.management_url)
    assert [str(v["modelVersion"]) for v in management.versions("food")] == ["2"]
    assert management.default_version("food") == "2"
    ref2 = _probabilities(requests.put(url, data=image, timeout=30).json())
    assert _distance(ref1, ref2) > 10 * TOLERANCE, "the two versions must answer differently"

    assert load.failures == [], load.failures[:5]
    seen = {"1": 0, "2": 0}
    for answer in load.answers:
        d1, d2 = _distance(answer, ref1), _distance(answer, ref2)
        assert min(d1, d2) < TOLERANCE, f"an answer from neither version: {answer}"
        seen["1" if d1 < d2 else "2"] += 1
    assert seen["1"] > 0 and seen["2"] > 0
    # every v1 answer came before every v2 answer would need per-request timestamps; the
    # counts above are what the report quotes
    log.warning("switch under load: %d requests, %d failures, answers per version %s",
                len(load.answers) + len(load.failures), len(load.failures), seen)
    assert (torchserve["store"] / "food.v2.mar").is_file()


def test_deploying_the_serving_version_again_changes_nothing(torchserve, capsys):
    ts = torchserve["ts"]
    code = cli_main(["deploy", "--torchserve", ts.management_url, "--model",
                     str(torchserve["v2"]), "--model-store", str(torchserve["store"])])
    assert code == 0
    assert "replaced nothing" in capsys.readouterr().out
    assert [str(v["modelVersion"]) for v in Management(ts.management_url).versions("food")] \
        == ["2"]


def test_a_model_store_torchserve_does_not_read_is_refused_and_v2_keeps_serving(
        torchserve, tmp_path, capsys):
    ts = torchserve["ts"]
    v3 = make_onnx_version(Path(torchserve["v1"]).parents[1], seed=2)
    for store in (tmp_path / "missing", tmp_path):  # not a directory; not TorchServe's
        code = cli_main(["deploy", "--torchserve", ts.management_url, "--model", str(v3),
                         "--model-store", str(store)])
        err = capsys.readouterr().err
        assert code == 1 and "--model-store" in err, err
    management = Management(ts.management_url)
    assert [str(v["modelVersion"]) for v in management.versions("food")] == ["2"]
    assert requests.put(f"{ts.url}/predictions/food", data=jpeg_bytes(), timeout=30) \
        .status_code == 200


def test_retrain_promotes_and_switches_torchserve(torchserve, tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    monkeypatch.chdir(tmp_path)
    try:
        generate(tmp_path / "sample", examples_dir=tmp_path / "examples", per_class=6, seed=1)
        ts = torchserve["ts"]
        overrides = {"data_dir": tmp_path / "sample", "resize_size": 36, "crop_size": 32,
                     "epochs": 1, "batch_size": 8, "workers": 0, "weights": "none",
                     "freeze": "none", "checkpoint_dir": tmp_path / "checkpoints",
                     "artifacts_dir": Path(torchserve["v1"]).parents[1]}
        code = cli_main(["retrain", "--config", str(Path(__file__).parents[1] /
                                                    "configs/sample.yaml"),
                         "--deploy-torchserve", ts.management_url,
                         "--model-store", str(torchserve["store"]), "--inference", ts.url,
                         *(f"--{k.replace('_', '-')}={v}" for k, v in overrides.items())])
        summary = json.loads(capsys.readouterr().out)
    finally:
        mlflow.set_tracking_uri(None)
    assert code == 0 and summary["promoted"] and summary["deployed"], summary
    new = Path(summary["version_dir"]).name[1:]
    assert [str(v["modelVersion"]) for v in Management(ts.management_url).versions("food")] \
        == [new]
    answer = requests.put(f"{ts.url}/predictions/food", data=jpeg_bytes(), timeout=30).json()
    assert {p["label"] for p in answer} <= set(CLASSES)
