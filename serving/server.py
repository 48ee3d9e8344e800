"""The fallback HTTP server: TorchServe's inference API and KServe v2 on ONNX Runtime.

``create_app(predictors, config)`` builds a FastAPI app that serves one or more
:class:`~serving.predictor.Predictor` (several models, several versions of one model).
Requests for one model version are gathered by a :class:`Batcher` into ONNX batches of up to
``max_batch_size``; decoding and preprocessing run in a thread pool off the event loop, in
parallel with inference, which runs in a thread of its own per model version.

Every client error is a 4xx ``{"code", "type", "message"}`` like TorchServe's; an overloaded
server answers 503 with ``Retry-After`` instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import struct
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.metrics import ServerMetrics, start_metrics_server
from serving.postprocess import parse_topk, softmax
from serving.predictor import Predictor, default_threads
from serving.preprocess import DEFAULT_MAX_PIXELS, InputError, preprocess_bytes

log = logging.getLogger("serving.server")
access_log = logging.getLogger("serving.access")

V2_BYTES_INPUT = "image"
V2_OUTPUTS = ("probabilities", "label")
_MULTIPART_FIELDS = ("data", "body", "file")


@dataclass(frozen=True)
class ServerConfig:
    """Batching, limits and threads; the defaults are the measured choices (see README)."""

    max_batch_size: int = 8
    max_batch_delay_ms: float = 5.0
    max_queue: int = 64  # requests admitted per model version: preprocessing + queued + running
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    request_timeout_s: float = 30.0
    preprocess_threads: int = field(default_factory=default_threads)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 8082  # None: no metrics listener (the registry still counts)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_body_bytes", "max_pixels",
                     "preprocess_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_batch_delay_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError("max_batch_delay_ms must be >= 0 and request_timeout_s > 0")


class Overloaded(Exception):
    """The model's queue is full; the client should retry later (503 + Retry-After)."""


@dataclass
class _Item:
    array: np.ndarray
    future: asyncio.Future
    enqueued: float


