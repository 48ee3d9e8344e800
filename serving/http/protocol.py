"""The connection side of the HTTP server: read deadlines, the client's state, side listeners.

uvicorn bounds the wait *between* requests (``timeout_keep_alive``) but nothing while a
request arrives: a client that never finishes its headers, or trickles its body, holds its
connection for ever. :func:`http_protocol` gives uvicorn's own HTTP protocol class two
deadlines, closing the connection when one passes:

- headers: from the connection's first byte (or its opening) until the request line and
  headers are in;
- body: from the headers until the whole body is in (it also bounds a body the app never
  reads, e.g. after an early 404).

:class:`WatchClient` is an ASGI middleware that tells the data plane what became of the
client: whether the body has arrived (a timeout before that is the client's, 408) and
whether it went away, in which case the request's task is cancelled so its queued work is
dropped, and the request is logged as 499 (nginx's "client closed request"), not as a 500.

:func:`start_side_server` runs a small app (metrics) on its own port on the running event
loop with the same deadlines and a connection limit, leaving signals to the main server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from serving.errors import ServingError

log = logging.getLogger(__name__)


class ClientDisconnected(ServingError):
    """The client closed its connection before the answer; nobody reads this status."""

    status = 499
    type = "ClientClosedRequest"


class BodyTimeout(ServingError):
    """The request's body had not arrived when the request timeout ran out."""

    status = 408
    type = "RequestTimeout"


class RequestDeadlines:
    """Mixin for uvicorn's HTTP protocol classes (h11 or httptools): close a connection whose
    headers or body do not arrive in time. Hooks only uvicorn's public protocol methods and
    its request cycle's ``more_body`` / ``response_complete`` flags."""

    header_timeout_s: float  # set by http_protocol()
    body_timeout_s: float

    _deadline: asyncio.TimerHandle | None = None
    _phase: object = None  # what the armed deadline waits for: "headers" or a request cycle

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._arm("headers", self.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._follow(between_requests=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _follow(self, between_requests: bool = False) -> None:
        """Move the deadline on to what the connection is waiting for now."""
        cycle = getattr(self, "cycle", None)
        if cycle is not None and cycle.more_body and not cycle.disconnected:
            # headers in, body still coming (or left unread by an early answer)
            if self._phase is not cycle:
                self._arm(cycle, self.body_timeout_s)
        elif cycle is not None and not cycle.response_complete:
            self._disarm()  # the whole request is in; the app answers under its own timeout
        elif between_requests:
            self._disarm()  # idle keep-alive: uvicorn's own timer closes it
        elif self._phase != "headers":
            self._arm("headers", self.header_timeout_s)  # the next request's first bytes

    def _arm(self, phase: object, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = asyncio.get_running_loop().call_later(seconds, self._expire,
                                                               phase, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, None

    def _expire(self, phase: object, seconds: float) -> None:
        transport = getattr(self, "transport", None)
        if transport is None or transport.is_closing():
            return
        what = "headers" if phase == "headers" else "body"
        client = getattr(self, "client", None) or ("?", "?")
        log.info("closing the connection from %s:%s: request %s not received within %gs",
                 client[0], client[1], what, seconds)
        transport.close()


def http_protocol(header_timeout_s: float, body_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (httptools when installed, else h11) with read
    deadlines; pass it as ``uvicorn.run(..., http=...)``."""
    if header_timeout_s <= 0 or body_timeout_s <= 0:
        raise ValueError(f"header and body timeouts must be > 0 seconds, got "
                         f"{header_timeout_s}, {body_timeout_s}")
    return type(f"Deadline{AutoHTTPProtocol.__name__}", (RequestDeadlines, AutoHTTPProtocol),
                {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s})


@dataclass
class ClientState:
    """What the middleware saw of one request's client."""

    body_received: bool = False
    disconnected: bool = False


_client: ContextVar[ClientState | None] = ContextVar("client", default=None)


def client_state() -> ClientState | None:
    """The current request's client state (None outside :class:`WatchClient`)."""
    return _client.get()


class WatchClient:
    """ASGI middleware: note when the body has arrived; after that, watch for the client
    leaving and cancel the request's task if it does, so its queued work is dropped."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = ClientState()
        token = _client.set(state)
        task = asyncio.current_task()
        watcher: asyncio.Task | None = None

        async def watch() -> None:
            message = await receive()  # once the body is in, only a disconnect comes
            if message["type"] == "http.disconnect":
                state.disconnected = True
                task.cancel()

        async def receive_noting() -> dict:
            nonlocal watcher
            message = await receive()
            if message["type"] == "http.disconnect":
                state.disconnected = True
            elif not message.get("more_body", False) and not state.body_received:
                state.body_received = True
                watcher = asyncio.ensure_future(watch())
            return message

        async def send_answer(message: dict) -> None:
            if message["type"] == "http.response.start" and watcher is not None:
                watcher.cancel()  # answering: a disconnect now costs nothing
            await send(message)

        try:
            await self.app(scope, receive_noting, send_answer)
        except asyncio.CancelledError:
            if not state.disconnected:  # not ours: the server is stopping
                raise
            forget_cancel()  # the data plane logs its own requests; this is any other
            log.info("client went away: %s %s", scope.get("method"), scope.get("path"))
        finally:
            if watcher is not None:
                watcher.cancel()
            _client.reset(token)


def forget_cancel() -> None:
    """Undo the pending cancellation of the current task once it has been handled (a client
    that left), so later awaits of the same request run normally."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        while task.cancelling():
            task.uncancel()


class _SideListener(uvicorn.Server):
    """A uvicorn server sharing the main server's loop; signals stay with the main one."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class SideServer:
    """A running side listener (see :func:`start_side_server`)."""

    server: uvicorn.Server
    task: asyncio.Task
    port: int

    async def stop(self) -> None:
        """Close the listener and its connections (a few seconds at most)."""
        self.server.should_exit = True
        await self.task


async def start_side_server(app: Any, host: str, port: int, *, header_timeout_s: float,
                            body_timeout_s: float, max_connections: int) -> SideServer:
    """Serve ``app`` on ``host:port`` (0: any free port) on the running event loop, with read
    deadlines, at most ``max_connections`` connections (503 beyond) and a 5 s keep-alive."""
    # Bind here, not in uvicorn: its bind failure is a SystemExit, which would escape the task
    # and end the whole process instead of telling the caller which address is taken.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    config = uvicorn.Config(app, lifespan="off", log_config=None,
                            access_log=False, timeout_graceful_shutdown=2,
                            http=http_protocol(header_timeout_s, body_timeout_s),
                            limit_concurrency=max_connections)
    server = _SideListener(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError(f"the listener on {host}:{port} stopped while starting")
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return SideServer(server, task, bound)
