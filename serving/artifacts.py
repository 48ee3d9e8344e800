"""The one reader of a model: a version directory, a ``.mar`` or an MLflow URI -> one record.

``read_model(source)`` accepts ``artifacts/<model>/v<N>``, ``artifacts/<model>/latest``
(resolved once, then every file comes from the resolved directory), a TorchServe model
directory (an unpacked .mar), a ``.mar`` file (read as a zip, never extracted) or an MLflow
URI (``models:/food-classifier@champion``, ``runs:/<id>/version``). It returns a frozen
:class:`ModelArtifacts`: labels, preprocessing spec, default top-k, name, version, and the
model files present. The checks every loader needs live here too: labels form a bijection
onto ``0..C-1`` and a loaded model's input and output fit ``model_config.json``.

Stdlib + numpy-free: the TorchServe .mar carries this module.
"""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from serving.preprocess import PreprocessSpec

# The k of a request that names none, when model_config.json has no "topk".
DEFAULT_TOPK = 3
URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
# Model formats and the file each is stored in (version directory and .mar alike).
MODEL_FILES = {"onnx": "model.onnx", "onnx_int8": "model.int8.onnx", "torchscript": "model.ts"}


def labels_from_class_to_idx(class_to_idx: dict[str, int]) -> list[str]:
    """``{"apple_pie": 0, ...}`` as the list of labels indexed by class id."""
    labels = sorted(class_to_idx, key=class_to_idx.__getitem__)
    if [class_to_idx[k] for k in labels] != list(range(len(labels))):
        raise ValueError("class_to_idx must map onto 0..C-1 exactly once each")
    return labels


@dataclass(frozen=True)
class ModelArtifacts:
    """One model version as read from its source: what it is and which model files it has."""

    name: str
    version: str
    arch: str | None
    num_classes: int
    labels: list[str]
    class_to_idx: dict[str, int]
    spec: PreprocessSpec
    default_topk: int
    config: dict
    source: str  # what the caller named: a path, a .mar, a models:/ URI
    path: Path  # the resolved version directory, the .mar file, or the MLflow download
    formats: tuple[str, ...]  # keys of MODEL_FILES present

    @property
    def is_archive(self) -> bool:
        return self.path.is_file()

    def model_bytes(self, fmt: str = "onnx") -> bytes:
        """The serialized model of format ``fmt`` (a key of MODEL_FILES)."""
        name = MODEL_FILES[fmt]
        if fmt not in self.formats:
            if self.is_archive:
                hint = ("it is probably a TorchScript archive. Build one with python -m "
                        "training archive --format onnx, or serve this one with TorchServe"
                        if fmt == "onnx" else "build one with python -m training archive "
                        f"--format {fmt}")
                raise ValueError(f"{self.path} holds no {name}; {hint}")
            raise FileNotFoundError(f"{self.path} has no {name}; export it first: "
                                    f"python -m training export --model {self.path}")
        if self.is_archive:
            with zipfile.ZipFile(self.path) as archive:
                return archive.read(name)
        return (self.path / name).read_bytes()

    def location(self, fmt: str) -> str:
        """Where the model file of format ``fmt`` is, for messages."""
        name = MODEL_FILES[fmt]
        return f"{self.path}:{name}" if self.is_archive else str(self.path / name)

    def check_model_io(self, fmt: str, input_shape: Sequence, output_shape: Sequence) -> None:
        """Refuse a model whose input is not N x 3 x crop x crop or whose output is not
        N x num_classes; dynamic dimensions (names, None) pass."""
        where = self.location(fmt)
        c = self.spec.crop_size
        fixed = [d if isinstance(d, int) else None for d in input_shape]
        if len(fixed) != 4 or fixed[1] not in (3, None) or \
                any(d not in (c, None) for d in fixed[2:]):
            raise ValueError(f"{where}: input shape {list(input_shape)} does not take "
                             f"N x 3 x {c} x {c} images (crop_size={c} in model_config.json)")
        width = output_shape[-1] if len(output_shape) else None
        if isinstance(width, int) and width != self.num_classes:
            raise ValueError(f"{where}: output has {width} classes but model_config.json says "
                             f"num_classes={self.num_classes}")

    def validation_samples(self) -> list[tuple[str, str]]:
        """(image path, true label) of each row of the version's ``predictions.csv``."""
        text = self._read_text("predictions.csv")
        if text is None:
            return []
        return [(row["path"], row["true_label"]) for row in csv.DictReader(io.StringIO(text))]

    def _read_text(self, name: str) -> str | None:
        if self.is_archive:
            with zipfile.ZipFile(self.path) as archive:
                return archive.read(name).decode() if name in archive.namelist() else None
        file = self.path / name
        return file.read_text() if file.is_file() else None


