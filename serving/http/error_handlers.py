"""The one mapping from an error to its HTTP answer, for every app of the server.

TorchServe's ``{"code", "type", "message"}``, plus ``"error"`` on ``/v2/`` routes, where
KServe clients (tritonclient) read it. The inference app and the management app both install
it with :func:`add_error_handlers`.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.errors import InputError, ServingError

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
