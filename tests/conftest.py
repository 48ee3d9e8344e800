"""Shared fixtures: tiny model versions and images, so every stage tests in seconds."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.launch import free_port  # noqa: F401  (re-exported: tests import it from here)

TINY_CLASSES = ["pizza", "salad", "sushi"]
TINY_RESIZE, TINY_CROP = 40, 32


def jpeg_bytes(width: int = 64, height: int = 48, seed: int = 0, quality: int = 90) -> bytes:
    """A random-but-deterministic JPEG with some structure (gradient + noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(1, width - 1), y * 255 / max(1, height - 1),
                     np.full_like(x, rng.integers(0, 255), dtype=float)], axis=-1)
    arr = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> list[Path]:
    """A handful of JPEG files of varied sizes and aspect ratios."""
    root = tmp_path_factory.mktemp("images")
    sizes = [(64, 48), (48, 64), (100, 75), (33, 40), (80, 80), (120, 90), (50, 70), (70, 50)]
    paths = []
    for i, (w, h) in enumerate(sizes):
        p = root / f"img{i}.jpg"
        p.write_bytes(jpeg_bytes(w, h, seed=i))
        paths.append(p)
    return paths


def make_tiny_version(root: Path, name: str = "food", arch: str = "mobilenet_v2",
                      seed: int = 0) -> Path:
    """Write a complete-enough model version (weights, classes, config) with random weights.

    It holds what export, archive and serving read: model.pth, class_to_idx.json and
    model_config.json, at a 32-pixel crop so everything downstream runs in seconds.
    """
    import torch

    from serving.atomic import write_json
    from serving.preprocess import PreprocessSpec
    from training.models import build_model
    from training.version import create_version, make_model_config

    torch.manual_seed(seed)
    class_to_idx = {c: i for i, c in enumerate(TINY_CLASSES)}
    model = build_model(arch, len(class_to_idx), weights="none")
    spec = PreprocessSpec(resize_size=TINY_RESIZE, crop_size=TINY_CROP)

    def write(tmp: Path, number: int) -> None:
        torch.save(model.state_dict(), tmp / "model.pth")
        write_json(tmp / "class_to_idx.json", class_to_idx)
        write_json(tmp / "model_config.json",
                   make_model_config(name, number, arch, class_to_idx, spec, topk=3,
                                     weights="none", metrics={"val_acc": 0.0}))

    return create_version(Path(root) / name, write)


@pytest.fixture(scope="session")
def tiny_version(tmp_path_factory) -> Path:
    """One tiny mobilenet_v2 version under a temp ``artifacts/food/v1``."""
    return make_tiny_version(tmp_path_factory.mktemp("artifacts"))


def make_onnx_version(root: Path, name: str = "food", seed: int = 0) -> Path:
    """A tiny version whose answers depend on the image, with ``model.onnx`` exported.

    A freshly initialised mobilenet_v2 answers every image alike (its BatchNorm statistics
    are the defaults); running a few random batches through it in train mode sets them, so
    tests can tell one image's answer from another's. model.pth is rewritten to match. The
    ONNX export is a local stand-in for ``python -m training export`` (dynamic batch, input
    "input", output "logits", one self-contained file) so serving tests need no other stage.
    """
    import json

    import torch

    from training.models import build_model, calibrate_batchnorm

    version_dir = make_tiny_version(root, name=name, seed=seed)
    config = json.loads((version_dir / "model_config.json").read_text())
    model = build_model(config["arch"], config["num_classes"], weights="none")
    model.load_state_dict(torch.load(version_dir / "model.pth", weights_only=True))
    crop = config["preprocessing"]["crop_size"]
    gen = torch.Generator().manual_seed(seed)
    calibrate_batchnorm(model, (torch.randn(16, 3, crop, crop, generator=gen) for _ in range(4)))
    torch.save(model.state_dict(), version_dir / "model.pth")
    torch.onnx.export(model, torch.randn(2, 3, crop, crop), str(version_dir / "model.onnx"),
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    return version_dir


@pytest.fixture(scope="session")
def onnx_version(tmp_path_factory) -> Path:
    """A tiny version under its own temp ``artifacts/food/v1`` with ``model.onnx``."""
    return make_onnx_version(tmp_path_factory.mktemp("onnx_artifacts"))