def read_model(source: str | os.PathLike) -> ModelArtifacts:
    """Read a version directory, a ``.mar`` or an MLflow model URI (see the module doc)."""
    text = os.fspath(source)
    if text.startswith(URI_SCHEMES):
        return _read_dir(_download_mlflow(text), text)
    path = Path(text)
    if path.is_dir():
        # `latest` is resolved once here, so a version published meanwhile cannot mix in.
        return _read_dir(Path(os.path.realpath(path)), text)
    if path.is_file():
        return _read_mar(path, text)
    raise FileNotFoundError(f"{text} does not exist; expected a version directory "
                            f"(artifacts/food/latest), a .mar file or a models:/ URI")


def _read_dir(path: Path, source: str) -> ModelArtifacts:
    config_file = path / "model_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{source} is not a model version (no model_config.json); train one with "
            f"`make train`, or point at artifacts/<model>/v<N>, artifacts/<model>/latest, "
            f"a .mar or a models:/ URI")
    files = {p.name for p in path.iterdir()}

    def read(name: str) -> bytes | None:
        return (path / name).read_bytes() if name in files else None

    return _record(source, path, read, files)


def _read_mar(path: Path, source: str) -> ModelArtifacts:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a .mar (zip) file: {e}") from e
    with archive:
        files = set(archive.namelist())
        if "model_config.json" not in files:
            raise ValueError(f"{path} has no model_config.json (preprocessing spec)")

        def read(name: str) -> bytes | None:
            return archive.read(name) if name in files else None

        return _record(source, path, read, files)


def _record(source: str, path: Path, read, files: set[str]) -> ModelArtifacts:
    """The record from ``read(name) -> bytes | None`` over a directory's or a zip's files."""
    config = json.loads(read("model_config.json"))
    if (raw := read("class_to_idx.json")) is not None:
        class_to_idx = json.loads(raw)
    elif (raw := read("index_to_name.json")) is not None:  # TorchServe's label file
        class_to_idx = {label: int(i) for i, label in json.loads(raw).items()}
    else:
        raise ValueError(f"{source} has neither class_to_idx.json nor index_to_name.json")
    try:
        labels = labels_from_class_to_idx(class_to_idx)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    num_classes = int(config.get("num_classes", len(labels)))
    if len(labels) != num_classes:
        raise ValueError(f"{source}: {len(labels)} labels but model_config.json says "
                         f"num_classes={num_classes}")
    return ModelArtifacts(
        name=str(config.get("name", "model")), version=str(config.get("version", "1")),
        arch=config.get("arch"), num_classes=num_classes, labels=labels,
        class_to_idx=class_to_idx, spec=PreprocessSpec.from_dict(config["preprocessing"]),
        default_topk=int(config.get("topk", DEFAULT_TOPK)), config=config, source=source,
        path=path, formats=tuple(f for f, name in MODEL_FILES.items() if name in files))


def _download_mlflow(uri: str) -> Path:
    """Download an MLflow model URI to a local directory laid out like a version."""
    try:
        import mlflow.artifacts
    except ImportError as e:
        raise ImportError(
            f"loading {uri} needs MLflow: pip install mlflow-skinny (or point at a "
            f"version directory or .mar instead)") from e
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
