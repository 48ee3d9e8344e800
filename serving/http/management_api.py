"""TorchServe's management API on its own port (8081, loopback): list, register, set the
default, unregister.

Routes and answers follow TorchServe's: ``GET /models``, ``GET /models/<name>[/<version>|all]``,
``POST /models?url=<path>[&model_name=<name>]``, ``PUT /models/<name>/<version>/set-default``,
``DELETE /models/<name>/<version>``; successes answer ``{"status": "..."}``, errors the
server's ``{"code", "type", "message"}``.

Registration loads only a local version directory or ``.mar`` under an allowed directory:
never a URL, no ``..``, nothing whose real path (symlinks resolved, the version directory's
files included) leaves the allowed directories. TorchServe's 2023 management-API CVEs came
from loading what a URL named. A new version is loaded and warmed off the event loop and is
routable only once ready; as in TorchServe it is not the default (unless it is its model's
first version) until ``set-default``. A name's default or last version cannot be unregistered.
An unregistered version stops receiving requests at once and is unloaded once its admitted
requests are answered.

The listener is a second uvicorn server on the inference server's event loop, started and
stopped by the app's lifespan; it answers only requests whose ``Host`` is a loopback name,
so a web page cannot reach it through DNS rebinding.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Request

from serving.errors import ModelNotFound, ServingError
from serving.http.dataplane import DataPlane, version_key
from serving.http.dependencies import DataPlaneDep
from serving.http.error_handlers import add_error_handlers
from serving.http.protocol import SideServer, start_side_server
from serving.http.torchserve_api import describe

log = logging.getLogger(__name__)

DEFAULT_PORT = 8081
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class ManagementSettings:
    """Where the management API listens and which directories it may load versions from."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    allowed_dirs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.host not in LOOPBACK_HOSTS:
            raise ValueError(f"the management API listens on loopback only (it has no "
                             f"authentication); got host {self.host!r}, allowed: "
                             f"{sorted(LOOPBACK_HOSTS)}")


def _bad_request(message: str) -> ServingError:
    return ServingError(message, 400, "BadRequestException")


def _forbidden(message: str) -> ServingError:
    return ServingError(message, 403, "ForbiddenException")


def _conflict(message: str) -> ServingError:
    return ServingError(message, 409, "ConflictStatusException")


