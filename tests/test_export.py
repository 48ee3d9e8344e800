"""Export: TorchScript + ONNX parity with eager PyTorch, dynamic batch, refusal, int8, MLflow."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tiny_version

from training import export
from training.export import ExportError, export_version, load_images
from training.models import load_eager
from training.version import load_version


@pytest.fixture(scope="module")
def exported(tiny_version, sample_images):
    """The session's tiny version, exported once (other test files reuse the files)."""
    report = export_version(tiny_version, images=sample_images)
    return tiny_version, report


def test_parity_both_formats_both_batch_sizes(exported):
    _, report = exported
    seen = {(r.runtime, r.batch_size) for r in report.parity}
    assert seen == {("torchscript", 1), ("torchscript", 8), ("onnxruntime", 1),
                    ("onnxruntime", 8)}
    for result in report.parity:
        print(result)
        assert result.ok and result.top1_mismatches == 0 and result.num_images == 8


def test_onnx_contract_single_file_named_io_dynamic_batch(exported, sample_images):
    version_dir, _ = exported
    path = version_dir / "model.onnx"
    assert not list(version_dir.glob("*.onnx.data")) and not list(version_dir.glob(".*tmp*"))
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch
    version = load_version(version_dir)
    x = load_images(sample_images, version.spec)
    eager = load_eager(version)
    for n in (1, 3, 8):
        got = export.run_onnx(path, x[:n], n)
        with torch.inference_mode():
            want = eager(torch.from_numpy(x[:n])).numpy()
        assert got.shape == (n, 3)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_torchscript_loads_without_pickle(exported, sample_images):
    version_dir, _ = exported
    module = torch.jit.load(str(version_dir / "model.ts"), map_location="cpu")
    x = load_images(sample_images[:2], load_version(version_dir).spec)
    assert module(torch.from_numpy(x)).shape == (2, 3)


def test_compare_flags_a_top1_flip_and_a_tolerance_break():
    ref = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], np.float32)
    assert export.compare("x", 1, ref, ref.copy()).ok
    near = ref + 5e-5
    assert export.compare("x", 1, ref, near).ok
    far = ref.copy()
    far[0, 1] += 0.01
    result = export.compare("x", 1, ref, far)
    assert not result.ok and result.top1_mismatches == 0
    flipped = ref.copy()
    flipped[0] = [0.0, 1.0, 0.0]
    assert export.compare("x", 1, ref, flipped).top1_mismatches == 1


def test_broken_parity_refuses_and_writes_nothing(tmp_path, sample_images, monkeypatch):
    version_dir = make_tiny_version(tmp_path)
    real_trace = export.export_torchscript

    def perturbed(model, example, path):
        """Export a model whose weights were changed after the eager reference."""
        broken = load_eager(load_version(version_dir))
        with torch.no_grad():
            broken.classifier[-1].bias += 1.0
        real_trace(broken, example, path)

    monkeypatch.setattr(export, "export_torchscript", perturbed)
    with pytest.raises(ExportError, match="parity check failed") as info:
        export_version(version_dir, images=sample_images)
    assert "torchscript batch 1" in str(info.value) and "FAILED" in str(info.value)
    leftovers = sorted(p.name for p in version_dir.iterdir())
    assert leftovers == ["class_to_idx.json", "model.pth", "model_config.json"]


def test_cli_exit_1_with_numbers_when_refused(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise ExportError("parity check failed: onnxruntime batch 8: max|diff| 0.5")

    monkeypatch.setattr(export, "export_version", refuse)
    args = type("Args", (), {"model": str(tmp_path), "quantize": None, "min_agreement": 0.98,
                             "variants": None})
    assert export.export_cli(args) == 1
    assert "max|diff| 0.5" in capsys.readouterr().err


def test_int8_written_when_agreeing_and_refused_when_not(tmp_path, sample_images):
    version_dir = make_tiny_version(tmp_path)
    report = export_version(version_dir, images=sample_images, quantize="int8",
                            min_agreement=0.0, calibration_images=sample_images)
    q = report.quantization
    assert 0.0 <= q["agreement"] <= 1.0 and q["calibration_images"] == 8
    int8 = onnx.load(str(version_dir / "model.int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)  # QDQ format
    (version_dir / "model.int8.onnx").unlink()
    with pytest.raises(ExportError, match="min-agreement"):
        export.quantize_int8(version_dir / "model.onnx", version_dir / "model.int8.onnx",
                             load_images(sample_images, load_version(version_dir).spec),
                             load_images(sample_images, load_version(version_dir).spec),
                             None, min_agreement=1.01)
    assert not (version_dir / "model.int8.onnx").exists()
    assert not list(version_dir.glob(".tmp-*"))  # no temp file left (.export-* is the export)


def test_validation_images_come_from_predictions_csv(tmp_path, sample_images):
    version_dir = make_tiny_version(tmp_path)
    lines = ["path,true_label,pred_label,confidence"]
    lines += [f"{p},pizza,pizza,0.9" for p in sample_images[:3]]
    lines.append("/does/not/exist.jpg,salad,salad,0.5")
    (version_dir / "predictions.csv").write_text("\n".join(lines) + "\n")
    found = export.validation_images(load_version(version_dir))
    assert found == [(Path(p), "pizza") for p in sample_images[:3]]


def test_mlflow_logging_into_the_version_run(tmp_path, sample_images, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("export-test")
    with mlflow.start_run() as run:
        pass
    version_dir = make_tiny_version(tmp_path)
    config_path = version_dir / "model_config.json"
    config = load_version(version_dir).config | {"mlflow_run_id": run.info.run_id}
    from serving.atomic import write_json

    write_json(config_path, config)
    export_version(version_dir, images=sample_images[:2])
    client = mlflow.MlflowClient()
    names = {a.path for a in client.list_artifacts(run.info.run_id, "version")}
    assert {"version/model.onnx", "version/model.ts"} <= names
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         output_format="list")
    assert any(m.name == "onnx" and m.source_run_id == run.info.run_id for m in logged)
    shutil.rmtree(version_dir)


def test_cli_export_prints_results_not_third_party_info(tmp_path, sample_images):
    """The ONNX exporter's libraries log hundreds of INFO lines; the CLI shows ours only."""
    version_dir = make_tiny_version(tmp_path)
    rows = [f"{p},pizza,pizza,0.9" for p in sample_images]
    (version_dir / "predictions.csv").write_text(
        "path,true_label,predicted_label,confidence\n" + "\n".join(rows) + "\n")
    proc = subprocess.run([sys.executable, "-m", "training", "export", "--model",
                           str(version_dir)], capture_output=True, text=True,
                          check=False, cwd=Path(__file__).resolve().parents[1])
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join(lines[-20:])
    assert any(line.startswith("onnxruntime batch 8") for line in lines)
    noisy = [line for line in lines if "onnx_ir" in line or "onnxscript" in line]
    assert not noisy, f"{len(noisy)} third-party lines, e.g. {noisy[0]}"
    info = [line for line in lines if " INFO " in line and " INFO training." not in line]
    assert not info, info[:3]
