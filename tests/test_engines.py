"""Engine variants: export validates them behind the agreement gate and records their
speed-up; the Predictor, the ONNX server and the TorchServe handler pick the fastest one
recorded (or the one asked for) and say which they run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serving import engines
from serving.artifacts import read_model
from serving.launch import http_get, start_onnx_server
from serving.predictor import Predictor
from tests.conftest import make_tiny_version
from training.export import export_version

REPO = Path(__file__).resolve().parents[1]
HAS_OPENVINO = engines.unavailable(engines.Variant("openvino", "int8")) is None


def with_predictions_csv(version_dir: Path, images: list[Path]) -> Path:
    """Give a tiny version a validation split (what export measures agreement on)."""
    rows = [f"{p},pizza,pizza,0.9" for p in images]
    (version_dir / "predictions.csv").write_text(
        "path,true_label,predicted_label,confidence\n" + "\n".join(rows) + "\n")
    return version_dir


@pytest.fixture(scope="module")
def variant_version(tmp_path_factory, sample_images) -> Path:
    """A tiny version exported with every variant, gate open (random weights tie a lot)."""
    version_dir = with_predictions_csv(
        make_tiny_version(tmp_path_factory.mktemp("variants")), sample_images)
    export_version(version_dir, min_agreement=0.0, calibration_images=sample_images,
                   variants=["all"])
    return version_dir


@pytest.fixture(autouse=True)
def keep_recorded_table(request):
    """Tests that rewrite the module's version's table give it back afterwards."""
    if "variant_version" not in request.fixturenames:
        yield
        return
    config_file = request.getfixturevalue("variant_version") / "model_config.json"
    saved = config_file.read_text()
    yield
    config_file.write_text(saved)


def fake_table(artifacts_dir: Path, passed: dict[str, float], export: str | None = None):
    """Rewrite a version's recorded variants: name -> speed-up."""
    config_file = artifacts_dir / "model_config.json"
    config = json.loads(config_file.read_text())
    config["variants"] = {"export": export or config["variants"]["export"],
                          "passed": {n: {"speedup": s, "agreement": 1.0}
                                     for n, s in passed.items()}}
    config_file.write_text(json.dumps(config))


def test_export_records_variants_tied_to_their_export(variant_version):
    config = json.loads((variant_version / "model_config.json").read_text())
    table = config["variants"]
    assert table["export"] == (variant_version / "export").readlink().name
    assert table["cpu"] == engines.cpu_model() and table["threads"] >= 1
    assert table["passed"]["onnxruntime-fp32"]["speedup"] == 1.0
    assert "onnxruntime-int8" in table["passed"]
    for name, entry in table["passed"].items():
        assert entry["images_per_s_batch8"] > 0 and entry["speedup"] > 0, name
        if name != "onnxruntime-fp32":
            assert 0.0 <= entry["agreement"] <= 1.0
    expected = {v.name for v in engines.VARIANTS if engines.unavailable(v) is None}
    assert set(table["passed"]) == expected
    assert set(table["skipped"]) == {v.name for v in engines.VARIANTS} - expected
    manifest = json.loads((variant_version / "export" / "export.json").read_text())
    assert manifest["variants"]["passed"].keys() == table["passed"].keys()


def test_variants_under_the_gate_are_refused_and_never_picked(tmp_path, sample_images):
    version_dir = with_predictions_csv(make_tiny_version(tmp_path), sample_images)
    export_version(version_dir, min_agreement=0.0, calibration_images=sample_images)
    # An agreement nothing can reach: every variant but the reference is refused.
    report = export_version(version_dir, min_agreement=1.01, calibration_images=sample_images,
                            variants=["openvino-bf16", "onnxruntime-int8"])
    table = json.loads((version_dir / "model_config.json").read_text())["variants"]
    assert set(table["passed"]) == {"onnxruntime-fp32"}
    assert not (version_dir / "model.int8.onnx").exists()  # int8 refused: not written
    assert "onnxruntime-int8" in table["skipped"]
    if HAS_OPENVINO:
        assert table["refused"]["openvino-bf16"]["agreement"] < 1.01
    assert report.variants == {k: v for k, v in table.items() if k != "export"}
    assert Predictor.load(version_dir).runtime == "onnxruntime-fp32"
    with pytest.raises(ValueError, match="not validated.*allowed for this model: "
                                         "onnxruntime-fp32"):
        Predictor.load(version_dir, engine="openvino", precision="bf16")


