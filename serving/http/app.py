"""The FastAPI app of the fallback server: routers, lifespan, and the one error mapping.

``create_app(predictors, config)`` serves one or more :class:`~serving.predictor.Predictor`
(several models, several versions of one model) with TorchServe's inference API and KServe
v2. The lifespan starts the shared runtime (decode pool, one batching loop per version, the
metrics listener) and drains it on shutdown. Every error, whichever router raised it,
becomes a response in :func:`error_response`: TorchServe's ``{"code", "type", "message"}``,
plus ``"error"`` on ``/v2/`` routes, where KServe clients (tritonclient) read it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.errors import InputError, ServingError
from serving.follow import start_followers
from serving.http import feedback_api, kserve_v2, security, torchserve_api
from serving.http.config import ServerConfig
from serving.http.dataplane import DataPlane
from serving.http.management_api import start_management_server
from serving.http.protocol import WatchClient
from serving.metrics import start_metrics_server
from serving.predictor import Predictor

log = logging.getLogger(__name__)

_HTTP_TYPES = {404: "ResourceNotFoundException", 405: "MethodNotAllowedException"}


def error_response(request: Request, e: ServingError) -> Response:
    """The one mapping from an error to its HTTP answer."""
    body = e.to_dict()
    if request.url.path.startswith("/v2/"):
        body["error"] = e.message
    return JSONResponse(body, status_code=e.status, headers=e.headers)


async def _serving_error(request: Request, e: ServingError) -> Response:
    return error_response(request, e)


async def _http_error(request: Request, e: StarletteHTTPException) -> Response:
    message = ("Requested resource is not found, please refer to API document."
               if e.status_code == 404 else str(e.detail))
    return error_response(request, ServingError(
        message, e.status_code, _HTTP_TYPES.get(e.status_code, "BadRequestException")))


async def _validation_error(request: Request, e: RequestValidationError) -> Response:
    # Each problem's place and message, never its input: that may be the whole body.
    problems = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ())) or 'body'}: "
                         f"{str(err.get('msg', ''))[:200]}" for err in e.errors()[:5])
    return error_response(request, InputError(f"invalid request: {problems}", 400,
                                              "BadRequestException"))


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app``'s routes through :func:`error_response`."""
    app.add_exception_handler(ServingError, _serving_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the data plane, the metrics and management listeners and the alias followers;
    drain and stop them on shutdown."""
    dataplane: DataPlane = app.state.dataplane
    config = dataplane.config
    dataplane.start()
    metrics_server = None
    if config.metrics_port is not None:
        metrics_server = await start_metrics_server(
            dataplane.metrics, config.host, config.metrics_port,
            header_timeout_s=config.header_timeout_s, body_timeout_s=config.body_timeout_s)
        app.state.metrics_port = metrics_server.port
        log.info("metrics on http://%s:%d/metrics", config.host, metrics_server.port)
    management = None
    if config.management is not None:
        management = await start_management_server(
            dataplane, config.management, header_timeout_s=config.header_timeout_s,
            body_timeout_s=config.body_timeout_s)
        app.state.management_port = management.port
    followers = start_followers(dataplane, config.follow)
    try:
        yield
    finally:
        for follower in followers:
            await follower.stop()
        if management is not None:
            await management.stop()
        await dataplane.stop()
        if metrics_server is not None:
            await metrics_server.stop()


def create_app(predictors: list[Predictor], config: ServerConfig | None = None) -> FastAPI:
    """A FastAPI app serving ``predictors``; ValueError if the model list is unusable."""
    app = FastAPI(title="food classifier (ONNX Runtime)", lifespan=lifespan)
    config = config or ServerConfig()
    app.state.dataplane = DataPlane(predictors, config)
    add_error_handlers(app)
    app.add_middleware(WatchClient)  # client gone: its work is dropped, logged as 499
    app.include_router(torchserve_api.router)
    app.include_router(kserve_v2.router)
    app.include_router(feedback_api.router)
    security.install(app, config.security, config.host)  # outermost: refusals cost nothing
    return app
