"""KServe v2 / Open Inference Protocol: health, metadata and ``/v2/models/<m>/infer``.

Request and response bodies are the protocol's pydantic models, and every request is
validated here, at the edge, before any image is decoded: one input, a ``shape`` that agrees
with the data, at most ``max_batch_size`` images (Triton's rule), known outputs. A request
sends one input: BYTES ``image`` (encoded image files; base64 in JSON, raw with the binary
tensor data extension, as tritonclient sends them) or FP32 ``input`` (preprocessed
N x 3 x H x W). The answer holds ``probabilities`` (FP32 N x C) and the top-1 ``label``
(BYTES N), or any outputs asked for, the ONNX graph's own (``logits``, FP32 N x C) included,
in JSON or as binary data when asked.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.errors import InputError
from serving.http.dataplane import DataPlane, ModelEntry
from serving.http.dependencies import DataPlaneDep, read_body
from serving.predictor import Predictor

router = APIRouter(prefix="/v2")

BYTES_INPUT = "image"
DERIVED_OUTPUTS = ("probabilities", "label")  # answered by default, in this order
MAX_DIMS = 8

Dim = Annotated[int, Field(ge=0, le=2**31 - 1)]


class RequestInput(BaseModel):
    name: str | None = None
    shape: list[Dim] = Field(min_length=1, max_length=MAX_DIMS)
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


# KServe's platform names for the engines that run a variant (serving.engines).
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino"}


def output_names(predictor: Predictor) -> tuple[str, ...]:
    """What a request may ask for: our derived outputs and the ONNX graph's own."""
    return (*DERIVED_OUTPUTS, predictor.output_name)


def model_metadata(dataplane: DataPlane, entry: ModelEntry) -> dict:
    p = entry.predictor
    c = p.spec.crop_size
    return {"name": p.name, "versions": sorted(dataplane.models.versions[p.name]),
            "platform": PLATFORMS.get(p.runtime.split("-")[0], p.runtime),
            "inputs": [{"name": BYTES_INPUT, "datatype": "BYTES", "shape": [-1]},
                       {"name": p.input_name, "datatype": "FP32", "shape": [-1, 3, c, c]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32",
                         "shape": [-1, len(p.labels)]},
                        {"name": "label", "datatype": "BYTES", "shape": [-1]},
                        {"name": p.output_name, "datatype": "FP32",
                         "shape": [-1, len(p.labels)]}]}


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
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
        if not (header_length.isascii() and header_length.isdigit()) \
                or int(header_length) > len(body):
            raise _bad(f"Inference-Header-Content-Length={header_length[:40]!r} is not a "
                       f"byte count within the body's {len(body)} bytes")
        head, buffers = body[:int(header_length)], body[int(header_length):]
    else:
        head, buffers = body, b""
    try:
        return InferenceRequest.model_validate_json(head), buffers
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                             for err in e.errors()[:5])
        raise _bad(f"invalid inference request: {problems}") from None


def requested_outputs(req: InferenceRequest, predictor: Predictor) -> list[RequestOutput]:
    """The outputs asked for (default: probabilities and label), checked before inference."""
    available = output_names(predictor)
    wanted = req.outputs or [RequestOutput(name=n) for n in DERIVED_OUTPUTS]
    for i, out in enumerate(wanted):
        if out.name not in available:
            raise _bad(f"outputs.{i}.name: unknown output {out.name[:64]!r}; available: "
                       f"{list(available)}")
    return wanted


def _flatten(data: Any, depth: int, where: str) -> list:
    """Tensor data given flat or nested as its shape (as Triton takes it), as a flat list;
    at most ``depth`` levels of lists, so no nesting can run deeper than the shape."""
    if not isinstance(data, list):
        raise _bad(f"{where}: expected a list of values, got {type(data).__name__}")
    flat = data
    for _ in range(depth - 1):
        nested = [isinstance(x, list) for x in flat]
        if not any(nested):
            break
        if not all(nested):
            raise _bad(f"{where}: mixes lists and values at one level")
        flat = [y for x in flat for y in x]
    if any(isinstance(x, (list, dict)) for x in flat):
        raise _bad(f"{where}: nested deeper than its shape allows")
    return flat


