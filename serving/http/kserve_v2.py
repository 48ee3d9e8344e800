"""KServe v2 / Open Inference Protocol: health, metadata and ``/v2/models/<m>/infer``.

Request and response bodies are the protocol's pydantic models. A request sends one input:
BYTES ``image`` (encoded image files; base64 in JSON, raw with the binary tensor data
extension, as tritonclient sends them) or FP32 ``input`` (preprocessed N x 3 x H x W). The
answer holds ``probabilities`` (FP32 N x C) and the top-1 ``label`` (BYTES N), in JSON or
as binary data when asked.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.errors import InputError
from serving.http.dataplane import DataPlane, ModelEntry
from serving.http.dependencies import DataPlaneDep, read_body

router = APIRouter(prefix="/v2")

BYTES_INPUT = "image"
OUTPUTS = ("probabilities", "label")


class RequestInput(BaseModel):
    name: str | None = None
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    id: str | int | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list | None = None


class InferenceResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    outputs: list[ResponseOutput]
    id: str | int | None = None


def _bad(message: str) -> InputError:
    return InputError(message, 400, "InvalidInferenceRequest")


@router.get("")
async def server_metadata() -> dict:
    return {"name": "food-onnx-server", "version": "2", "extensions": ["binary_tensor_data"]}


@router.get("/health/live")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready")
async def ready() -> dict:
    return {"ready": True}


def model_metadata(dataplane: DataPlane, entry: ModelEntry) -> dict:
    p = entry.predictor
    c = p.spec.crop_size
    return {"name": p.name, "versions": sorted(dataplane.models.versions[p.name]),
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": BYTES_INPUT, "datatype": "BYTES", "shape": [-1]},
                       {"name": p.input_name, "datatype": "FP32", "shape": [-1, 3, c, c]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32",
                         "shape": [-1, len(p.labels)]},
                        {"name": "label", "datatype": "BYTES", "shape": [-1]}]}


@router.get("/models/{name}")
async def model(name: str, dataplane: DataPlaneDep) -> dict:
    return model_metadata(dataplane, dataplane.models.get(name))


@router.get("/models/{name}/versions/{version}")
async def model_version(name: str, version: str, dataplane: DataPlaneDep) -> dict:
    return model_metadata(dataplane, dataplane.models.get(name, version))


@router.get("/models/{name}/ready")
async def model_ready(name: str, dataplane: DataPlaneDep) -> dict:
    return {"name": dataplane.models.get(name).predictor.name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready")
async def model_version_ready(name: str, version: str, dataplane: DataPlaneDep) -> dict:
    p = dataplane.models.get(name, version).predictor
    return {"name": p.name, "version": p.version, "ready": True}


def parse_request(request: Request, body: bytes) -> tuple[InferenceRequest, bytes]:
    """The JSON header and the binary tail (binary tensor data extension) of a request."""
    header_length = request.headers.get("inference-header-content-length")
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise _bad(f"Inference-Header-Content-Length={header_length!r} does not fit "
                       f"a body of {len(body)} bytes")
        head, buffers = body[:int(header_length)], body[int(header_length):]
    else:
        head, buffers = body, b""
    try:
        return InferenceRequest.model_validate_json(head), buffers
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                             for err in e.errors())
        raise _bad(f"invalid inference request: {problems}") from None


def _deserialize_bytes(raw: bytes) -> list[bytes]:
    """Triton's BYTES wire format: each element is a little-endian uint32 length + bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise _bad("truncated BYTES tensor in the binary data")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise _bad("truncated BYTES tensor in the binary data")
        out.append(raw[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def request_inputs(req: InferenceRequest, buffers: bytes, entry: ModelEntry
                   ) -> tuple[list[bytes] | None, np.ndarray | None]:
    """Encoded images (a BYTES input) or an N x 3 x H x W tensor (an FP32 input)."""
    offset = 0
    tensors = []
    for spec in req.inputs:
        size = (spec.parameters or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(buffers):
                raise _bad(f"input {spec.name!r}: binary_data_size={size!r} runs past the "
                           f"{len(buffers)} bytes of binary data")
            tensors.append((spec, buffers[offset:offset + size], True))
            offset += size
        elif spec.data is not None:
            tensors.append((spec, spec.data, False))
        else:
            raise _bad(f"input {spec.name!r} has neither 'data' nor binary data")
    predictor = entry.predictor
    if len(tensors) != 1:
        raise _bad(f"send exactly one input: BYTES {BYTES_INPUT!r} (encoded images) or "
                   f"FP32 {predictor.input_name!r} (N x 3 x H x W); got {len(tensors)}")
    spec, data, binary = tensors[0]
    if spec.datatype == "BYTES":
        if binary:
            images = _deserialize_bytes(data)
        else:
            flat = np.asarray(data, dtype=object).ravel().tolist()
            try:
                images = [base64.b64decode(s, validate=True) for s in flat]
            except (binascii.Error, TypeError, ValueError) as e:
                raise _bad("BYTES input in JSON must hold base64-encoded image files") from e
        if not images:
            raise _bad("BYTES input holds no images")
        return images, None
    if spec.datatype == "FP32":
        c = predictor.spec.crop_size
        try:
            if binary:
                tensor = np.frombuffer(data, dtype="<f4").astype(np.float32)
            else:
                tensor = np.asarray(data, dtype=np.float32)
            tensor = tensor.reshape(spec.shape)
        except (ValueError, TypeError) as e:
            raise _bad(f"FP32 input does not match its shape {spec.shape}: {e}") from e
        if tensor.ndim != 4 or tensor.shape[1:] != (3, c, c) or tensor.shape[0] < 1:
            raise _bad(f"FP32 input must be N x 3 x {c} x {c} (preprocessed), got "
                       f"{list(tensor.shape)}")
        if not np.isfinite(tensor).all():
            raise _bad("FP32 input holds NaN or infinity")
        return None, tensor
    raise _bad(f"input datatype {spec.datatype!r} is not supported; use BYTES (encoded "
               f"images) or FP32 (preprocessed N x 3 x H x W)")


def render(req: InferenceRequest, entry: ModelEntry, logits: np.ndarray) -> Response:
    """The answer: probabilities (FP32 N x C) and the top-1 label (BYTES N), from the
    Predictor's encode stage."""
    predictor = entry.predictor
    probabilities = predictor.probabilities(logits)
    labels = [predictor.rank(row, 1)[0].label for row in probabilities]
    probs = probabilities.astype(np.float32)
    wanted = req.outputs or [RequestOutput(name=n) for n in OUTPUTS]
    binary_default = bool((req.parameters or {}).get("binary_data_output", False))
    outputs, tail = [], []
    for out in wanted:
        if out.name not in OUTPUTS:
            raise _bad(f"unknown output {out.name!r}; available: {list(OUTPUTS)}")
        binary = bool((out.parameters or {}).get("binary_data", binary_default))
        if out.name == "probabilities":
            entry_out = ResponseOutput.model_construct(name=out.name, datatype="FP32",
                                                       shape=list(probs.shape))
            raw = probs.astype("<f4").tobytes()
            values = [float(x) for x in probs.ravel()]
        else:
            entry_out = ResponseOutput.model_construct(name=out.name, datatype="BYTES",
                                                       shape=[len(labels)])
            raw = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in labels)
            values = labels
        if binary:
            entry_out.parameters = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry_out.data = values
        outputs.append(entry_out)
    answer = InferenceResponse.model_construct(model_name=predictor.name,
                                               model_version=predictor.version,
                                               outputs=outputs, id=req.id)
    head = json.dumps(answer.model_dump(exclude_none=True)).encode()
    if not tail:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(tail), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


async def _infer(request: Request, dataplane: DataPlane, name: str,
                 version: str | None) -> Response:
    async def work(entry: ModelEntry) -> tuple[Response, int]:
        body = await read_body(request, dataplane.config.max_body_bytes)
        req, buffers = parse_request(request, body)
        images, tensor = request_inputs(req, buffers, entry)
        if images is not None:
            results = await dataplane.infer_images(entry, images)
        else:
            results = await dataplane.infer_arrays(entry, list(tensor))
        logits = np.stack([row for row, _ in results])
        return render(req, entry, logits), max(b for _, b in results)

    return await dataplane.serve(name, version, work, method=request.method,
                                 path=request.url.path)


@router.post("/models/{name}/infer")
async def infer(request: Request, name: str, dataplane: DataPlaneDep) -> Response:
    return await _infer(request, dataplane, name, None)


@router.post("/models/{name}/versions/{version}/infer")
async def infer_version(request: Request, name: str, version: str,
                        dataplane: DataPlaneDep) -> Response:
    return await _infer(request, dataplane, name, version)
