"""Where an image's answer is made: decode -> infer -> encode, for one model version.

``Predictor.load(source)`` reads a model through :func:`serving.artifacts.read_model` and
runs it on the engine variant :mod:`serving.engines` picks (ONNX Runtime or OpenVINO, at the
fastest precision export validated). Its three stages are the contract every caller uses: the HTTP
server's batcher and both protocols, the TorchServe handler (which swaps only ``infer`` for
TorchScript) and in-process callers (``predict``, ``predict_batch``)::

    decode(image) -> CHW float32     (the shared preprocessing, with this predictor's
                                      pixel budget)
    infer(N x 3 x H x W) -> logits   (N x C)
    encode(logits row, k) -> [Prediction, ...]   (softmax in float64, top-k, shared rounding)

The engines are imported only where a model is compiled, so the TorchServe .mar (which
carries this module) needs no onnxruntime for a TorchScript model, and ``import serving``
stays light.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

import numpy as np
from PIL import Image

from serving import engines
from serving.artifacts import ModelArtifacts, read_model
from serving.errors import InputError
from serving.preprocess import (
    DEFAULT_DRAFT_FACTOR,
    DEFAULT_MAX_PIXELS,
    DecodeBudget,
    draft_target,
    preprocess,
    preprocess_bytes,
)

if TYPE_CHECKING:
    from serving.engines import Engine
    from serving.feedback import FeedbackStore

log = logging.getLogger(__name__)

ImageInput = bytes | bytearray | str | os.PathLike | Image.Image


@dataclass(frozen=True)
class Prediction:
    """One entry of the top-k answer."""

    label: str
    probability: float

    def to_dict(self) -> dict:
        """The JSON shape both servers send: ``{"label", "probability"}``."""
        return {"label": self.label, "probability": self.probability}


def to_json(predictions: Sequence[Prediction]) -> str:
    """The answer's JSON text, byte for byte what both servers and the handler send."""
    return json.dumps([p.to_dict() for p in predictions])


def default_threads() -> int:
    """CPUs this process may run on: its affinity (taskset, cpusets), capped by a cgroup CPU
    quota (a container's CPU limit) where one is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time the cgroup allows (cgroup v2 ``cpu.max``, else v1 CFS quota), or
    None when unlimited or not Linux."""
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
                                     "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            fields = Path(quota_file).read_text().split()
            if period_file is not None:
                fields.append(Path(period_file).read_text().strip())
            quota, period = fields[0], fields[1]
            if quota in ("max", "-1"):
                return None
            return int(quota) / int(period)
        except (OSError, ValueError, IndexError):
            continue
    return None


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of an (N, C) array, computed in float64 for stable probabilities."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def parse_topk(value: object, default: int, num_classes: int) -> int:
    """A request's top-k (None or "" for ``default``); InputError naming what is allowed."""
    if value is None or value == "":
        return min(default, num_classes)
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    try:
        k = int(str(value).strip())
    except ValueError:
        raise InputError(f"topk={value!r} is not an integer; allowed: 1..{num_classes}",
                         400, "InvalidTopK") from None
    if not 1 <= k <= num_classes:
        raise InputError(f"topk={k} is out of range; allowed: 1..{num_classes}", 400,
                         "InvalidTopK")
    return k


def top_k(probabilities: np.ndarray, labels: Sequence[str], k: int) -> list[Prediction]:
    """The k most probable labels of one (C,) probability row, highest first.

    Ties are broken by class index so every server returns the same order.
    """
    order = np.lexsort((np.arange(len(probabilities)), -probabilities))[:k]
    return [Prediction(labels[i], float(round(probabilities[i], 6))) for i in order]


