"""serving.Predictor: loads a version dir, a .mar or an MLflow URI, answers like the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CLASSES, jpeg_bytes
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from serving import Prediction, Predictor
from serving.preprocess import InputError

ROOT = Path(__file__).resolve().parents[1]


def write_mar(version: Path, path: Path, with_onnx: bool = True) -> Path:
    """A .mar-shaped zip as torch-model-archiver lays it out for --format onnx."""
    class_to_idx = json.loads((version / "class_to_idx.json").read_text())
    with zipfile.ZipFile(path, "w") as z:
        if with_onnx:
            z.write(version / "model.onnx", "model.onnx")
        else:
            z.writestr("model.ts", b"not really torchscript")
        z.writestr("index_to_name.json",
                   json.dumps({str(i): label for label, i in class_to_idx.items()}))
        z.write(version / "model_config.json", "model_config.json")
        z.write(ROOT / "serving" / "preprocess.py", "preprocess.py")
        z.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "food"}}))
    return path


@pytest.fixture(scope="module")
def predictor(onnx_version) -> Predictor:
    return Predictor.load(onnx_version)


def test_predict_returns_typed_topk_from_bytes_path_and_pil(predictor, sample_images):
    path = sample_images[0]
    from_path = predictor.predict(path)
    assert all(isinstance(p, Prediction) for p in from_path)
    assert predictor.predict(path.read_bytes()) == from_path
    assert predictor.predict(str(path)) == from_path
    assert predictor.predict(Image.open(path).convert("RGB")) == from_path
    probs = [p.probability for p in from_path]
    assert probs == sorted(probs, reverse=True)
    assert sorted(p.label for p in from_path) == TINY_CLASSES
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_predictions_match_the_torch_model(onnx_version, predictor, sample_images):
    import torch

    from serving.predictor import softmax
    from training.models import build_model

    model = build_model("mobilenet_v2", len(TINY_CLASSES), weights="none")
    model.load_state_dict(torch.load(onnx_version / "model.pth", weights_only=True))
    model.eval()
    batch = np.stack([predictor.decode(p) for p in sample_images])
    with torch.no_grad():
        expected = softmax(model(torch.from_numpy(batch)).numpy())
    for row, path in zip(expected, sample_images):
        got = {p.label: p.probability for p in predictor.predict(path)}
        for i, label in enumerate(TINY_CLASSES):
            assert got[label] == pytest.approx(row[i], abs=2e-5)


def test_predict_batch_runs_one_batch_with_each_images_answer(predictor, sample_images):
    singles = [predictor.predict(p) for p in sample_images]
    assert predictor.predict_batch(sample_images) == singles
    assert len({tuple(p.probability for p in s) for s in singles}) > 1  # answers differ
    assert predictor.predict_batch([]) == []


@settings(max_examples=10, deadline=None)
@given(k=st.integers(1, len(TINY_CLASSES)), seed=st.integers(0, 50))
def test_topk_is_a_prefix_of_the_full_ranking(predictor, k, seed):
    data = jpeg_bytes(40 + seed, 30 + seed, seed=seed)
    full = predictor.predict(data, topk=len(TINY_CLASSES))
    assert predictor.predict(data, topk=k) == full[:k]


def test_bad_topk_and_bad_images_are_refused(predictor):
    with pytest.raises(ValueError, match="allowed: 1..3"):
        predictor.predict(jpeg_bytes(), topk=0)
    with pytest.raises(InputError) as e:
        predictor.predict(b"definitely not an image")
    assert e.value.status == 400
    with pytest.raises(InputError):
        predictor.predict(jpeg_bytes()[:200])


def test_latest_symlink_and_mar_give_the_same_answers(onnx_version, predictor, sample_images,
                                                      tmp_path):
    from_latest = Predictor.load(onnx_version.parent / "latest")
    from_mar = Predictor.load(write_mar(onnx_version, tmp_path / "food.mar"))
    expected = predictor.predict_batch(sample_images)
    assert from_latest.predict_batch(sample_images) == expected
    assert from_mar.predict_batch(sample_images) == expected
    assert from_mar.labels == TINY_CLASSES
    assert list(tmp_path.iterdir()) == [tmp_path / "food.mar"]  # nothing extracted beside it


def test_torchscript_mar_and_missing_files_are_refused_clearly(onnx_version, tmp_path):
    with pytest.raises(ValueError, match="TorchScript"):
        Predictor.load(write_mar(onnx_version, tmp_path / "ts.mar", with_onnx=False))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Predictor.load(tmp_path / "nowhere")
    no_onnx = tmp_path / "v9"
    no_onnx.mkdir()
    for name in ("class_to_idx.json", "model_config.json"):
        (no_onnx / name).write_bytes((onnx_version / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="export"):
        Predictor.load(no_onnx)


def test_session_options_are_chosen(onnx_version):
    p = Predictor.load(onnx_version, intra_op_threads=1, allow_spinning=False)
    assert p.runtime == "onnxruntime-fp32"
    options = p.engine.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert str(options.graph_optimization_level).endswith("ORT_ENABLE_ALL")


def test_mlflow_models_uri(onnx_version, predictor, sample_images, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("serving-test")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(onnx_version), artifact_path="version")
    client = mlflow.MlflowClient()
    client.create_registered_model("food-classifier")
    mv = client.create_model_version("food-classifier",
                                     source=f"{run.info.artifact_uri}/version",
                                     run_id=run.info.run_id)
    client.set_registered_model_alias("food-classifier", "champion", mv.version)
    from_registry = Predictor.load("models:/food-classifier@champion")
    assert from_registry.predict_batch(sample_images) == predictor.predict_batch(sample_images)


def test_import_and_prediction_pull_in_no_torch(onnx_version, sample_images):
    code = (
        "import sys, serving\n"
        "assert 'onnxruntime' not in sys.modules, 'import serving must stay light'\n"
        "from serving import Predictor\n"
        f"p = Predictor.load({str(onnx_version)!r})\n"
        f"print(p.predict({str(sample_images[0])!r})[0].label)\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')\n"
        "             or m.startswith('torchvision'))\n"
        "assert not bad, bad\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in TINY_CLASSES


def test_jpeg_draft_is_opt_in_and_checked(onnx_version):
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = (rng.random((1200, 1600, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    big = buf.getvalue()
    full = Predictor.load(onnx_version)
    draft = Predictor.load(onnx_version, draft_factor=2)
    assert full.draft_factor is None  # off unless asked for
    a, b = full.decode(big), draft.decode(big)
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    assert not np.array_equal(a, b)  # decoded at a reduced scale
    with pytest.raises(ValueError, match="draft_factor"):
        Predictor.load(onnx_version, draft_factor=0)
