"""Logits to the answer both servers send: the top-k ``[{"label", "probability"}, ...]``.

numpy only, no project imports: the TorchServe .mar carries this file next to the handler.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of an (N, C) array, computed in float64 for stable probabilities."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def labels_from_class_to_idx(class_to_idx: dict[str, int]) -> list[str]:
    """``{"apple_pie": 0, ...}`` as the list of labels indexed by class id."""
    labels = sorted(class_to_idx, key=class_to_idx.__getitem__)
    if [class_to_idx[k] for k in labels] != list(range(len(labels))):
        raise ValueError("class_to_idx must map onto 0..C-1 exactly once each")
    return labels


def parse_topk(value: object, default: int, num_classes: int) -> int:
    """Validate a ``?topk=`` value; raises ValueError with what is allowed."""
    if value is None or value == "":
        return min(default, num_classes)
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    try:
        k = int(str(value).strip())
    except ValueError:
        raise ValueError(f"topk={value!r} is not an integer; allowed: 1..{num_classes}") from None
    if not 1 <= k <= num_classes:
        raise ValueError(f"topk={k} is out of range; allowed: 1..{num_classes}")
    return k


def topk(probabilities: np.ndarray, labels: list[str], k: int) -> list[dict]:
    """The k most probable labels of one (C,) probability row, highest first.

    Ties are broken by class index so every server returns the same order.
    """
    order = np.lexsort((np.arange(len(probabilities)), -probabilities))[:k]
    return [{"label": labels[i], "probability": float(round(probabilities[i], 6))}
            for i in order]