def _deserialize_bytes(raw: bytes, count: int, where: str) -> list[bytes]:
    """Triton's BYTES wire format (little-endian uint32 length + bytes per element); exactly
    ``count`` elements filling ``raw``, read no further than that."""
    out, pos = [], 0
    while pos < len(raw):
        if len(out) == count:
            raise _bad(f"{where}: binary data holds more than the {count} elements of its "
                       f"shape")
        if pos + 4 > len(raw):
            raise _bad(f"{where}: truncated BYTES tensor in the binary data")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise _bad(f"{where}: truncated BYTES tensor in the binary data")
        out.append(raw[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def request_inputs(req: InferenceRequest, buffers: bytes, predictor: Predictor,
                   max_images: int) -> tuple[list[bytes] | None, np.ndarray | None]:
    """Encoded images (a BYTES input) or an N x 3 x H x W tensor (an FP32 input), each
    agreeing with its shape, with 1..``max_images`` images; InputError naming the field."""
    if len(req.inputs) != 1:
        raise _bad(f"inputs: send exactly one input: BYTES {BYTES_INPUT!r} (encoded images) "
                   f"or FP32 {predictor.input_name!r} (N x 3 x H x W); got {len(req.inputs)}")
    spec, where = req.inputs[0], "inputs.0"
    count = math.prod(spec.shape)
    size = (spec.parameters or {}).get("binary_data_size")
    if size is not None:
        if type(size) is not int or not 0 <= size <= len(buffers):
            raise _bad(f"{where}.parameters.binary_data_size={size!r}: not a byte count "
                       f"within the {len(buffers)} bytes of binary data")
        if size != len(buffers):
            raise _bad(f"{where}.parameters.binary_data_size={size} leaves "
                       f"{len(buffers) - size} bytes of binary data unused")
    elif spec.data is None:
        raise _bad(f"{where}: has neither 'data' nor binary data")
    elif buffers:
        raise _bad(f"{where}: 'data' is given, so the {len(buffers)} bytes of binary data "
                   f"after the JSON header belong to nothing")
    if spec.datatype == "BYTES":
        if not 1 <= count <= max_images:
            raise _bad(f"{where}.shape {spec.shape}: {count} images; a request may carry 1 to "
                       f"{max_images} (the model's max_batch_size)")
        if size is not None:
            images = _deserialize_bytes(buffers, count, where)
        else:
            flat = _flatten(spec.data, len(spec.shape), f"{where}.data")
            if not all(isinstance(s, str) for s in flat):
                raise _bad(f"{where}.data: BYTES input in JSON must hold base64-encoded image "
                           f"files (strings)")
            if len(flat) != count:
                raise _bad(f"{where}.shape {spec.shape} holds {count} elements but 'data' has "
                           f"{len(flat)}")
            try:
                images = [base64.b64decode(s, validate=True) for s in flat]
            except (binascii.Error, ValueError):
                raise _bad(f"{where}.data: BYTES input in JSON must hold base64-encoded "
                           f"image files") from None
        if len(images) != count:
            raise _bad(f"{where}.shape {spec.shape} holds {count} elements but the binary "
                       f"data has {len(images)}")
        return images, None
    if spec.datatype == "FP32":
        c = predictor.spec.crop_size
        n = spec.shape[0]
        if len(spec.shape) != 4 or spec.shape[1:] != [3, c, c] or not 1 <= n <= max_images:
            raise _bad(f"{where}.shape {spec.shape}: FP32 input must be N x 3 x {c} x {c} "
                       f"(preprocessed) with N from 1 to {max_images} (the model's "
                       f"max_batch_size)")
        if size is not None:
            if size != 4 * count:
                raise _bad(f"{where}.parameters.binary_data_size={size}: shape {spec.shape} "
                           f"needs {4 * count} bytes of FP32")
            tensor = np.frombuffer(buffers, dtype="<f4").astype(np.float32)
        else:
            flat = _flatten(spec.data, len(spec.shape), f"{where}.data")
            if len(flat) != count:
                raise _bad(f"{where}.shape {spec.shape} holds {count} elements but 'data' has "
                           f"{len(flat)}")
            if not all(type(x) in (int, float) for x in flat):
                raise _bad(f"{where}.data: FP32 input must hold numbers")
            tensor = np.asarray(flat, dtype=np.float32)
        tensor = tensor.reshape(spec.shape)
        if not np.isfinite(tensor).all():
            raise _bad(f"{where}.data: FP32 input holds NaN or infinity")
        return None, tensor
    raise _bad(f"{where}.datatype {spec.datatype[:32]!r} is not supported; use BYTES (encoded "
               f"images) or FP32 (preprocessed N x 3 x H x W)")


def render(req: InferenceRequest, wanted: list[RequestOutput], entry: ModelEntry,
           logits: np.ndarray) -> Response:
    """The answer: each wanted output (probabilities FP32 N x C, top-1 label BYTES N, the
    graph's logits FP32 N x C), from the Predictor's encode stage."""
    predictor = entry.predictor
    probabilities = predictor.probabilities(logits)
    binary_default = bool((req.parameters or {}).get("binary_data_output", False))
    outputs, tail = [], []
    for out in wanted:
        binary = bool((out.parameters or {}).get("binary_data", binary_default))
        if out.name == "label":
            labels = [predictor.rank(row, 1)[0].label for row in probabilities]
            entry_out = ResponseOutput.model_construct(name=out.name, datatype="BYTES",
                                                       shape=[len(labels)])
            raw = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in labels)
            values = labels
        else:
            array = (probabilities if out.name == "probabilities" else logits).astype(np.float32)
            entry_out = ResponseOutput.model_construct(name=out.name, datatype="FP32",
                                                       shape=list(array.shape))
            raw = array.astype("<f4").tobytes()
            values = [float(x) for x in array.ravel()]
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
        wanted = requested_outputs(req, entry.predictor)
        images, tensor = request_inputs(req, buffers, entry.predictor,
                                        dataplane.config.max_batch_size)
        if images is not None:
            results = await dataplane.infer_images(entry, images)
        else:
            results = await dataplane.infer_arrays(entry, list(tensor))
        logits = np.stack([row for row, _ in results])
        return render(req, wanted, entry, logits), max(b for _, b in results)

    return await dataplane.serve(name, version, work, method=request.method,
                                 path=request.url.path)


@router.post("/models/{name}/infer")
async def infer(request: Request, name: str, dataplane: DataPlaneDep) -> Response:
    return await _infer(request, dataplane, name, None)


@router.post("/models/{name}/versions/{version}/infer")
async def infer_version(request: Request, name: str, version: str,
                        dataplane: DataPlaneDep) -> Response:
    return await _infer(request, dataplane, name, version)
