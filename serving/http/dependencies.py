"""What the routers get per request: the data plane (created by the app's lifespan) and the
request body read under the size limit."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serving.errors import BodyTooLarge
from serving.http.dataplane import DataPlane


def get_dataplane(request: Request) -> DataPlane:
    """The app's data plane."""
    return request.app.state.dataplane


DataPlaneDep = Annotated[DataPlane, Depends(get_dataplane)]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body is {int(declared)} bytes, over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
