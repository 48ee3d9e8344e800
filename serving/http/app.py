"""The FastAPI app of the fallback server: routers, lifespan, error handlers installed.

``create_app(predictors, config)`` serves one or more :class:`~serving.predictor.Predictor`
(several models, several versions of one model) with TorchServe's inference API and KServe
v2. The lifespan starts the shared runtime (decode pool, one batching loop per version, the
metrics listener) and drains it on shutdown. Every error, whichever router raised it,
becomes a response in :mod:`serving.http.error_handlers`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from serving.follow import start_followers
from serving.http import feedback_api, kserve_v2, security, torchserve_api
from serving.http.config import ServerConfig
from serving.http.dataplane import DataPlane
from serving.http.error_handlers import add_error_handlers
from serving.http.management_api import start_management_server
from serving.http.protocol import WatchClient
from serving.metrics import start_metrics_server
from serving.predictor import Predictor

log = logging.getLogger(__name__)

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
