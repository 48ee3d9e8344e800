"""TorchServe handler for the food classifier: image bytes in, top-k dishes out.

It follows TorchServe's handler contract (initialize, then handle -> preprocess, inference,
postprocess) without the stock vision handler, which imports captum and unpickles eager
models. The model is TorchScript (``model.ts``, torch.jit.load) or ONNX (``model.onnx``,
ONNX Runtime); neither format unpickles arbitrary objects.

Each request of a batch is answered on its own: a bad image gets its own 4xx status and the
JSON ``{"code", "type", "message"}`` body through ``context.set_response_status(code, phrase,
idx)``, while the good images of the same batch run through the model together.
"""

from __future__ import annotations

import http
import json
import logging
import os

import numpy as np

try:  # inside the .mar: the shared modules sit next to this file, at the top level
    import postprocess
    import preprocess
except ImportError:  # from the repository (tests): the same files in the serving package
    from serving import postprocess, preprocess

log = logging.getLogger(__name__)

JSON = "application/json"


class FoodHandler:
    """Classify food photos; one JSON answer (or one 4xx error) per request, in order."""

    def __init__(self) -> None:
        self.initialized = False
        self.model = None
        self.session = None
        self.labels: list[str] = []
        self.spec: preprocess.PreprocessSpec | None = None
        self.default_topk = 5
        self.max_pixels = preprocess.DEFAULT_MAX_PIXELS

    def initialize(self, context) -> None:
        """Read labels and the preprocessing spec from the model dir, then load the model."""
        model_dir = context.system_properties["model_dir"]
        with open(os.path.join(model_dir, "model_config.json")) as f:
            config = json.load(f)
        with open(os.path.join(model_dir, "index_to_name.json")) as f:
            index_to_name = json.load(f)
        self.labels = [index_to_name[str(i)] for i in range(len(index_to_name))]
        self.spec = preprocess.PreprocessSpec.from_dict(config["preprocessing"])

        yaml_config = getattr(context, "model_yaml_config", None) or {}
        handler_config = yaml_config.get("handler") or {}
        self.default_topk = int(handler_config.get("topk") or config.get("topk", 5))
        self.max_pixels = int(handler_config.get("max_pixels") or preprocess.DEFAULT_MAX_PIXELS)
        workers = int(yaml_config.get("maxWorkers") or yaml_config.get("minWorkers") or 1)
        threads = int(handler_config.get("threads") or max(1, (os.cpu_count() or 1) // workers))

        serialized = context.manifest["model"]["serializedFile"]
        model_path = os.path.join(model_dir, serialized)
        if serialized.endswith(".onnx"):
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            self.session = ort.InferenceSession(model_path, options,
                                                providers=["CPUExecutionProvider"])
        else:
            import torch

            torch.set_num_threads(threads)
            self.model = torch.jit.load(model_path, map_location="cpu").eval()
        log.info("loaded %s (%d classes, crop %d, %d threads for %d workers)", serialized,
                 len(self.labels), self.spec.crop_size, threads, workers)
        self.initialized = True

    def preprocess_one(self, request: dict, topk: object = None) -> tuple[np.ndarray, int]:
        """One request's image as a CHW array and its k, or :class:`preprocess.InputError`.

        k comes from ``topk`` (a header), else a ``topk`` request field, else the default.
        """
        body = next((request[key] for key in ("data", "body") if key in request), None)
        if body is None:
            body = b""
        if isinstance(body, (dict, list)):
            raise preprocess.InputError(
                "the body was parsed as JSON; send the image bytes (curl -T image.jpg ...)",
                415, "UnsupportedMediaType")
        if isinstance(body, str):
            body = body.encode("utf-8", "surrogateescape")
        try:
            k = postprocess.parse_topk(request.get("topk") if topk is None else topk,
                                       self.default_topk, len(self.labels))
        except ValueError as e:
            raise preprocess.InputError(str(e), 400, "InvalidTopK") from e
        array = preprocess.preprocess_bytes(bytes(body), self.spec, self.max_pixels)
        return array, k

    def inference(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> (N, C) logits, with whichever runtime was loaded."""
        if self.session is not None:
            return self.session.run(["logits"], {"input": batch})[0]
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(batch)).numpy()

    def postprocess(self, logits: np.ndarray, ks: list[int]) -> list[str]:
        """Each row's top-k as the JSON list of DESIGN.md."""
        probabilities = postprocess.softmax(logits)
        return [json.dumps(postprocess.topk(row, self.labels, k))
                for row, k in zip(probabilities, ks)]

    def handle(self, data: list[dict], context) -> list[str]:
        """TorchServe's entry point: a batch of requests in, one answer per request out."""
        answers: list[str | None] = [None] * len(data)
        good, arrays, ks = [], [], []
        for idx, request in enumerate(data):
            try:
                array, k = self.preprocess_one(request or {}, _topk_header(context, idx))
            except preprocess.InputError as e:
                log.info("request %d rejected: %s %s", idx, e.status, e.message)
                context.set_response_status(e.status, http.HTTPStatus(e.status).phrase, idx)
                answers[idx] = json.dumps(e.to_dict())
                _set_json(context, idx)
                continue
            good.append(idx)
            arrays.append(array)
            ks.append(k)
        if good:
            logits = self.inference(np.stack(arrays))
            for idx, answer in zip(good, self.postprocess(logits, ks)):
                answers[idx] = answer
                _set_json(context, idx)
        return answers


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
