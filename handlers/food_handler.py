"""TorchServe handler for the food classifier: image bytes in, top-k dishes out.

It follows TorchServe's handler contract (initialize, then handle) without the stock vision
handler, which imports captum and unpickles eager models. The model directory is read by
``serving.artifacts`` and every answer is made by the ``serving.predictor`` stages (decode,
infer, encode), exactly as in the ONNX server; a TorchScript model (``model.ts``) swaps only
the infer stage for ``torch.jit``. The .mar carries that ``serving/`` package, so these
imports are the same inside TorchServe and in the repository.

Each request of a batch is answered on its own: a bad image gets its own 4xx status and the
JSON ``{"code", "type", "message"}`` body through ``context.set_response_status(code, phrase,
idx)``, while the good images of the same batch run through the model together.
"""

from __future__ import annotations

import atexit
import http
import io
import json
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from serving.artifacts import read_model
from serving.errors import InputError
from serving.predictor import Predictor, ort_session, to_json
from serving.preprocess import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from serving.feedback import FeedbackStore

log = logging.getLogger(__name__)

JSON = "application/json"


def torchscript_infer(model: bytes, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """The infer stage run by TorchScript: (N, 3, H, W) float32 -> (N, C) logits."""
    import torch

    torch.set_num_threads(threads)
    module = torch.jit.load(io.BytesIO(model), map_location="cpu").eval()

    def infer(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch)).numpy()

    return infer


