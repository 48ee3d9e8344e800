"""Top-k predictions from a model version with eager PyTorch (the reference the exported
models and the servers are checked against)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
    # The servers' decode and encode stages; eager PyTorch stands in for their infer stage.
    stages = Predictor(version, session=None)
    k = max(1, min(k, len(version.labels)))
    batch = np.stack([stages.decode(p) for p in images])
    logits = model(torch.from_numpy(batch)).numpy()
    return [(p, [pred.to_dict() for pred in stages.encode(row, k)])
            for p, row in zip(images, logits)]
