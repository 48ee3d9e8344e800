"""What the routers get per request: the data plane (created by the app's lifespan) and the
request body read under the size limit."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serving.errors import BodyTooLarge
from serving.http.dataplane import DataPlane


async def get_dataplane(request: Request) -> DataPlane:
    """The app's data plane. ``async``: FastAPI runs a plain ``def`` dependency in a worker
    thread, a thread hop on every request for a dictionary lookup."""
    return request.app.state.dataplane


DataPlaneDep = Annotated[DataPlane, Depends(get_dataplane)]


# A body over the limit is still received (and dropped) up to this many times the limit,
# so the client finishes sending and reads the 413 (urllib reports a reset connection for
# a 413 sent while it is still sending); past it the connection is closed at once.
DRAIN_FACTOR = 2


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 when it exceeds ``limit`` (sent once the body has arrived,
    for bodies up to DRAIN_FACTOR times the limit)."""
    declared = request.headers.get("content-length", "")
    n = int(declared) if declared.isascii() and declared.isdigit() else None
    too_large = None
    if n is not None and n > limit:
        too_large = BodyTooLarge(f"request body is {n} bytes, over the limit of {limit}")
        if n > DRAIN_FACTOR * limit:
            raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            too_large = too_large or BodyTooLarge(
                f"request body is over the limit of {limit} bytes")
            chunks.clear()
            if size > DRAIN_FACTOR * limit:
                raise too_large
            continue
        chunks.append(chunk)
    if too_large is not None:
        raise too_large
    return b"".join(chunks)