class FoodHandler:
    """Classify food photos; one JSON answer (or one 4xx error) per request, in order."""

    def __init__(self) -> None:
        self.initialized = False
        self.predictor: Predictor | None = None
        self.feedback: FeedbackStore | None = None

    def initialize(self, context) -> None:
        """Read the model directory (labels, preprocessing spec, top-k), load the model."""
        artifacts = read_model(context.system_properties["model_dir"])
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        handler_config = yaml_config.get("handler") or {}
        topk = int(handler_config["topk"]) if handler_config.get("topk") else None
        max_pixels = int(handler_config.get("max_pixels") or DEFAULT_MAX_PIXELS)
        workers = int(yaml_config.get("maxWorkers") or yaml_config.get("minWorkers") or 1)
        threads = int(handler_config.get("threads") or max(1, (os.cpu_count() or 1) // workers))

        serialized = context.manifest["model"]["serializedFile"]
        if serialized.endswith(".onnx"):
            # ORT's own default (spinning threads) is what this handler has always run with.
            session = ort_session(artifacts.model_bytes("onnx"), threads, spinning=True)
            self.predictor = Predictor(artifacts, session, max_pixels, topk)
        else:
            infer = torchscript_infer(artifacts.model_bytes("torchscript"), threads)
            self.predictor = Predictor(artifacts, None, max_pixels, topk, infer=infer,
                                       fmt="torchscript")
        log.info("loaded %s (%d classes, crop %d, %d threads for %d workers)", serialized,
                 len(artifacts.labels), artifacts.spec.crop_size, threads, workers)
        self.feedback = feedback_store(handler_config)
        self.initialized = True

    def preprocess_one(self, request: dict, topk: object = None) -> tuple[np.ndarray, int]:
        """One request's image as a CHW array and its k, or :class:`InputError`.

        k comes from ``topk`` (a header), else a ``topk`` request field, else the default.
        """
        body = request_image(request)
        k = self.predictor.parse_topk(request.get("topk") if topk is None else topk)
        return self.predictor.decode(body), k

    def handle(self, data: list[dict], context) -> list[str]:
        """TorchServe's entry point: a batch of requests in, one answer per request out."""
        answers: list[str | None] = [None] * len(data)
        good, arrays, ks = [], [], []
        for idx, request in enumerate(data):
            try:
                array, k = self.preprocess_one(request or {}, _topk_header(context, idx))
            except InputError as e:
                log.info("request %d rejected: %s %s", idx, e.status, e.message)
                context.set_response_status(e.status, http.HTTPStatus(e.status).phrase, idx)
                answers[idx] = json.dumps(e.to_dict())
                _set_json(context, idx)
                continue
            good.append(idx)
            arrays.append(array)
            ks.append(k)
        if good:
            logits = self.predictor.infer(np.stack(arrays))
            for idx, row, k in zip(good, logits, ks):
                answer = self.predictor.encode(row, k)
                answers[idx] = to_json(answer)
                _set_json(context, idx)
                self.log_prediction(context, idx, answer, data[idx])
        return answers

    def log_prediction(self, context, idx: int, answer: list, request: dict) -> None:
        """Queue a good answer for the prediction log; its id goes in the X-Prediction-Id
        response header (TorchServe's frontend copies the handler's response headers)."""
        if self.feedback is None:
            return
        p = self.predictor
        prediction_id = self.feedback.log_prediction(p.name, p.version, answer,
                                                     request_image(request), labels=p.labels)
        if prediction_id and getattr(context, "request_processor", None) is not None:
            context.set_response_header(idx, "X-Prediction-Id", prediction_id)


FEEDBACK_DB_ENV = "FOOD_FEEDBACK_DB"
FEEDBACK_IMAGES_ENV = "FOOD_FEEDBACK_IMAGES"


def feedback_store(handler_config: dict) -> FeedbackStore | None:
    """The prediction log named by $FOOD_FEEDBACK_DB or the model config's
    ``handler: feedback_db:`` (None: off). Images are kept only with $FOOD_FEEDBACK_IMAGES or
    ``handler: store_images:``; ``image_retention_days``, ``max_images`` and
    ``prediction_retention_days`` set retention. Needs SQLAlchemy in TorchServe's Python."""
    url = os.environ.get(FEEDBACK_DB_ENV) or handler_config.get("feedback_db")
    if not url:
        return None
    try:
        from serving.feedback import FeedbackSettings
    except ImportError as e:
        raise ImportError(
            f"the prediction log ({FEEDBACK_DB_ENV} / handler.feedback_db) needs SQLAlchemy and "
            f"prometheus-client in TorchServe's Python and serving/feedback.py in the .mar: "
            f"pip install 'food-classifier[serve]' ({e})") from e
    retention = {field: float(handler_config[key]) if "days" in key else int(handler_config[key])
                 for key, field in (("image_retention_days", "image_max_age_days"),
                                    ("max_images", "max_images"),
                                    ("prediction_retention_days", "prediction_max_age_days"))
                 if handler_config.get(key) is not None}
    settings = FeedbackSettings(
        url=url, images_dir=os.environ.get(FEEDBACK_IMAGES_ENV)
        or handler_config.get("store_images"), **retention)
    store = settings.open()
    atexit.register(store.close)  # a worker that exits normally writes what is queued
    log.info("logging predictions to %s (images %s)", store.safe_url,
             settings.images_dir or "not kept")
    return store


def request_image(request: dict) -> bytes:
    """The image bytes TorchServe hands over (``data`` or ``body``); InputError for a body it
    parsed as JSON."""
    body = next((request[key] for key in ("data", "body") if key in request), None)
    if body is None:
        body = b""
    if isinstance(body, (dict, list)):
        raise InputError(
            "the body was parsed as JSON; send the image bytes (curl -T image.jpg ...)",
            415, "UnsupportedMediaType")
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogateescape")
    return bytes(body)


def _topk_header(context, idx: int) -> str | None:
    """The ``X-TopK`` request header, if any.

    TorchServe 0.12 drops the query string of ``/predictions/...`` before the handler sees it
    (InferenceRequestHandler.handlePredictions passes no QueryStringDecoder), so ``?topk=``
    reaches us only on ``/invocations?model_name=food&topk=N``; a header or a multipart
    ``topk`` field works on every route.
    """
    if getattr(context, "request_processor", None) is None:
        return None
    headers = context.get_all_request_header(idx) or {}
    return next((value for key, value in headers.items()
                 if isinstance(key, str) and key.lower() == "x-topk"), None)


def _set_json(context, idx: int) -> None:
    """Mark answer ``idx`` as JSON (TorchServe would otherwise send no content type)."""
    if getattr(context, "request_processor", None) is not None:
        context.set_response_content_type(idx, JSON)