def test_auto_picks_the_fastest_recorded_and_runnable_variant(variant_version, monkeypatch):
    fake_table(variant_version, {"onnxruntime-fp32": 1.0, "onnxruntime-int8": 1.5,
                                 "openvino-bf16": 2.5})
    artifacts = read_model(variant_version)
    want = "openvino-bf16" if HAS_OPENVINO else "onnxruntime-int8"
    assert engines.choose(artifacts).name == want
    assert engines.choose(artifacts, engine="onnxruntime").name == "onnxruntime-int8"
    assert engines.choose(artifacts, precision="fp32").name == "onnxruntime-fp32"
    # A variant the machine cannot run is passed over, and refused when asked for.
    monkeypatch.setattr(engines, "unavailable",
                        lambda v: "no bf16 here" if v.precision == "bf16" else None)
    assert engines.choose(artifacts).name == "onnxruntime-int8"
    with pytest.raises(ValueError, match="no bf16 here"):
        engines.choose(artifacts, engine="openvino", precision="bf16")
    with pytest.raises(ValueError, match="--engine 'tensorrt'; allowed: auto, onnxruntime"):
        engines.choose(artifacts, engine="tensorrt")


def test_a_table_from_another_cpu_is_used_with_a_warning(variant_version, caplog):
    config_file = variant_version / "model_config.json"
    config = json.loads(config_file.read_text())
    config["variants"]["cpu"] = "Some Other CPU"
    config["variants"]["passed"]["onnxruntime-int8"]["speedup"] = 9.0
    config_file.write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="serving.engines"):
        assert engines.choose(read_model(variant_version)).name == "onnxruntime-int8"
    assert "measured on Some Other CPU" in caplog.text


def test_a_table_measured_on_another_export_is_ignored(variant_version):
    fake_table(variant_version, {"onnxruntime-int8": 3.0}, export=".export-0")
    assert engines.choose(read_model(variant_version)).name == "onnxruntime-fp32"
    fake_table(variant_version, {"onnxruntime-int8": 3.0},
               export=(variant_version / "export").readlink().name)
    assert engines.choose(read_model(variant_version)).name == "onnxruntime-int8"


@pytest.mark.parametrize("variant", [v.name for v in engines.VARIANTS[1:]])
def test_every_variant_answers_like_fp32_on_real_images(variant_version, sample_images,
                                                        variant):
    if engines.unavailable(engines.variant_named(variant)):
        pytest.skip(engines.unavailable(engines.variant_named(variant)))
    reference = Predictor.load(variant_version, engine="onnxruntime", precision="fp32")
    v = engines.variant_named(variant)
    other = Predictor.load(variant_version, engine=v.engine, precision=v.precision,
                           intra_op_threads=2, streams=2)
    assert other.runtime == variant and other.streams == 2
    x = np.stack([reference.decode(p) for p in sample_images])
    a, b = reference.infer(x), other.infer(x)
    assert b.shape == a.shape and b.dtype == np.float32
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9  # same model, lower precision


def test_server_runs_the_variant_and_says_so(variant_version, tmp_path):
    fake_table(variant_version, {"onnxruntime-fp32": 1.0, "onnxruntime-int8": 1.7},
               export=(variant_version / "export").readlink().name)
    with start_onnx_server([f"food={variant_version}"], tmp_path / "auto.log",
                           extra_args=["--streams", "2", "--threads", "2"]) as server:
        described = json.loads(http_get(f"{server.url}/models/food")[1])[0]
        assert described["runtime"] == "onnxruntime-int8"
        assert [w["id"] for w in described["workers"]] == ["onnxruntime-int8-0",
                                                            "onnxruntime-int8-1"]
        metrics = http_get(server.metrics_url)[1].decode()
        assert 'onnx_server_model_variant{model="food",variant="onnxruntime-int8",' \
               'version="1"} 1.0' in metrics
        v2 = json.loads(http_get(f"{server.url}/v2/models/food")[1])
        assert v2["platform"] == "onnxruntime_onnx"
    with start_onnx_server([f"food={variant_version}"], tmp_path / "fp32.log",
                           extra_args=["--engine", "onnxruntime", "--precision", "fp32",
                                       "--threads", "2"]) as server:
        described = json.loads(http_get(f"{server.url}/models/food")[1])[0]
        assert described["runtime"] == "onnxruntime-fp32"
        assert [w["threads"] for w in described["workers"]] == [2]  # one stream by default
    proc = subprocess.run([sys.executable, "-m", "serving", "--model", str(variant_version),
                           "--engine", "openvino", "--precision", "bf16"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "openvino-bf16 cannot be used" in proc.stderr
    assert "allowed for this model: onnxruntime-fp32, onnxruntime-int8" in proc.stderr


def test_handler_picks_the_variant_from_its_config(variant_version, sample_images):
    from types import SimpleNamespace

    from handlers.food_handler import FoodHandler

    fake_table(variant_version, {"onnxruntime-fp32": 1.0, "onnxruntime-int8": 1.7},
               export=(variant_version / "export").readlink().name)

    def context(handler_config: dict) -> SimpleNamespace:
        return SimpleNamespace(
            system_properties={"model_dir": str(variant_version)},
            manifest={"model": {"serializedFile": "model.onnx"}},
            model_yaml_config={"handler": handler_config})

    auto, pinned = FoodHandler(), FoodHandler()
    auto.initialize(context({}))
    pinned.initialize(context({"engine": "onnxruntime", "precision": "fp32"}))
    assert auto.predictor.runtime == "onnxruntime-int8"
    assert pinned.predictor.runtime == "onnxruntime-fp32"