class Predictor:
    """One model version's three stages, with its labels, preprocessing spec and top-k."""

    def __init__(self, artifacts: ModelArtifacts, engine: Engine | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, default_topk: int | None = None,
                 name: str | None = None, *,
                 infer: Callable[[np.ndarray], np.ndarray] | None = None,
                 fmt: str = "onnx", feedback: FeedbackStore | None = None,
                 budget: DecodeBudget | None = None,
                 draft_factor: int | None = DEFAULT_DRAFT_FACTOR) -> None:
        """``infer`` runs on the compiled ``engine`` (a :mod:`serving.engines` variant), or is
        the given function instead (the TorchServe handler passes TorchScript's,
        ``fmt="torchscript"``). Either way the model's input and output are checked against
        the model config before it serves. ``default_topk`` and ``name`` override the model
        config's. With ``feedback`` every prediction is logged there (off the caller's path)
        under a new id. ``draft_factor`` turns on JPEG draft decoding down to that many times
        the resize size (None: full decode, the default; see serving.preprocess)."""
        self.artifacts = artifacts
        self.feedback = feedback
        self.name = name or artifacts.name
        self.version = artifacts.version
        self.source = artifacts.source
        self.labels = artifacts.labels
        self.spec = artifacts.spec
        self.default_topk = default_topk or artifacts.default_topk
        self.budget = budget or DecodeBudget(max_pixels)  # what decoding one image may cost
        self.max_pixels = self.budget.max_pixels
        draft_target(self.spec, draft_factor)  # ValueError for a bad factor, here
        self.draft_factor = draft_factor
        self.engine = engine
        self.input_name, self.output_name = "input", "logits"
        if engine is not None:
            artifacts.check_model_io(engine.variant.model_format, engine.input_shape,
                                     engine.output_shape)
            self._infer = engine.infer
            self.input_name, self.output_name = engine.input_name, engine.output_name
            self.runtime, self.threads = engine.variant.name, engine.threads
            self.streams, self.spinning = engine.streams, engine.spinning
        elif infer is not None:
            self._infer = infer  # the swapped stage
            self.runtime, self.threads, self.streams, self.spinning = fmt, 0, 1, False
            c = self.spec.crop_size
            probe = np.zeros((1, 3, c, c), np.float32)
            try:
                logits = infer(probe)
            except Exception as e:  # a model built for another crop fails here, not later
                raise ValueError(f"{artifacts.location(fmt)} does not run on 1 x 3 x {c} x {c} "
                                 f"(crop_size in model_config.json): {e}") from e
            artifacts.check_model_io(fmt, probe.shape, np.shape(logits))
        else:
            raise ValueError("a Predictor needs a compiled engine or an infer function")

    @classmethod
    def load(cls, source: str | os.PathLike, *, intra_op_threads: int | None = None,
             allow_spinning: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
             name: str | None = None, feedback: FeedbackStore | None = None,
             budget: DecodeBudget | None = None, engine: str = engines.AUTO,
             precision: str = engines.AUTO, streams: int = 1,
             draft_factor: int | None = DEFAULT_DRAFT_FACTOR) -> Predictor:
        """A version directory, a ``.mar`` file, or an MLflow URI (``models:/name@alias``).

        It runs on the variant ``engines.choose`` picks (``engine``/``precision``: ``auto`` is
        the fastest one ``export --variants`` validated and this machine can run), with
        ``intra_op_threads`` (else model_config.json's ``intra_op_threads``, else the CPU
        count) over ``streams`` concurrent batches. ``budget`` bounds each image's decode
        (default: ``max_pixels`` and the default limits); ``feedback`` a store to log
        predictions in."""
        artifacts = read_model(source)
        variant = engines.choose(artifacts, engine, precision)
        threads = intra_op_threads or artifacts.config.get("intra_op_threads") or \
            default_threads()
        log.info("loading %s (%s v%s) on %s, %d threads", artifacts.source, artifacts.name,
                 artifacts.version, variant, threads)
        compiled = engines.build(artifacts.model_bytes(variant.model_format), variant,
                                 threads, allow_spinning, streams)
        return cls(artifacts, compiled, max_pixels=max_pixels, name=name, feedback=feedback,
                   budget=budget, draft_factor=draft_factor)

    def decode(self, image: ImageInput) -> np.ndarray:
        """Bytes, a path or a PIL image as the model's CHW float32 input (InputError if bad)."""
        if isinstance(image, Image.Image):
            return preprocess(image, self.spec)
        data = bytes(image) if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()
        return preprocess_bytes(data, self.spec, draft_factor=self.draft_factor,
                                budget=self.budget)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run an (N, 3, H, W) float32 batch through the model: (N, C) float32 logits."""
        return self._infer(batch)

    def warm(self, max_batch_size: int = 1) -> None:
        """Run every batch size up to ``max_batch_size`` once on zeros, so no request pays a
        first-shape cost (OpenVINO prepares each new input shape on first use)."""
        c = self.spec.crop_size
        for n in range(1, max_batch_size + 1):
            self.infer(np.zeros((n, 3, c, c), np.float32))

    def parse_topk(self, value: object) -> int:
        """A request's k (None: the default), or InputError naming the allowed range."""
        return parse_topk(value, self.default_topk, len(self.labels))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """(N, C) logits as (N, C) float64 probabilities."""
        return softmax(logits)

    def rank(self, probabilities_row: np.ndarray, k: int) -> list[Prediction]:
        """One row of probabilities as its top-k predictions."""
        return top_k(probabilities_row, self.labels, k)

    def encode(self, logits_row: np.ndarray, k: int) -> list[Prediction]:
        """One row of logits as the top-k answer (``k`` already parsed by ``parse_topk``)."""
        return self.rank(self.probabilities(np.asarray(logits_row)[None])[0], k)

    @overload
    def predict(self, image: ImageInput, topk: int | str | None = None, *,
                return_id: Literal[False] = False) -> list[Prediction]: ...

    @overload
    def predict(self, image: ImageInput, topk: int | str | None = None, *,
                return_id: Literal[True]) -> tuple[list[Prediction], str | None]: ...

    def predict(self, image, topk=None, *, return_id=False):
        """Top-k predictions for one image (bytes, path or PIL image). ``return_id=True``
        returns ``(predictions, prediction id)``, the id None without a feedback store."""
        answers, ids = self._predict_logged([image], topk)
        return (answers[0], ids[0]) if return_id else answers[0]

    @overload
    def predict_batch(self, images: Sequence[ImageInput], topk: int | str | None = None, *,
                      return_ids: Literal[False] = False) -> list[list[Prediction]]: ...

    @overload
    def predict_batch(self, images: Sequence[ImageInput], topk: int | str | None = None, *,
                      return_ids: Literal[True]
                      ) -> tuple[list[list[Prediction]], list[str | None]]: ...

    def predict_batch(self, images, topk=None, *, return_ids=False):
        """Top-k predictions for several images, run as one batch (``return_ids``: and
        their prediction ids, as in ``predict``)."""
        answers, ids = self._predict_logged(images, topk)
        return (answers, ids) if return_ids else answers

    def _predict_logged(self, images: Sequence[ImageInput], topk: int | str | None
                        ) -> tuple[list[list[Prediction]], list[str | None]]:
        if not images:
            return [], []
        k = self.parse_topk(topk)
        if self.feedback is not None:  # read files once: decoded and logged (sha256)
            images = [Path(i).read_bytes() if isinstance(i, (str, os.PathLike)) else i
                      for i in images]
        logits = self.infer(np.stack([self.decode(image) for image in images]))
        answers = [self.encode(row, k) for row in logits]
        if self.feedback is None:
            return answers, [None] * len(answers)
        return answers, [self.feedback.log_prediction(
            self.name, self.version, answer,
            bytes(image) if isinstance(image, (bytes, bytearray)) else None, labels=self.labels)
            for image, answer in zip(images, answers)]
