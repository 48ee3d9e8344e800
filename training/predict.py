"""Top-k predictions from a model version with eager PyTorch (the reference the exported
models and the servers are checked against)."""

from __future__ import annotations

from pathlib import Path

import torch

from serving.predictor import Predictor
from training.models import load_eager
from training.version import load_version


@torch.no_grad()
def predict_files(images: list[str], model_path: str | Path = "artifacts/food/latest",
                  k: int = 3) -> list[tuple[str, list[dict]]]:
    """``[(image, [{"label", "probability"}, ...]), ...]`` for each image file."""
    version = load_version(model_path)
    model = load_eager(version)
    # The servers' three stages, with eager PyTorch (model.pth) as the infer stage.
    predictor = Predictor(version, infer=lambda x: model(torch.from_numpy(x)).numpy(),
                          fmt="pytorch")
    k = max(1, min(k, len(version.labels)))
    return [(p, [pred.to_dict() for pred in answer])
            for p, answer in zip(images, predictor.predict_batch(images, k))]
