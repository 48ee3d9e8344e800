"""TorchServe handler for the food classifier: image bytes in, top-k dishes out.

It follows TorchServe's handler contract (initialize, then handle) without the stock vision
handler, which imports captum and unpickles eager models. The model directory is read by
``serving.artifacts`` and every answer is made by the ``serving.predictor`` stages (decode,
infer, encode), exactly as in the ONNX server; a TorchScript model (``model.ts``) swaps only
the infer stage for ``torch.jit``. The .mar carries that ``serving/`` package, so these
imports are the same inside TorchServe and in the repository.

Each request of a batch is answered on its own: a bad image gets its own 4xx status and the
JSON ``{"code", "type", "message"}`` body through ``context.set_response_status(code, phrase,
idx)``, any other failure of one request its own 500, while the good images of the same batch
run through the model together. Images are decoded under the same decode budget as the ONNX
server (``handler:`` ``max_pixels``, ``max_jpeg_scans``, ``decode_timeout_s`` in the model
config).
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

from serving import engines
from serving.artifacts import MODEL_FILES, cap_threads, read_model
from serving.errors import BodyTooLarge, InputError, InternalError, ServingError
from serving.predictor import Predictor, default_threads, to_json
from serving.preprocess import (
    DEFAULT_DECODE_TIMEOUT_S,
    DEFAULT_MAX_JPEG_SCANS,
    DEFAULT_MAX_PIXELS,
    DecodeBudget,
)

if TYPE_CHECKING:
    from serving.feedback import FeedbackStore

log = logging.getLogger(__name__)

JSON = "application/json"
# The ONNX server's --max-body-mb default. TorchServe's frontend (max_request_size in
# config.properties) takes twice this, so a body over it still arrives and gets this 413 JSON
# instead of the frontend closing the connection while the client is sending.
MAX_BODY_BYTES = 20 * 1024 * 1024


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
        self.max_body_bytes = MAX_BODY_BYTES

    def initialize(self, context) -> None:
        """Read the model directory (labels, preprocessing spec, top-k), load the model."""
        artifacts = read_model(context.system_properties["model_dir"])
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        handler_config = yaml_config.get("handler") or {}
        topk = int(handler_config["topk"]) if handler_config.get("topk") else None
        budget = decode_budget(handler_config)
        # handler.jpeg_draft: JPEG draft decoding at that factor (off unless set).
        draft = int(handler_config["jpeg_draft"]) if handler_config.get("jpeg_draft") else None
        workers = int(yaml_config.get("maxWorkers") or yaml_config.get("minWorkers") or 1)
        # The CPUs this worker may use (affinity, container quota), shared by the workers.
        threads = (cap_threads(handler_config.get("threads"), "model-config.yaml handler.threads")
                   or max(1, default_threads() // workers))  # the archive's ask, host-capped
        self.max_body_bytes = int(handler_config.get("max_body_bytes") or MAX_BODY_BYTES)

        serialized = context.manifest["model"]["serializedFile"]
        loaded = serialized
        if serialized.endswith(".onnx"):
            # The fastest variant export validated that this worker can run, unless
            # model-config.yaml's handler.engine / handler.precision name one.
            variant = engines.choose(artifacts,
                                     str(handler_config.get("engine") or engines.AUTO),
                                     str(handler_config.get("precision") or engines.AUTO))
            # ORT's own default (spinning threads) is what this handler has always run with.
            engine = engines.build(artifacts.model_bytes(variant.model_format), variant,
                                   threads, spinning=True)
            loaded = MODEL_FILES[variant.model_format]
            self.predictor = Predictor(artifacts, engine, default_topk=topk, budget=budget,
                                       draft_factor=draft)
        else:
            infer = torchscript_infer(artifacts.model_bytes("torchscript"), threads)
            self.predictor = Predictor(artifacts, None, default_topk=topk, infer=infer,
                                       fmt="torchscript", budget=budget, draft_factor=draft)
        log.info("loaded %s on %s (%d classes, crop %d, %d threads for %d workers)",
                 loaded, self.predictor.runtime, len(artifacts.labels),
                 artifacts.spec.crop_size, threads, workers)
        self.feedback = feedback_store(handler_config)
        self.initialized = True

    def preprocess_one(self, request: dict, topk: object = None) -> tuple[np.ndarray, int]:
        """One request's image as a CHW array and its k, or :class:`InputError`.

        k comes from ``topk`` (a header), else a ``topk`` request field, else the default.
        """
        body = request_image(request)
        if len(body) > self.max_body_bytes:  # under the frontend's max_request_size: a 413
            raise BodyTooLarge(f"request body is {len(body)} bytes, over the limit of "
                               f"{self.max_body_bytes}")
        k = self.predictor.parse_topk(request.get("topk") if topk is None else topk)
        return self.predictor.decode(body), k

    def handle(self, data: list[dict], context) -> list[str]:
        """TorchServe's entry point: a batch of requests in, one answer per request out."""
        answers: list[str | None] = [None] * len(data)
        good, arrays, ks = [], [], []
        for idx, request in enumerate(data):
            try:
                array, k = self.preprocess_one(request or {}, _topk_header(context, idx))
            except Exception as e:  # noqa: BLE001 - whatever one image raises is its answer
                answers[idx] = _refuse(context, idx, e)
                continue
            good.append(idx)
            arrays.append(array)
            ks.append(k)
        if not good:
            return answers
        try:
            logits = self.predictor.infer(np.stack(arrays))
        except Exception as e:  # noqa: BLE001 - each request of the batch gets the 500
            for idx in good:
                answers[idx] = _refuse(context, idx, e)
            return answers
        for idx, row, k in zip(good, logits, ks):
            try:
                answer = self.predictor.encode(row, k)
            except Exception as e:  # noqa: BLE001 - that request's own 500
                answers[idx] = _refuse(context, idx, e)
                continue
            answers[idx] = to_json(answer)
            _set_json(context, idx)
            try:
                self.log_prediction(context, idx, answer, data[idx])
            except Exception:  # the answer stands; the log is not the client's problem
                log.exception("request %d: could not log the prediction", idx)
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


def decode_budget(handler_config: dict) -> DecodeBudget:
    """The decode budget from the model config's ``handler:`` section (``max_pixels``,
    ``max_jpeg_scans``, ``decode_timeout_s``; 0 for no time limit), else the defaults."""
    timeout = handler_config.get("decode_timeout_s")
    return DecodeBudget(
        max_pixels=int(handler_config.get("max_pixels") or DEFAULT_MAX_PIXELS),
        max_jpeg_scans=int(handler_config.get("max_jpeg_scans") or DEFAULT_MAX_JPEG_SCANS),
        timeout_s=DEFAULT_DECODE_TIMEOUT_S if timeout is None else float(timeout) or None)


def _refuse(context, idx: int, error: Exception) -> str:
    """Answer request ``idx`` alone with ``error``'s status and JSON body: a client error as
    it is, anything else as a 500 (logged with its traceback)."""
    if isinstance(error, ServingError) and error.status < 500:
        log.info("request %d rejected: %s %s", idx, error.status, error.message)
    else:
        log.error("request %d failed", idx, exc_info=error)
        if not isinstance(error, ServingError):
            error = InternalError(f"internal error: {type(error).__name__}")
    try:
        phrase = http.HTTPStatus(error.status).phrase
    except ValueError:
        phrase = error.type
    context.set_response_status(error.status, phrase, idx)
    _set_json(context, idx)
    return json.dumps(error.to_dict())


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