class Batcher:
    """Gathers concurrent requests for one model version into ONNX batches.

    A batch starts as soon as the first image is queued. It waits up to
    ``max_batch_delay_ms`` for more only while other admitted requests are still being
    preprocessed, so a lone request never pays the delay; requests that queued up while the
    previous batch ran are taken at once, up to ``max_batch_size``.
    """

    def __init__(self, predictor: Predictor, config: ServerConfig,
                 metrics: ServerMetrics) -> None:
        self.predictor = predictor
        self.config = config
        self.labels = (predictor.name, predictor.version)
        self.metrics = metrics
        self.items: deque[_Item] = deque()
        self.admitted = 0
        self.preparing = 0
        self.wakeup = asyncio.Event()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"ort-{predictor.name}")
        self.task: asyncio.Task | None = None

    @contextlib.contextmanager
    def admission(self):
        """Count a request against ``max_queue`` for as long as it is being served."""
        if self.admitted >= self.config.max_queue:
            raise Overloaded(f"model {self.predictor.name} v{self.predictor.version} has "
                             f"{self.admitted} requests queued (max_queue="
                             f"{self.config.max_queue}); retry later")
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    @contextlib.contextmanager
    def preparing_one(self):
        """Mark a request as being preprocessed, so the batch being formed may wait for it."""
        self.preparing += 1
        try:
            yield
        finally:
            self.preparing -= 1
            self.wakeup.set()

    async def submit(self, array: np.ndarray) -> tuple[np.ndarray, int]:
        """Queue one CHW image; returns its logits row and the size of the batch it ran in."""
        future = asyncio.get_running_loop().create_future()
        self.items.append(_Item(array, future, time.perf_counter()))
        self.wakeup.set()
        return await future

    async def _next_batch(self) -> list[_Item]:
        while not self.items:
            self.wakeup.clear()
            await self.wakeup.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.max_batch_delay_ms / 1000
        while len(self.items) < self.config.max_batch_size and self.preparing > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch = []
        while self.items and len(batch) < self.config.max_batch_size:
            item = self.items.popleft()
            if not item.future.done():  # its client timed out or went away
                batch.append(item)
        return batch

    async def run(self) -> None:
        """Form batches and run them until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            start = time.perf_counter()
            for item in batch:
                self.metrics.queue_wait.labels(*self.labels).observe(start - item.enqueued)
            try:
                logits = await loop.run_in_executor(
                    self.executor, self.predictor.logits, np.stack([i.array for i in batch]))
            except Exception as e:  # a broken model must fail its requests, not the loop
                log.exception("inference failed for a batch of %d", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            self.metrics.inference.labels(*self.labels).observe(time.perf_counter() - start)
            self.metrics.batch_size.labels(*self.labels).observe(len(batch))
            for item, row in zip(batch, logits):
                if not item.future.done():
                    item.future.set_result((row, len(batch)))

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self, timeout: float) -> None:
        """Let admitted requests finish (up to ``timeout`` seconds), then stop the loop."""
        deadline = time.monotonic() + timeout
        while self.admitted and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=True)


def version_key(version: str) -> str:
    """``v3``, ``3`` and ``3.0`` all name version 3."""
    v = str(version).strip()
    v = v[1:] if v[:1] in ("v", "V") else v
    return v.removesuffix(".0")


class ModelTable:
    """The loaded models: name -> version -> Batcher, and each name's default version."""

    def __init__(self, predictors: list[Predictor]) -> None:
        if not predictors:
            raise ValueError("give at least one model to serve")
        self.versions: dict[str, dict[str, Predictor]] = {}
        for p in predictors:
            versions = self.versions.setdefault(p.name, {})
            key = version_key(p.version)
            if key in versions:
                raise ValueError(f"model {p.name} version {key} given twice "
                                 f"({versions[key].source} and {p.source})")
            versions[key] = p
        # The newest version answers /predictions/<model>, like `latest` in artifacts/.
        self.default = {name: max(v, key=lambda k: (k.isdigit(), int(k) if k.isdigit() else 0, k))
                        for name, v in self.versions.items()}

    def get(self, name: str, version: str | None = None) -> Predictor:
        """The predictor for a name and optional version, or a 404 InputError naming what is."""
        if name not in self.versions:
            raise InputError(f"Model not found: {name!r}; loaded models: "
                             f"{sorted(self.versions)}", 404, "ModelNotFoundException")
        if version is None or version == "":
            return self.versions[name][self.default[name]]
        key = version_key(version)
        if key not in self.versions[name]:
            raise InputError(f"Model version not found: {name!r} has no version {version!r}; "
                             f"loaded versions: {sorted(self.versions[name])}", 404,
                             "ModelVersionNotFoundException")
        return self.versions[name][key]

    def all(self) -> list[Predictor]:
        return [p for versions in self.versions.values() for p in versions.values()]


def _error_response(e: InputError, v2: bool = False, headers: dict | None = None) -> Response:
    body = e.to_dict()
    if v2:  # KServe v2 clients (tritonclient) read the message from "error"
        body["error"] = e.message
    return JSONResponse(body, status_code=e.status, headers=headers)


def _json_bytes(obj: object) -> Response:
    """JSON byte for byte as the TorchServe handler writes it (``json.dumps(answer)``)."""
    return Response(json.dumps(obj), media_type="application/json")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InputError(f"request body is {int(declared)} bytes, over the limit of {limit}",
                         413, "RequestEntityTooLarge")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(f"request body is over the limit of {limit} bytes", 413,
                             "RequestEntityTooLarge")
        chunks.append(chunk)
    return b"".join(chunks)


