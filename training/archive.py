"""Package a model version into a self-contained TorchServe archive, ``model_store/<name>.mar``.

The .mar holds everything a TorchServe host needs and nothing from this repository has to be
installed there: the handler, the serialized model (ONNX or TorchScript), ``index_to_name.json``
(from ``class_to_idx.json``), ``model_config.json`` (preprocessing spec, default top-k), the
``serving/`` modules the handler imports (a package directory, so its imports read the same
in the repository and inside TorchServe) and ``model-config.yaml`` (batching, workers,
timeout, top-k). It is built by ``torch-model-archiver`` in a staging directory and renamed
into place, so a running TorchServe never sees half a file.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from serving.artifacts import MODEL_FILES, ModelArtifacts, read_model
from serving.atomic import atomic_write, staging_dir, write_json
from serving.launch import console_script
from training.locks import exclusive

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SERVING = REPO / "serving"
HANDLER = REPO / "handlers" / "food_handler.py"
MODEL_CONFIG_YAML = REPO / "serve_config" / "model-config.yaml"
# The serving modules the handler imports, carried as the .mar's serving/ package.
CARRIED_MODULES = ("__init__.py", "errors.py", "preprocess.py", "artifacts.py", "predictor.py",
                   "engines.py", "atomic.py", "feedback.py")
# ONNX Runtime answered faster than TorchScript at batch 1 and 8 on the sample crop (see
# the archive report in README); both formats are built and tested.
DEFAULT_FORMAT = "onnx"
FORMATS = ("onnx", "torchscript")


class ArchiveError(RuntimeError):
    """The archive cannot be built from what the version holds."""


def index_to_name(version: ModelArtifacts) -> dict[str, str]:
    """TorchServe's label file: ``{"0": "apple_pie", ...}``."""
    return {str(i): label for i, label in enumerate(version.labels)}


def serving_yaml(version: ModelArtifacts, base: Path = MODEL_CONFIG_YAML) -> dict:
    """The .mar's ``model-config.yaml``: ``base`` with ``handler.topk`` defaulting to the
    version's default top-k."""
    config = yaml.safe_load(base.read_text()) or {}
    handler = config.setdefault("handler", {}) or {}
    config["handler"] = handler
    handler.setdefault("topk", version.default_topk)
    return config


def model_archiver() -> str:
    """The ``torch-model-archiver`` console script (FileNotFoundError saying how to install)."""
    return console_script("torch-model-archiver")


def build_archive(model_dir: str | Path, fmt: str = DEFAULT_FORMAT, name: str | None = None,
                  export_path: str | Path = "model_store",
                  config_yaml: Path = MODEL_CONFIG_YAML) -> Path:
    """Build ``<export_path>/<name>.mar`` from a version directory; returns its path."""
    if fmt not in FORMATS:
        raise ArchiveError(f"--format {fmt!r}: allowed {', '.join(FORMATS)}")
    version = read_model(model_dir)
    model_file = version.path / MODEL_FILES[fmt]
    if fmt in version.formats:
        model_file = version.model_file(fmt)  # from the export read_model resolved
    else:
        raise ArchiveError(f"{model_file} does not exist: run `python -m training export "
                           f"--model {model_dir}` first (make archive does)")
    name = name or version.name
    export_path = Path(export_path)

    # One archive writer per model store; a killed one's leftovers are removed here.
    with exclusive(export_path, "another archive build"), \
            staging_dir(export_path, "archive") as stage:
        write_json(stage / "index_to_name.json", index_to_name(version))
        shutil.copyfile(version.path / "model_config.json", stage / "model_config.json")
        package = stage / "carried" / "serving"
        package.mkdir(parents=True)
        for module in CARRIED_MODULES:
            shutil.copyfile(SERVING / module, package / module)
        if fmt == "onnx" and "onnx_int8" in version.formats:
            # The handler may pick an int8 variant export validated (serving.engines).
            shutil.copyfile(version.model_file("onnx_int8"),
                            stage / "carried" / MODEL_FILES["onnx_int8"])
        (stage / "model-config.yaml").write_text(
            yaml.safe_dump(serving_yaml(version, config_yaml), sort_keys=False))
        # A directory among the extra files has its contents copied to the archive's root.
        extra = [stage / "index_to_name.json", stage / "model_config.json", stage / "carried"]
        cmd = [model_archiver(), "--model-name", name, "--version", str(version.version),
               "--serialized-file", str(model_file), "--handler", str(HANDLER),
               "--extra-files", ",".join(str(p) for p in extra),
               "--config-file", str(stage / "model-config.yaml"),
               "--export-path", str(stage), "--force"]
        log.debug("running %s", " ".join(cmd))
        # torch-model-archiver assembles in $TMPDIR/<model name>, removed first: a private
        # TMPDIR keeps two builds of one model name (two stores) from wiping each other's
        private_tmp = stage / "archiver-tmp"
        private_tmp.mkdir()
        result = subprocess.run(cmd, check=False, capture_output=True, text=True,
                                env={**os.environ, "TMPDIR": str(private_tmp)})
        if result.returncode != 0:
            raise ArchiveError(f"torch-model-archiver failed ({result.returncode}): "
                               f"{result.stderr.strip() or result.stdout.strip()}")
        target = export_path / f"{name}.mar"
        atomic_write(target, lambda tmp: os.replace(stage / f"{name}.mar", tmp))
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
