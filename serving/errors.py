"""What can go wrong while answering, as exception types that carry their HTTP status.

Each type renders as TorchServe's error body ``{"code", "type", "message"}``; the HTTP app
maps them to responses in one place (``serving/http/app.py``), the TorchServe handler per
request. Stdlib only: the .mar carries this module.
"""

from __future__ import annotations


class ServingError(Exception):
    """A request that cannot be answered; ``status`` and ``type`` become the HTTP answer."""

    status = 500
    type = "InternalServerException"

    def __init__(self, message: str, status: int | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status or self.status
        self.type = type or self.type
        self.headers = headers

    def to_dict(self) -> dict:
        """The JSON error body both servers send: ``{"code", "type", "message"}``."""
        return {"code": self.status, "type": self.type, "message": self.message}


class InputError(ServingError, ValueError):
    """The client's input cannot be used (an image, a top-k, a request body's shape)."""

    status = 400
    type = "InvalidImage"


class ModelNotFound(ServingError):
    """No loaded model (or version) has the requested name."""

    status = 404
    type = "ModelNotFoundException"


class BodyTooLarge(ServingError):
    """The request body is over the server's size limit."""

    status = 413
    type = "RequestEntityTooLarge"


class Overloaded(ServingError):
    """The model's queue is full; the client should retry later (503 + Retry-After)."""

    status = 503
    type = "ServiceUnavailableException"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class RequestTimeout(ServingError):
    """No answer within the server's per-request timeout."""

    status = 504
    type = "RequestTimeout"


class InternalError(ServingError):
    """A failure of the server or the model, not of the request (details go to the log)."""