async def _image_from_request(request: Request, body: bytes) -> tuple[bytes, str | None]:
    """The image bytes of a raw body or of a multipart/form field (``data``, ``body``, ``file``),
    and the form's ``topk`` field if it has one."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        return body, None

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
    except Exception as e:  # malformed multipart: a client error, not a 500
        raise InputError(f"cannot parse the multipart body: {e}", 400,
                         "InvalidMultipart") from e
    try:
        topk = form.get("topk")
        fields = [f for f in form if f != "topk"]
        name = next((f for f in _MULTIPART_FIELDS if f in form),
                    fields[0] if len(fields) == 1 else None)
        if name is None:
            raise InputError(f"multipart body has fields {fields}; send the image in a field "
                             f"named 'data'", 400, "InvalidMultipart")
        value = form[name]
        data = await value.read() if hasattr(value, "read") else value.encode()
        return data, topk if isinstance(topk, str) else None
    finally:
        await form.close()


def create_app(predictors: list[Predictor], config: ServerConfig | None = None) -> FastAPI:
    """A FastAPI app serving ``predictors`` with TorchServe's inference API and KServe v2."""
    config = config or ServerConfig()
    models = ModelTable(predictors)
    metrics = ServerMetrics()
    pre_pool = ThreadPoolExecutor(config.preprocess_threads, thread_name_prefix="preprocess")
    batchers: dict[int, Batcher] = {}
    started = datetime.now(timezone.utc).isoformat(timespec="milliseconds")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for p in models.all():
            batchers[id(p)] = Batcher(p, config, metrics)
            batchers[id(p)].start()
        metrics_server = None
        if config.metrics_port is not None:
            metrics_server, _ = start_metrics_server(metrics, config.metrics_host,
                                                     config.metrics_port)
            app.state.metrics_port = metrics_server.server_port
            log.info("metrics on http://%s:%d/metrics", config.metrics_host,
                     metrics_server.server_port)
        try:
            yield
        finally:
            for b in batchers.values():
                await b.stop(config.request_timeout_s)
            pre_pool.shutdown(wait=False, cancel_futures=True)
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()

    app = FastAPI(title="food classifier (ONNX Runtime)", lifespan=lifespan)
    app.state.metrics = metrics
    app.state.models = models
    app.state.config = config

    @app.exception_handler(InputError)
    async def input_error(request: Request, e: InputError) -> Response:
        return _error_response(e, v2=request.url.path.startswith("/v2/"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        kind = {404: "ResourceNotFoundException", 405: "MethodNotAllowedException"}
        message = ("Requested resource is not found, please refer to API document."
                   if e.status_code == 404 else str(e.detail))
        return _error_response(InputError(message, e.status_code,
                                          kind.get(e.status_code, "BadRequestException")),
                               v2=request.url.path.startswith("/v2/"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> Response:
        return _error_response(InputError(f"invalid request: {e.errors()}", 400,
                                          "BadRequestException"))

    async def infer_arrays(predictor: Predictor, arrays: list[np.ndarray]
                           ) -> list[tuple[np.ndarray, int]]:
        batcher = batchers[id(predictor)]
        return list(await asyncio.gather(*(batcher.submit(a) for a in arrays)))

    async def infer_images(predictor: Predictor, images: list[bytes]
                           ) -> list[tuple[np.ndarray, int]]:
        """Decode + preprocess off the loop, then queue each image for a batch."""
        loop = asyncio.get_running_loop()
        batcher = batchers[id(predictor)]

        async def one(data: bytes) -> tuple[np.ndarray, int]:
            with batcher.preparing_one():
                start = time.perf_counter()
                array = await loop.run_in_executor(pre_pool, preprocess_bytes, data,
                                                   predictor.spec, config.max_pixels)
                metrics.preprocess.labels(predictor.name, predictor.version).observe(
                    time.perf_counter() - start)
            return await batcher.submit(array)

        return list(await asyncio.gather(*(one(d) for d in images)))

    async def served(request: Request, name: str, version: str | None, work, v2: bool = False
                     ) -> Response:
        """Run ``work(predictor)`` under admission, timeout, metrics and the access log."""
        start = time.perf_counter()
        metrics.in_flight.inc()
        labels, batch = ("unknown", ""), 0
        try:
            predictor = models.get(name, version)
            labels = (predictor.name, predictor.version)
            with batchers[id(predictor)].admission():
                response, batch = await asyncio.wait_for(work(predictor),
                                                         config.request_timeout_s)
        except InputError as e:
            response = _error_response(e, v2)
        except Overloaded as e:
            response = _error_response(InputError(str(e), 503, "ServiceUnavailableException"),
                                       v2, headers={"Retry-After": "1"})
        except asyncio.TimeoutError:
            response = _error_response(InputError(
                f"no answer within {config.request_timeout_s}s; the server is overloaded",
                504, "RequestTimeout"), v2)
        except Exception:
            log.exception("internal error on %s", request.url.path)
            response = _error_response(InputError("internal server error", 500,
                                                  "InternalServerException"), v2)
        finally:
            metrics.in_flight.dec()
        status = response.status_code
        elapsed = time.perf_counter() - start
        metrics.requests.labels(*labels, str(status)).inc()
        if status < 400 or labels[0] != "unknown":
            metrics.latency.labels(*labels).observe(elapsed)
        access_log.info(json.dumps({
            "method": request.method, "path": request.url.path, "model": labels[0],
            "version": labels[1], "status": status, "latency_ms": round(elapsed * 1000, 2),
            "batch_size": batch,
            **({"error": json.loads(response.body)["message"]} if status >= 400 else {})}))
        return response

    # ---- TorchServe inference API -------------------------------------------------------

    @app.get("/ping")
    async def ping() -> dict:
        return {"status": "Healthy"}

    @app.get("/models")
    async def list_models() -> dict:
        return {"models": [{"modelName": name, "modelUrl": models.get(name).source}
                           for name in sorted(models.versions)]}

    def describe(p: Predictor) -> dict:
        return {"modelName": p.name, "modelVersion": p.version, "modelUrl": p.source,
                "runtime": "onnxruntime", "minWorkers": 1, "maxWorkers": 1,
                "batchSize": config.max_batch_size, "maxBatchDelay": config.max_batch_delay_ms,
                "responseTimeout": config.request_timeout_s, "maxQueue": config.max_queue,
                "loadedAtStartup": True,
                "isDefault": version_key(p.version) == models.default[p.name],
                "labels": p.labels, "preprocessing": p.spec.to_dict(), "topk": p.default_topk,
                "workers": [{"id": "onnxruntime", "startTime": started, "status": "READY",
                             "threads": p.session.get_session_options().intra_op_num_threads,
                             "gpu": False}]}

    @app.get("/models/{name}")
    async def describe_model(name: str) -> list:
        return [describe(models.get(name))]

    @app.get("/models/{name}/{version}")
    async def describe_version(name: str, version: str) -> list:
        if version == "all":
            models.get(name)
            return [describe(p) for p in models.versions[name].values()]
        return [describe(models.get(name, version))]

    async def predictions(request: Request, name: str, version: str | None) -> Response:
        async def work(predictor: Predictor) -> tuple[Response, int]:
            body = await _read_body(request, config.max_body_bytes)
            data, form_topk = await _image_from_request(request, body)
            # ?topk= first; TorchServe drops query strings before its handler, so the
            # X-TopK header and a multipart "topk" field work on both servers.
            requested = request.query_params.get("topk") or request.headers.get("x-topk") \
                or form_topk
            try:
                k = parse_topk(requested, predictor.default_topk, len(predictor.labels))
            except ValueError as e:
                raise InputError(str(e), 400, "InvalidTopK") from e
            [(row, batch)] = await infer_images(predictor, [data])
            return _json_bytes([p.to_dict() for p in predictor.answer(row, k)]), batch

        return await served(request, name, version, work)

    # curl -T sends PUT; TorchServe accepts both.
    @app.api_route("/predictions/{name}", methods=["POST", "PUT"])
    async def predict_default(request: Request, name: str) -> Response:
        return await predictions(request, name, None)

    @app.api_route("/predictions/{name}/{version}", methods=["POST", "PUT"])
    async def predict_version(request: Request, name: str, version: str) -> Response:
        return await predictions(request, name, version)

    # ---- KServe v2 / Open Inference Protocol ------------------------------------------

    @app.get("/v2")
    async def v2_server() -> dict:
        return {"name": "food-onnx-server", "version": "2",
                "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def v2_live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def v2_ready() -> dict:
        return {"ready": True}

    def v2_metadata(p: Predictor) -> dict:
        c = p.spec.crop_size
        return {"name": p.name, "versions": sorted(models.versions[p.name]),
                "platform": "onnxruntime_onnx",
                "inputs": [{"name": V2_BYTES_INPUT, "datatype": "BYTES", "shape": [-1]},
                           {"name": p.input_name, "datatype": "FP32",
                            "shape": [-1, 3, c, c]}],
                "outputs": [{"name": "probabilities", "datatype": "FP32",
                             "shape": [-1, len(p.labels)]},
                            {"name": "label", "datatype": "BYTES", "shape": [-1]}]}

    @app.get("/v2/models/{name}")
    async def v2_model(name: str) -> dict:
        return v2_metadata(models.get(name))

    @app.get("/v2/models/{name}/versions/{version}")
    async def v2_model_version(name: str, version: str) -> dict:
        return v2_metadata(models.get(name, version))

    @app.get("/v2/models/{name}/ready")
    async def v2_model_ready(name: str) -> dict:
        return {"name": models.get(name).name, "ready": True}

    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def v2_model_version_ready(name: str, version: str) -> dict:
        p = models.get(name, version)
        return {"name": p.name, "version": p.version, "ready": True}

    async def v2_infer(request: Request, name: str, version: str | None) -> Response:
        async def work(predictor: Predictor) -> tuple[Response, int]:
            body = await _read_body(request, config.max_body_bytes)
            req, buffers = _parse_v2_request(request, body)
            images, tensor = _v2_inputs(req, buffers, predictor)
            if images is not None:
                results = await infer_images(predictor, images)
            else:
                results = await infer_arrays(predictor, list(tensor))
            logits = np.stack([row for row, _ in results])
            batch = max(b for _, b in results)
            return _v2_response(req, predictor, logits), batch

        return await served(request, name, version, work, v2=True)

    @app.post("/v2/models/{name}/infer")
    async def v2_infer_default(request: Request, name: str) -> Response:
        return await v2_infer(request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer_version(request: Request, name: str, version: str) -> Response:
        return await v2_infer(request, name, version)

    return app


def _bad_v2(message: str) -> InputError:
    return InputError(message, 400, "InvalidInferenceRequest")


def _parse_v2_request(request: Request, body: bytes) -> tuple[dict, bytes]:
    """The JSON header and the binary tail (binary tensor data extension) of a v2 request."""
    header_length = request.headers.get("inference-header-content-length")
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise _bad_v2(f"Inference-Header-Content-Length={header_length!r} does not fit "
                          f"a body of {len(body)} bytes")
        head, buffers = body[:int(header_length)], body[int(header_length):]
    else:
        head, buffers = body, b""
    try:
        req = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad_v2(f"the inference request is not JSON: {e}") from e
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise _bad_v2("the inference request needs a non-empty 'inputs' list")
    return req, buffers


def _deserialize_bytes(raw: bytes) -> list[bytes]:
    """Triton's BYTES wire format: each element is a little-endian uint32 length + bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise _bad_v2("truncated BYTES tensor in the binary data")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise _bad_v2("truncated BYTES tensor in the binary data")
        out.append(raw[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def _v2_inputs(req: dict, buffers: bytes, predictor: Predictor
               ) -> tuple[list[bytes] | None, np.ndarray | None]:
    """Encoded images (a BYTES input) or an N x 3 x H x W tensor (an FP32 input)."""
    offset = 0
    tensors = []
    for spec in req["inputs"]:
        if not isinstance(spec, dict) or "datatype" not in spec or "shape" not in spec:
            raise _bad_v2("each input needs 'name', 'datatype', 'shape' and data")
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(buffers):
                raise _bad_v2(f"input {spec.get('name')!r}: binary_data_size={size!r} runs "
                              f"past the {len(buffers)} bytes of binary data")
            tensors.append((spec, buffers[offset:offset + size], True))
            offset += size
        elif "data" in spec:
            tensors.append((spec, spec["data"], False))
        else:
            raise _bad_v2(f"input {spec.get('name')!r} has neither 'data' nor binary data")
    if len(tensors) != 1:
        raise _bad_v2(f"send exactly one input: BYTES {V2_BYTES_INPUT!r} (encoded images) or "
                      f"FP32 {predictor.input_name!r} (N x 3 x H x W); got {len(tensors)}")
    spec, data, binary = tensors[0]
    datatype = spec["datatype"]
    if datatype == "BYTES":
        if binary:
            images = _deserialize_bytes(data)
        else:
            flat = np.asarray(data, dtype=object).ravel().tolist()
            try:
                images = [base64.b64decode(s, validate=True) for s in flat]
            except (binascii.Error, TypeError, ValueError) as e:
                raise _bad_v2("BYTES input in JSON must hold base64-encoded image files") from e
        if not images:
            raise _bad_v2("BYTES input holds no images")
        return images, None
    if datatype == "FP32":
        c = predictor.spec.crop_size
        try:
            if binary:
                tensor = np.frombuffer(data, dtype="<f4").astype(np.float32)
            else:
                tensor = np.asarray(data, dtype=np.float32)
            tensor = tensor.reshape([int(d) for d in spec["shape"]])
        except (ValueError, TypeError) as e:
            raise _bad_v2(f"FP32 input does not match its shape {spec['shape']}: {e}") from e
        if tensor.ndim != 4 or tensor.shape[1:] != (3, c, c) or tensor.shape[0] < 1:
            raise _bad_v2(f"FP32 input must be N x 3 x {c} x {c} (preprocessed), got "
                          f"{list(tensor.shape)}")
        if not np.isfinite(tensor).all():
            raise _bad_v2("FP32 input holds NaN or infinity")
        return None, tensor
    raise _bad_v2(f"input datatype {datatype!r} is not supported; use BYTES (encoded images) "
                  f"or FP32 (preprocessed N x 3 x H x W)")


def _v2_response(req: dict, predictor: Predictor, logits: np.ndarray) -> Response:
    """The v2 answer: probabilities (FP32 N x C) and the top-1 label (BYTES N)."""
    probs = softmax(logits).astype(np.float32)
    labels = [predictor.labels[i] for i in np.argmax(logits, axis=1)]
    wanted = req.get("outputs") or [{"name": n} for n in V2_OUTPUTS]
    binary_default = bool((req.get("parameters") or {}).get("binary_data_output", False))
    outputs, tail = [], []
    for out in wanted:
        name = out.get("name") if isinstance(out, dict) else None
        if name not in V2_OUTPUTS:
            raise _bad_v2(f"unknown output {name!r}; available: {list(V2_OUTPUTS)}")
        binary = bool((out.get("parameters") or {}).get("binary_data", binary_default))
        if name == "probabilities":
            entry = {"name": name, "datatype": "FP32", "shape": list(probs.shape)}
            raw = probs.astype("<f4").tobytes()
            values = [float(x) for x in probs.ravel()]
        else:
            entry = {"name": name, "datatype": "BYTES", "shape": [len(labels)]}
            raw = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in labels)
            values = labels
        if binary:
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = values
        outputs.append(entry)
    answer = {"model_name": predictor.name, "model_version": predictor.version,
              "outputs": outputs}
    if "id" in req:
        answer["id"] = req["id"]
    head = json.dumps(answer).encode()
    if not tail:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(tail), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})
