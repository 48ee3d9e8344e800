"""Model versions: ``artifacts/<model>/v<N>/``, written once and atomically.

A version is assembled in a hidden staging directory next to its final place and renamed
into ``v<N>`` in one step (``serving.atomic``), so a reader never sees half a version;
``latest`` is a relative symlink swapped atomically afterwards. Reading a version back is
``serving.artifacts.read_model``'s job; see DESIGN.md for the files a version holds.

Its exported model files (``training.export``) are published as one unit too
(:func:`write_export`): an ``.export-<n>/`` directory made current by swapping one link,
``export``, through which ``model.onnx``, ``model.ts`` and ``model.int8.onnx`` are links.
Writers of a model's versions, and of one version's export, take turns (``training.locks``)
and remove what a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from serving.artifacts import (
    DEFAULT_TOPK,
    EXPORT_LINK,
    MODEL_FILES,
    ModelArtifacts,
    labels_from_class_to_idx,
    read_model,
)

# write_json: re-exported only until every caller imports it from serving.atomic.
from serving.atomic import point_symlink, publish_dir, staging_dir, write_json  # noqa: F401
from serving.preprocess import PreprocessSpec
from training.crashpoints import crash_point
from training.locks import exclusive

# Files every complete version holds (export adds model.ts / model.onnx later).
CONTRACT_FILES = ("model.pth", "class_to_idx.json", "model_config.json", "evaluation.json",
                  "confusion_matrix.png", "training_curves.png", "predictions.csv")

_VERSION_RE = re.compile(r"^v(\d+)$")
EXPORT_PREFIX = ".export-"  # published export directories inside a version directory
EXPORT_MANIFEST = "export.json"  # in each: the files, their sha256, the parity checks

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


def write_export(version_dir: Path, fill: Callable[[Path], None]) -> Path:
    """Publish the files ``fill(stage)`` writes into a staging directory as the version's
    export, all at once; returns the published directory. Nothing is published if ``fill``
    raises. One export of a version runs at a time; a killed one's leftovers go here."""
    with exclusive(version_dir, "another export of this version"), \
            staging_dir(version_dir, "export") as stage:
        fill(stage)
        crash_point("export_staged")  # test hook (training/crashpoints.py)
        return _publish(version_dir, stage)


def _publish(version_dir: Path, stage: Path) -> Path:
    """Make a filled staging directory the version's current export in one step.

    The directory is published as ``.export-<n>`` (fsynced, renamed); ``model.onnx`` etc. in
    the version directory are made links through ``export/`` (dangling until the switch when
    new); then the one switch: ``export`` is pointed at the new directory. Links to files the
    new export lacks, and exports older than the previous one, are removed afterwards. A kill
    at any point leaves either the old or the new export current, never a mix.
    """
    current = version_dir / EXPORT_LINK
    if current.exists() and not current.is_symlink():
        raise FileExistsError(f"{current} is not a link to an export directory; move it away")
    previous = os.readlink(current) if current.is_symlink() else None
    name = f"{EXPORT_PREFIX}{time.time_ns()}"
    publish_dir(stage, version_dir / name)
    crash_point("export_published")
    exported = {p.name for p in (version_dir / name).iterdir()}
    for file in MODEL_FILES.values():
        link = version_dir / file
        target = f"{EXPORT_LINK}/{file}"
        if file in exported and not (link.is_symlink() and os.readlink(link) == target):
            point_symlink(link, target)  # a file of an older layout is replaced here
    point_symlink(current, name)  # the switch: every model file changes at once
    crash_point("export_switched")
    for file in MODEL_FILES.values():
        link = version_dir / file
        if file not in exported and (link.is_symlink() or link.is_file()):
            link.unlink()  # from an older export (an int8 model of other weights)
    for old in version_dir.glob(f"{EXPORT_PREFIX}*"):
        if old.name not in (name, previous):
            shutil.rmtree(old, ignore_errors=True)
    return version_dir / name


def load_version(path: str | Path) -> ModelVersion:
    """Read a version directory (``artifacts/food/v3`` or ``artifacts/food/latest``)."""
    return read_model(path)
