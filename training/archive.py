"""Package a model version into a self-contained TorchServe archive, ``model_store/<name>.mar``.

The .mar holds everything a TorchServe host needs and nothing from this repository has to be
installed there: the handler, the serialized model (ONNX or TorchScript), ``index_to_name.json``
(from ``class_to_idx.json``), ``model_config.json`` (preprocessing spec, default top-k), the
shared ``preprocess.py``/``postprocess.py`` as top-level modules, and ``model-config.yaml``
(batching, workers, timeout, top-k). It is built by ``torch-model-archiver`` in a temp
directory and renamed into place, so a running TorchServe never sees half a file.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

import serving.postprocess
import serving.preprocess
from training.version import ModelVersion, load_version, write_json

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
HANDLER = REPO / "handlers" / "food_handler.py"
MODEL_CONFIG_YAML = REPO / "serve_config" / "model-config.yaml"
# ONNX Runtime answered faster than TorchScript at batch 1 and 8 on the sample crop (see
# the archive report in README); both formats are built and tested.
DEFAULT_FORMAT = "onnx"
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}


class ArchiveError(RuntimeError):
    """The archive cannot be built from what the version holds."""


def index_to_name(version: ModelVersion) -> dict[str, str]:
    """TorchServe's label file: ``{"0": "apple_pie", ...}``."""
    return {str(i): label for i, label in enumerate(version.labels)}


def serving_yaml(version: ModelVersion, base: Path = MODEL_CONFIG_YAML) -> dict:
    """The .mar's ``model-config.yaml``: ``base`` with ``handler.topk`` defaulting to the
    version's ``topk``."""
    config = yaml.safe_load(base.read_text()) or {}
    handler = config.setdefault("handler", {}) or {}
    config["handler"] = handler
    handler.setdefault("topk", int(version.config.get("topk", 5)))
    return config


def tool(name: str) -> str:
    """A console script (``torch-model-archiver``, ``torchserve``) next to this Python, else on
    PATH, so the commands work from ``.venv`` without activating it."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise ArchiveError(f"{name} not found: pip install -e '.[torchserve]'")
    return found


def model_archiver() -> str:
    return tool("torch-model-archiver")


def build_archive(model_dir: str | Path, fmt: str = DEFAULT_FORMAT, name: str | None = None,
                  export_path: str | Path = "model_store",
                  config_yaml: Path = MODEL_CONFIG_YAML) -> Path:
    """Build ``<export_path>/<name>.mar`` from a version directory; returns its path."""
    if fmt not in MODEL_FILES:
        raise ArchiveError(f"--format {fmt!r}: allowed {', '.join(MODEL_FILES)}")
    version = load_version(model_dir)
    model_file = version.path / MODEL_FILES[fmt]
    if not model_file.is_file():
        raise ArchiveError(f"{model_file} does not exist: run `python -m training export "
                           f"--model {model_dir}` first (make archive does)")
    name = name or version.name
    export_path = Path(export_path)
    export_path.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(dir=export_path, prefix=".archive-") as tmp:
        stage = Path(tmp)
        write_json(stage / "index_to_name.json", index_to_name(version))
        shutil.copyfile(version.path / "model_config.json", stage / "model_config.json")
        shutil.copyfile(serving.preprocess.__file__, stage / "preprocess.py")
        shutil.copyfile(serving.postprocess.__file__, stage / "postprocess.py")
        (stage / "model-config.yaml").write_text(
            yaml.safe_dump(serving_yaml(version, config_yaml), sort_keys=False))
        extra = [stage / f for f in ("index_to_name.json", "model_config.json",
                                     "preprocess.py", "postprocess.py")]
        cmd = [model_archiver(), "--model-name", name, "--version", str(version.version),
               "--serialized-file", str(model_file), "--handler", str(HANDLER),
               "--extra-files", ",".join(str(p) for p in extra),
               "--config-file", str(stage / "model-config.yaml"),
               "--export-path", str(stage), "--force"]
        log.debug("running %s", " ".join(cmd))
        result = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if result.returncode != 0:
            raise ArchiveError(f"torch-model-archiver failed ({result.returncode}): "
                               f"{result.stderr.strip() or result.stdout.strip()}")
        target = export_path / f"{name}.mar"
        os.replace(stage / f"{name}.mar", target)
    return target


def archive_cli(args) -> int:
    """``python -m training archive``."""
    try:
        path = build_archive(args.model, args.format or DEFAULT_FORMAT, args.name,
                             args.export_path)
    except (ArchiveError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, format "
          f"{args.format or DEFAULT_FORMAT})")
    return 0
