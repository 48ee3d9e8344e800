"""The torch-free backend predictor: a model version through ONNX Runtime alone.

``Predictor.load(path)`` reads ``model.onnx`` + labels + ``model_config.json`` from a version
directory, a ``.mar`` (zip) built by ``python -m training archive --format onnx``, or an
MLflow model URI (``models:/food-classifier@champion``). Preprocessing and postprocessing are
the shared modules, so the answers equal the TorchServe handler's for the same model and image.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from serving.postprocess import labels_from_class_to_idx, parse_topk, softmax, topk
from serving.preprocess import DEFAULT_MAX_PIXELS, PreprocessSpec, preprocess, preprocess_bytes

log = logging.getLogger(__name__)

ImageInput = bytes | bytearray | str | os.PathLike | Image.Image
_URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


@dataclass(frozen=True)
class Prediction:
    """One entry of the top-k answer."""

    label: str
    probability: float

    def to_dict(self) -> dict:
        """The JSON shape both servers send: ``{"label", "probability"}``."""
        return {"label": self.label, "probability": self.probability}


def default_threads() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def session_options(intra_op_threads: int | None = None,
                    allow_spinning: bool = True) -> ort.SessionOptions:
    """ONNX Runtime options, chosen rather than defaulted.

    All graph optimizations (constant folding, conv+bn+relu fusion); one intra-op pool sized
    to the CPUs (a CNN has no parallel branches worth an inter-op pool); spinning threads
    cut latency when ORT owns the cores but burn them when other threads (the HTTP server's
    decode pool) need the same cores, so the server turns it off.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = int(intra_op_threads or default_threads())
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning",
                                  "1" if allow_spinning else "0")
    return opts


def _read_version_dir(path: Path) -> tuple[bytes, dict, dict]:
    """model.onnx bytes, class_to_idx and model_config from a version directory."""
    config_file = path / "model_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a model version (no model_config.json); point at "
            f"artifacts/<model>/v<N>, artifacts/<model>/latest, a .mar or a models:/ URI")
    onnx_file = path / "model.onnx"
    if not onnx_file.is_file():
        raise FileNotFoundError(
            f"{path} has no model.onnx; export it first: python -m training export "
            f"--model {path}")
    class_to_idx = json.loads((path / "class_to_idx.json").read_text())
    return onnx_file.read_bytes(), class_to_idx, json.loads(config_file.read_text())


def _read_mar(path: Path) -> tuple[bytes, dict, dict]:
    """model.onnx bytes, class_to_idx and model_config from a .mar, without extracting it."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a .mar (zip) file: {e}") from e
    with archive:
        names = set(archive.namelist())
        if "model.onnx" not in names:
            raise ValueError(
                f"{path} holds no model.onnx (files: {sorted(names)}); it is probably a "
                f"TorchScript archive. Build one with python -m training archive "
                f"--format onnx, or serve this one with TorchServe")
        if "model_config.json" not in names:
            raise ValueError(f"{path} has no model_config.json (preprocessing spec)")
        config = json.loads(archive.read("model_config.json"))
        if "class_to_idx.json" in names:
            class_to_idx = json.loads(archive.read("class_to_idx.json"))
        elif "index_to_name.json" in names:
            index_to_name = json.loads(archive.read("index_to_name.json"))
            class_to_idx = {label: int(i) for i, label in index_to_name.items()}
        else:
            raise ValueError(f"{path} has neither index_to_name.json nor class_to_idx.json")
        return archive.read("model.onnx"), class_to_idx, config


def _download_mlflow(uri: str) -> Path:
    """Download an MLflow model URI to a local directory laid out like a version."""
    try:
        import mlflow.artifacts
    except ImportError as e:
        raise ImportError(
            f"loading {uri} needs MLflow: pip install mlflow-skinny (or point at a "
            f"version directory or .mar instead)") from e
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))


class Predictor:
    """An ONNX Runtime session plus the labels and preprocessing spec it was trained with."""

    def __init__(self, model: bytes | str | Path, class_to_idx: dict[str, int], config: dict,
                 source: str = "", intra_op_threads: int | None = None,
                 allow_spinning: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.config = config
        self.labels = labels_from_class_to_idx(class_to_idx)
        self.spec = PreprocessSpec.from_dict(config["preprocessing"])
        self.name = str(config.get("name", "model"))
        self.version = str(config.get("version", "1"))
        self.default_topk = int(config.get("topk", 3))
        self.source = source
        self.max_pixels = max_pixels
        threads = intra_op_threads or config.get("intra_op_threads")
        self.session = ort.InferenceSession(
            model if isinstance(model, bytes) else str(model),
            sess_options=session_options(threads, allow_spinning),
            providers=["CPUExecutionProvider"])
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.output_name = self.session.get_outputs()[0].name
        if len(self.labels) != int(config.get("num_classes", len(self.labels))):
            raise ValueError(f"{source}: {len(self.labels)} labels but model_config.json says "
                             f"num_classes={config['num_classes']}")

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs) -> Predictor:
        """A version directory, a ``.mar`` file, or an MLflow URI (``models:/name@alias``).

        Keyword arguments go to the constructor (``intra_op_threads``, ``allow_spinning``,
        ``max_pixels``).
        """
        source = os.fspath(path)
        if source.startswith(_URI_SCHEMES):
            local = _download_mlflow(source)
            model, class_to_idx, config = _read_version_dir(local)
        else:
            local = Path(source)
            if local.is_dir():
                model, class_to_idx, config = _read_version_dir(local)
            elif local.is_file():
                model, class_to_idx, config = _read_mar(local)
            else:
                raise FileNotFoundError(
                    f"{source} does not exist; expected a version directory "
                    f"(artifacts/food/latest), a .mar file or a models:/ URI")
        log.info("loading %s (%s v%s)", source, config.get("name"), config.get("version"))
        return cls(model, class_to_idx, config, source=source, **kwargs)

    def to_array(self, image: ImageInput) -> np.ndarray:
        """Bytes, a path or a PIL image as the model's CHW float32 input (InputError if bad)."""
        if isinstance(image, Image.Image):
            return preprocess(image, self.spec)
        data = bytes(image) if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()
        return preprocess_bytes(data, self.spec, self.max_pixels)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Run an (N, 3, H, W) float32 batch through the session: (N, C) float32 logits."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def answer(self, logits_row: np.ndarray, k: int | str | None = None) -> list[Prediction]:
        """One row of logits as the top-k records (softmax in float64, shared rounding)."""
        k = parse_topk(k, self.default_topk, len(self.labels))
        probs = softmax(np.asarray(logits_row)[None])[0]
        return [Prediction(**d) for d in topk(probs, self.labels, k)]

    def predict(self, image: ImageInput, topk: int | None = None) -> list[Prediction]:
        """Top-k predictions for one image (bytes, path or PIL image)."""
        return self.predict_batch([image], topk)[0]

    def predict_batch(self, images: Sequence[ImageInput],
                      topk: int | None = None) -> list[list[Prediction]]:
        """Top-k predictions for several images, run as one ONNX batch."""
        if not images:
            return []
        batch = np.stack([self.to_array(image) for image in images])
        return [self.answer(row, topk) for row in self.logits(batch)]
