"""Top-k predictions from a model version with eager PyTorch (the reference the exported
models and the servers are checked against)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from serving.postprocess import softmax, topk
from serving.preprocess import preprocess_bytes
from training.models import build_model
from training.version import ModelVersion, load_version


def load_eager(version: ModelVersion) -> torch.nn.Module:
    """Rebuild a version's model from ``model.pth`` (weights only, no pickle), eval mode."""
    model = build_model(version.config["arch"], version.config["num_classes"], weights="none")
    state = torch.load(version.path / "model.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def predict_files(images: list[str], model_path: str | Path = "artifacts/food/latest",
                  k: int = 3) -> list[tuple[str, list[dict]]]:
    """``[(image, [{"label", "probability"}, ...]), ...]`` for each image file."""
    version = load_version(model_path)
    model = load_eager(version)
    k = max(1, min(k, len(version.labels)))
    batch = np.stack([preprocess_bytes(Path(p).read_bytes(), version.spec) for p in images])
    probs = softmax(model(torch.from_numpy(batch)).numpy())
    return [(p, topk(row, version.labels, k)) for p, row in zip(images, probs)]
