"""Model versions: ``artifacts/<model>/v<N>/``, written once and atomically.

A version is assembled in a hidden temp directory next to its final place and renamed into
``v<N>`` in one step, so a reader never sees half a version; ``latest`` is a relative symlink
swapped atomically afterwards. See DESIGN.md for the files a version holds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serving.postprocess import labels_from_class_to_idx
from serving.preprocess import PreprocessSpec

# Files every complete version holds (export adds model.ts / model.onnx later).
CONTRACT_FILES = ("model.pth", "class_to_idx.json", "model_config.json", "evaluation.json",
                  "confusion_matrix.png", "training_curves.png", "predictions.csv")

_VERSION_RE = re.compile(r"^v(\d+)$")


@dataclass(frozen=True)
class ModelVersion:
    """A version directory read back: where it is and what it says about itself."""

    path: Path
    config: dict
    class_to_idx: dict[str, int]

    @property
    def name(self) -> str:
        return self.config["name"]

    @property
    def version(self) -> int:
        return int(self.config["version"])

    @property
    def labels(self) -> list[str]:
        return labels_from_class_to_idx(self.class_to_idx)

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.config["preprocessing"])


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically (temp file in the same directory, then rename), mode 0644."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; servers may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: object) -> None:
    """Write JSON atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def make_model_config(name: str, version: int, arch: str, class_to_idx: dict[str, int],
                      spec: PreprocessSpec, topk: int = 3, **extra: object) -> dict:
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

    ``write`` fills a temp directory; only if it returns is the directory renamed into place
    and ``latest`` pointed at it. A concurrent writer that took N first makes us take N+1.
    """
    model_root = Path(model_root)
    model_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=model_root, prefix=".incomplete-"))
    os.chmod(tmp, 0o755)
    try:
        while True:
            number = (existing_versions(model_root) or [0])[-1] + 1
            write(tmp, number)
            final = model_root / f"v{number}"
            try:
                os.rename(tmp, final)  # atomic; fails if final exists and is non-empty
                break
            except OSError:
                if not final.exists():
                    raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    point_latest(model_root, final.name)
    return final


def point_latest(model_root: Path, target: str) -> None:
    """Atomically make ``model_root/latest`` a relative symlink to ``target``."""
    link = model_root / "latest"
    tmp_link = model_root / f".latest.{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    os.symlink(target, tmp_link)
    os.replace(tmp_link, link)


def load_version(path: str | Path) -> ModelVersion:
    """Read a version directory (``artifacts/food/v3`` or ``artifacts/food/latest``)."""
    path = Path(path)
    config_file = path / "model_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a model version (no model_config.json); train one with "
            f"`make train` or point --model at artifacts/<model>/v<N>")
    config = json.loads(config_file.read_text())
    class_to_idx = json.loads((path / "class_to_idx.json").read_text())
    return ModelVersion(path.resolve(), config, class_to_idx)