def _within(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def allowed_path(url: str | None, allowed_dirs: Sequence[str | os.PathLike]) -> Path:
    """The real path a registration's ``url`` names, if it is a local path under one of
    ``allowed_dirs``; else a 4xx ServingError naming the problem.

    A relative ``url`` is looked up in each allowed directory in turn (like TorchServe's
    model store); the returned path has every symlink resolved, so what is loaded is what
    was checked."""
    if not url:
        raise _bad_request("Parameter url is required: a version directory or .mar under "
                           "an allowed directory")
    if "://" in url or len(urlsplit(url).scheme) > 1:
        raise _bad_request(f"url={url!r} is a URL; only local paths under the allowed "
                           f"directories are registered")
    if ".." in PurePath(url).parts:
        raise _bad_request(f"url={url!r} contains '..'; give a path under an allowed "
                           f"directory without '..'")
    if not allowed_dirs:
        raise _forbidden("no directory is allowed for registration; start the server with "
                         "--model-dir-allowed DIR")
    try:
        roots = [Path(os.path.realpath(d)) for d in allowed_dirs]
        given = [Path(url)] if Path(url).is_absolute() else [root / url for root in roots]
        found = [Path(os.path.realpath(p)) for p in given if p.exists()]
    except (ValueError, OSError) as e:  # NUL bytes, over-long names
        raise _bad_request(f"url={url!r} is not a usable path: {e}") from e
    allowed = sorted(map(str, roots))
    if not found:
        if Path(url).is_absolute() and not _within(Path(os.path.realpath(url)), roots):
            raise _forbidden(f"url={url!r} is outside the allowed directories {allowed}")
        raise ModelNotFound(f"url={url!r}: no such version directory or .mar under the "
                            f"allowed directories {allowed}")
    real = found[0]
    if not _within(real, roots):
        raise _forbidden(f"url={url!r} resolves to {real}, outside the allowed directories "
                         f"{allowed}")
    if real.is_dir():
        for child in real.iterdir():
            target = Path(os.path.realpath(child))
            if not _within(target, roots):
                raise _forbidden(f"url={url!r}: {child.name} links to {target}, outside the "
                                 f"allowed directories {allowed}")
    return real


async def loopback_host(request: Request) -> None:
    """Refuse a request whose ``Host`` header is not a loopback name (DNS rebinding)."""
    host = urlsplit(f"//{request.headers.get('host', '')}").hostname
    if host not in LOOPBACK_HOSTS:
        raise _forbidden(f"Host {host!r} is not allowed on the management API; use one of "
                         f"{sorted(LOOPBACK_HOSTS)}")


router = APIRouter(dependencies=[Depends(loopback_host)])


@router.get("/models")
async def list_models(dataplane: DataPlaneDep) -> dict:
    models = dataplane.models
    return {"models": [{"modelName": name, "modelUrl": models.get(name).predictor.source}
                       for name in sorted(models.versions)]}


@router.get("/models/{name}")
async def describe_model(name: str, dataplane: DataPlaneDep) -> list:
    return [describe(dataplane, dataplane.models.get(name))]


@router.get("/models/{name}/{version}")
async def describe_version(name: str, version: str, dataplane: DataPlaneDep) -> list:
    if version == "all":
        return [describe(dataplane, e) for e in dataplane.models.of(name)]
    return [describe(dataplane, dataplane.models.get(name, version))]


@router.post("/models")
async def register(request: Request, dataplane: DataPlaneDep, url: str | None = None,
                   model_name: str | None = None) -> dict:
    """Load, warm and add a version (not the default unless it is its model's first)."""
    settings: ManagementSettings = request.app.state.management
    path = allowed_path(url, settings.allowed_dirs)
    if model_name is not None and not _MODEL_NAME.fullmatch(model_name):
        raise _bad_request(f"model_name={model_name!r} is not a model name: letters, digits, "
                           f"'_', '.', '-', starting with a letter or digit")
    try:
        predictor = await dataplane.load_version(str(path), model_name)
    except Exception as e:  # whatever the files hold: the client chose them
        raise _bad_request(f"cannot load url={url!r} ({path}): {type(e).__name__}: {e}") from e
    taken = dataplane.models.versions.get(predictor.name, {}).get(
        version_key(predictor.version))
    if taken is not None:
        raise _conflict(f'Model version {predictor.version} is already registered for model '
                        f'"{predictor.name}" (from {taken.predictor.source})')
    dataplane.add_version(predictor)
    log.info("registered %s v%s from %s", predictor.name, predictor.version, path)
    return {"status": f'Model "{predictor.name}" Version: {predictor.version} registered '
                      f'with 1 initial workers'}


@router.put("/models/{name}/{version}/set-default")
async def set_default(name: str, version: str, dataplane: DataPlaneDep) -> dict:
    entry = dataplane.models.set_default(name, version)
    log.info("default version of %s is now v%s", name, entry.predictor.version)
    return {"status": f'Default version successfully updated for model "{name}" to '
                      f'"{entry.predictor.version}"'}


@router.delete("/models/{name}")
async def unregister_default(name: str, dataplane: DataPlaneDep) -> dict:
    return await unregister(name, dataplane.models.get(name).key, dataplane)


@router.delete("/models/{name}/{version}")
async def unregister(name: str, version: str, dataplane: DataPlaneDep) -> dict:
    """Stop routing to the version at once; answer once its admitted requests are done."""
    try:
        entry = await dataplane.remove_version(name, version)
    except ValueError as e:
        raise _conflict(str(e)) from e
    return {"status": f'Model "{name}" Version: {entry.predictor.version} unregistered'}


def management_app(dataplane: DataPlane, settings: ManagementSettings) -> FastAPI:
    """The management API over ``dataplane``, answering errors like the inference app."""
    app = FastAPI(title="food classifier management API", openapi_url=None)
    app.state.dataplane = dataplane
    app.state.management = settings
    add_error_handlers(app)
    app.include_router(router)
    return app


async def start_management_server(dataplane: DataPlane, settings: ManagementSettings, *,
                                  header_timeout_s: float, body_timeout_s: float,
                                  max_connections: int = 16) -> SideServer:
    """Listen for the management API on the running event loop (same read deadlines as the
    inference port); RuntimeError naming the address when it cannot listen there."""
    try:
        server = await start_side_server(
            management_app(dataplane, settings), settings.host, settings.port,
            header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s,
            max_connections=max_connections)
    except RuntimeError as e:
        raise RuntimeError(f"management API: {e}; choose another --management-port, or 0 "
                           f"to turn it off") from e
    log.info("management API on http://%s:%d/models", settings.host, server.port)
    return server
