"""TorchServe's inference API: ``/ping``, ``/models``, ``/predictions/<model>[/<version>]``.

Thin over the data plane: parse the body and the top-k, ask for the answer, render the
JSON exactly as the TorchServe handler writes it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serving.errors import InputError
from serving.http.dataplane import DataPlane, ModelEntry
from serving.http.dependencies import DataPlaneDep, read_body
from serving.predictor import to_json

router = APIRouter()

_MULTIPART_FIELDS = ("data", "body", "file")


@router.get("/ping")
async def ping() -> dict:
    return {"status": "Healthy"}


@router.get("/models")
async def list_models(dataplane: DataPlaneDep) -> dict:
    models = dataplane.models
    return {"models": [{"modelName": name, "modelUrl": public_url(models.get(name).predictor)}
                       for name in sorted(models.versions)]}


def public_url(predictor) -> str:
    """What a version was loaded from, without the filesystem around it: the file or
    directory name (``food.mar``, ``v3``, as TorchServe shows a .mar's name), or the
    ``models:/`` URI as given. The inference port may face the network; paths do not."""
    source = str(predictor.source)
    return source if ":/" in source else Path(source).name


def describe(dataplane: DataPlane, entry: ModelEntry) -> dict:
    """One version as TorchServe's ``describe model`` shows it, plus labels and spec."""
    p, config = entry.predictor, dataplane.config
    return {"modelName": p.name, "modelVersion": p.version, "modelUrl": public_url(p),
            "runtime": p.runtime, "minWorkers": p.streams, "maxWorkers": p.streams,
            "batchSize": config.max_batch_size, "maxBatchDelay": config.max_batch_delay_ms,
            "responseTimeout": config.request_timeout_s, "maxQueue": config.max_queue,
            "loadedAtStartup": True, "isDefault": dataplane.models.is_default(entry),
            "labels": p.labels, "preprocessing": p.spec.to_dict(), "topk": p.default_topk,
            "workers": [{"id": f"{p.runtime}-{i}", "startTime": dataplane.started,
                         "status": "READY", "threads": p.threads // p.streams, "gpu": False}
                        for i in range(p.streams)]}


@router.get("/models/{name}")
async def describe_model(name: str, dataplane: DataPlaneDep) -> list:
    return [describe(dataplane, dataplane.models.get(name))]


@router.get("/models/{name}/{version}")
async def describe_version(name: str, version: str, dataplane: DataPlaneDep) -> list:
    if version == "all":
        return [describe(dataplane, e) for e in dataplane.models.of(name)]
    return [describe(dataplane, dataplane.models.get(name, version))]


def text_field_bytes(content_type: str, body: bytes, name: str) -> bytes:
    """The bytes of multipart text field ``name`` exactly as sent: ``curl -F 'data=<pizza.jpg'``
    sends the image as a text field, which starlette's form hands over decoded (UTF-8, else
    latin-1); python-multipart, which starlette parses with, keeps them as bytes."""
    import python_multipart

    found: list[bytes] = []

    def on_field(field) -> None:
        if field.field_name == name.encode() and not found:
            found.append(bytes(field.value or b""))

    parser = python_multipart.create_form_parser(
        {"Content-Type": content_type.encode("latin-1")}, on_field, None,
        config={"MAX_MEMORY_FILE_SIZE": len(body) + 1, "MAX_BODY_SIZE": len(body) + 1})
    parser.write(body)
    parser.finalize()
    return found[0] if found else b""


async def _image_and_form_topk(request: Request, body: bytes) -> tuple[bytes, str | None]:
    """The image bytes of a raw body or of a multipart/form field (``data``, ``body``,
    ``file``), and the form's ``topk`` field if it has one."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        return body, None

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        # a text field may carry the image (curl -F 'data=<pizza.jpg'): up to the body limit
        form = await Request(request.scope, replay).form(max_files=4, max_fields=16,
                                                          max_part_size=max(1, len(body)))
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
        data = (await value.read() if hasattr(value, "read")
                else text_field_bytes(content_type, body, name))
        return data, topk if isinstance(topk, str) else None
    finally:
        await form.close()


async def _predict(request: Request, dataplane: DataPlane, name: str,
                   version: str | None) -> Response:
    async def work(entry: ModelEntry) -> tuple[Response, int]:
        body = await read_body(request, dataplane.config.max_body_bytes)
        data, form_topk = await _image_and_form_topk(request, body)
        # ?topk= first; TorchServe drops query strings before its handler, so the
        # X-TopK header and a multipart "topk" field work on both servers.
        k = entry.predictor.parse_topk(request.query_params.get("topk")
                                       or request.headers.get("x-topk") or form_topk)
        predictions, batch = await dataplane.predict(entry, data, k)
        # The id goes in a header, so the JSON body stays exactly TorchServe's.
        prediction_id = dataplane.log_prediction(entry, predictions, data)
        headers = {"X-Prediction-Id": prediction_id} if prediction_id else None
        return Response(to_json(predictions), media_type="application/json",
                        headers=headers), batch

    return await dataplane.serve(name, version, work, method=request.method,
                                 path=request.url.path)


# curl -T sends PUT; TorchServe accepts both.
@router.api_route("/predictions/{name}", methods=["POST", "PUT"])
async def predict_default(request: Request, name: str, dataplane: DataPlaneDep) -> Response:
    return await _predict(request, dataplane, name, None)


@router.api_route("/predictions/{name}/{version}", methods=["POST", "PUT"])
async def predict_version(request: Request, name: str, version: str,
                          dataplane: DataPlaneDep) -> Response:
    return await _predict(request, dataplane, name, version)
