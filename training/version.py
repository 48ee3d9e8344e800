"""Model versions: ``artifacts/<model>/v<N>/``, written once and atomically.

A version is assembled in a hidden staging directory next to its final place and renamed
into ``v<N>`` in one step (``serving.atomic``), so a reader never sees half a version;
``latest`` is a relative symlink swapped atomically afterwards. Reading a version back is
``serving.artifacts.read_model``'s job; see DESIGN.md for the files a version holds.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from pathlib import Path

from serving.artifacts import DEFAULT_TOPK, ModelArtifacts, labels_from_class_to_idx, read_model

# write_json: re-exported only until every caller imports it from serving.atomic.
from serving.atomic import point_symlink, publish_dir, staging_dir, write_json  # noqa: F401
from serving.preprocess import PreprocessSpec
from training.locks import exclusive

# Files every complete version holds (export adds model.ts / model.onnx later).
CONTRACT_FILES = ("model.pth", "class_to_idx.json", "model_config.json", "evaluation.json",
                  "confusion_matrix.png", "training_curves.png", "predictions.csv")

_VERSION_RE = re.compile(r"^v(\d+)$")

# A version read back: path, config, class_to_idx, labels, spec, name, version, ...
ModelVersion = ModelArtifacts


def make_model_config(name: str, version: int, arch: str, class_to_idx: dict[str, int],
                      spec: PreprocessSpec, topk: int = DEFAULT_TOPK, **extra: object) -> dict:
    """The ``model_config.json`` contract: what every downstream stage reads.

    ``extra`` carries the descriptive fields (created, dataset, weights, metrics,
    mlflow_run_id, git_commit, skipped_files, ...).
    """
    labels_from_class_to_idx(class_to_idx)  # refuse a mapping that is not a bijection
    return {"name": name, "version": int(version), "arch": arch,
            "num_classes": len(class_to_idx), "preprocessing": spec.to_dict(),
            "topk": int(topk), **extra}


def existing_versions(model_root: Path) -> list[int]:
    """The version numbers present under ``artifacts/<model>/``, ascending."""
    if not model_root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in model_root.iterdir()
                  if (m := _VERSION_RE.match(p.name)) and p.is_dir())


def create_version(model_root: Path, write: Callable[[Path, int], None]) -> Path:
    """Create the next ``v<N>`` under ``model_root`` by calling ``write(tmp_dir, N)``.

    ``write`` fills a staging directory; only if it returns is the directory renamed into
    place and ``latest`` pointed at it. Writers of one model take turns (``exclusive``); one
    that took N first makes us take N+1.
    """
    model_root = Path(model_root)
    # One version writer per model at a time; a killed one's staging dir is removed here.
    with exclusive(model_root, "another version writer"), staging_dir(model_root, "version") as tmp:
        while True:
            number = (existing_versions(model_root) or [0])[-1] + 1
            write(tmp, number)
            final = model_root / f"v{number}"
            try:
                publish_dir(tmp, final)  # atomic; fails if final exists and is non-empty
                break
            except OSError:
                if not final.exists():
                    raise
        point_symlink(model_root / "latest", final.name)
    return final


def find_run_version(model_root: Path, run_id: str | None) -> Path | None:
    """The version a training run (``training_run_id`` in model_config.json) already wrote,
    if any: how a resumed run knows it must not write a second one."""
    if not run_id:
        return None
    for number in reversed(existing_versions(Path(model_root))):
        config_file = Path(model_root) / f"v{number}" / "model_config.json"
        with contextlib.suppress(OSError, ValueError):
            if json.loads(config_file.read_text()).get("training_run_id") == run_id:
                return config_file.parent
    return None


def load_version(path: str | Path) -> ModelVersion:
    """Read a version directory (``artifacts/food/v3`` or ``artifacts/food/latest``)."""
    return read_model(path)
