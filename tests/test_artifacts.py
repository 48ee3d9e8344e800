"""serving.artifacts: the one reader of a model, and the checks every loader relies on."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import TINY_CLASSES, TINY_CROP
from test_predictor import write_mar

from serving import Predictor
from serving.artifacts import DEFAULT_TOPK, read_model


def copy_version(version: Path, to: Path, **config_changes) -> Path:
    """A copy of ``version`` whose model_config.json has ``config_changes`` applied."""
    shutil.copytree(version, to)
    config = json.loads((to / "model_config.json").read_text())
    config.update(config_changes)
    (to / "model_config.json").write_text(json.dumps(config))
    return to


def test_version_dir_latest_and_mar_read_the_same_record(onnx_version, tmp_path):
    direct = read_model(onnx_version)
    latest = read_model(onnx_version.parent / "latest")
    archived = read_model(write_mar(onnx_version, tmp_path / "food.mar"))
    assert latest.path == direct.path == Path(os.path.realpath(onnx_version))
    for record in (direct, latest, archived):
        assert record.labels == TINY_CLASSES and record.num_classes == len(TINY_CLASSES)
        assert (record.name, record.version, record.arch) == ("food", "1", "mobilenet_v2")
        assert record.spec.crop_size == TINY_CROP and record.default_topk == 3
    assert direct.formats == ("onnx",) and archived.formats == ("onnx",)
    assert archived.model_bytes("onnx") == (onnx_version / "model.onnx").read_bytes()
    assert latest.source.endswith("latest")


def test_default_topk_falls_back_to_the_one_constant(onnx_version, tmp_path):
    config = json.loads((onnx_version / "model_config.json").read_text())
    del config["topk"]
    version = copy_version(onnx_version, tmp_path / "v1")
    (version / "model_config.json").write_text(json.dumps(config))
    assert read_model(version).default_topk == DEFAULT_TOPK
    assert read_model(copy_version(onnx_version, tmp_path / "v2", topk=2)).default_topk == 2


def test_labels_must_be_a_bijection_matching_num_classes(onnx_version, tmp_path):
    gap = copy_version(onnx_version, tmp_path / "gap")
    (gap / "class_to_idx.json").write_text(json.dumps({"pizza": 0, "salad": 2, "sushi": 3}))
    with pytest.raises(ValueError, match="0..C-1"):
        read_model(gap)
    wrong_count = copy_version(onnx_version, tmp_path / "count", num_classes=4)
    with pytest.raises(ValueError, match="3 labels but model_config.json says num_classes=4"):
        read_model(wrong_count)


def test_model_whose_input_does_not_fit_the_crop_is_refused(onnx_version, tmp_path):
    preprocessing = {**json.loads((onnx_version / "model_config.json").read_text())
                     ["preprocessing"], "crop_size": 48, "resize_size": 56}
    version = copy_version(onnx_version, tmp_path / "v1", preprocessing=preprocessing)
    with pytest.raises(ValueError, match=r"model\.onnx.*crop_size=48"):
        Predictor.load(version)


def test_model_whose_output_is_not_num_classes_is_refused(onnx_version, tmp_path):
    version = copy_version(onnx_version, tmp_path / "v1", num_classes=4)
    (version / "class_to_idx.json").write_text(
        json.dumps({c: i for i, c in enumerate([*TINY_CLASSES, "soup"])}))
    with pytest.raises(ValueError, match=r"model\.onnx: output has 3 classes.*num_classes=4"):
        Predictor.load(version)


def test_mlflow_uri_without_mlflow_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name.startswith("mlflow"):
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(ImportError, match="pip install mlflow-skinny"):
        read_model("models:/food-classifier@champion")
