"""Who may write: a bearer token for writes beyond loopback, the Host header on loopback, and a
per-client rate limit on feedback.

- **Token.** ``--token-file FILE`` (or ``$FOOD_SERVER_TOKEN``) sets a bearer token. Requests
  that write (``POST /feedback``) must then send ``Authorization: Bearer <token>``; the
  token is compared in constant time (``hmac.compare_digest``). A server listening beyond
  loopback (``--host 0.0.0.0``) with an endpoint that writes (a feedback store) refuses to
  start without one. Predictions stay open, like TorchServe's inference API behind an
  ingress; paths are not shown on this port; the management API listens on loopback only.
- **Host.** On a loopback address every request's ``Host`` must be a loopback name, so a
  web page a developer opens cannot reach the server through DNS rebinding.
- **Rate limit.** ``POST /feedback`` is limited per client address by a token bucket
  (``--feedback-rate`` per second, bursts of ``--feedback-burst``); over it: 429 with
  ``Retry-After``. Behind a proxy the address is the proxy's unless uvicorn is told to trust
  its ``X-Forwarded-For`` (``FORWARDED_ALLOW_IPS``).

It is one ASGI middleware in front of every router (``install``), answering refusals with
the API's usual ``{"code", "type", "message"}``. TLS is not here: put the server behind an
ingress or proxy that terminates it.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

TOKEN_ENV = "FOOD_SERVER_TOKEN"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
MIN_TOKEN_CHARS = 16
MAX_TRACKED_CLIENTS = 10_000  # rate-limit buckets kept, least recently used dropped first


@dataclass(frozen=True)
class SecuritySettings:
    """The token (None: none), and the feedback rate limit per client."""

    token: str | None = None
    feedback_rate: float = 10.0  # requests per second per client, sustained
    feedback_burst: int = 100  # requests a client may send at once

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < MIN_TOKEN_CHARS:
            raise ValueError(f"the server token has {len(self.token)} characters; use at "
                             f"least {MIN_TOKEN_CHARS} (e.g. python -c 'import secrets; "
                             f"print(secrets.token_urlsafe(32))')")
        if self.feedback_rate <= 0 or self.feedback_burst < 1:
            raise ValueError(f"feedback rate limit must be > 0 per second with a burst >= 1, "
                             f"got {self.feedback_rate}/s burst {self.feedback_burst}")


def is_loopback(host: str) -> bool:
    """True for an address or name that only this machine can reach."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, settings: SecuritySettings, writes: list[str]) -> None:
    """ValueError when ``host`` reaches beyond loopback, the server has endpoints that write
    (``writes``, e.g. POST /feedback with a feedback store) and no token protects them."""
    if writes and not is_loopback(host) and settings.token is None:
        raise ValueError(f"--host {host} listens beyond loopback, where anyone who can reach "
                         f"the port could use {', '.join(writes)}; give a token with "
                         f"--token-file FILE or ${TOKEN_ENV} (and put TLS in front), or listen "
                         f"on 127.0.0.1")


def read_token(token_file: str | None) -> str | None:
    """The token from ``token_file`` (its first line), else ``$FOOD_SERVER_TOKEN``."""
    if token_file:
        try:
            text = Path(token_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"--token-file {token_file}: {e.strerror}") from e
        if not text:
            raise ValueError(f"--token-file {token_file} is empty")
        return text.splitlines()[0].strip()
    return os.environ.get(TOKEN_ENV) or None


class TokenBuckets:
    """One token bucket per client: ``rate`` per second, up to ``burst`` at once."""

    def __init__(self, rate: float, burst: int, max_clients: int = MAX_TRACKED_CLIENTS) -> None:
        self.rate, self.burst, self.max_clients = rate, burst, max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, client: str, now: float | None = None) -> float:
        """Take one token for ``client``: 0 if allowed, else the seconds until one is free."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._buckets[client] = (tokens - 1 if wait == 0 else tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        return wait


def _error(status: int, type_: str, message: str,
           headers: dict[str, str] | None = None) -> tuple[int, list, bytes]:
    body = json.dumps({"code": status, "type": type_, "message": message}).encode()
    raw = [(b"content-type", b"application/json"),
           (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return status, raw, body


def _writes(method: str, path: str) -> bool:
    """Requests that change what the server stores."""
    return method not in ("GET", "HEAD", "OPTIONS") and (
        path == "/feedback" or path.startswith("/feedback/"))


class SecurityMiddleware:
    """The ASGI middleware applying :class:`SecuritySettings` to one listener."""

    def __init__(self, app, settings: SecuritySettings, host: str) -> None:
        self.app = app
        self.settings = settings
        self.check_host = is_loopback(host)
        self.buckets = TokenBuckets(settings.feedback_rate, settings.feedback_burst)

    def refusal(self, scope: dict) -> tuple[int, list, bytes] | None:
        """The answer refusing this request, or None to let it through."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if self.check_host:
            host = urlsplit(f"//{headers.get('host', '')}").hostname or ""
            if not is_loopback(host):
                return _error(403, "ForbiddenException",
                              f"Host {host!r} is not allowed: this server listens on loopback; "
                              f"use http://127.0.0.1:<port> or http://localhost:<port>")
        if not _writes(scope.get("method", "GET"), scope.get("path", "")):
            return None
        if self.settings.token is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    given.strip().encode(), self.settings.token.encode()):
                return _error(401, "Unauthorized", "this endpoint needs the server's token: "
                              "send Authorization: Bearer <token>",
                              {"WWW-Authenticate": "Bearer"})
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.buckets.take(client)
        if wait > 0:
            return _error(429, "TooManyRequests",
                          f"feedback from {client} is over {self.settings.feedback_rate:g}/s "
                          f"(bursts of {self.settings.feedback_burst}); retry in {wait:.1f}s",
                          {"Retry-After": str(max(1, round(wait + 0.5)))})
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and (refused := self.refusal(scope)) is not None:
            status, headers, body = refused
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def install(app, settings: SecuritySettings | None, host: str) -> None:
    """Put the security middleware in front of ``app`` (a FastAPI app listening on ``host``)."""
    app.add_middleware(SecurityMiddleware, settings=settings or SecuritySettings(), host=host)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``python -m serving`` options of this module."""
    defaults = SecuritySettings()
    g = parser.add_argument_group(
        "write access",
        "Writes (POST /feedback) need a bearer token when one is set, and a server listening "
        "beyond loopback with a feedback store refuses to start without one. On loopback the "
        "Host header must be a loopback name (DNS rebinding). Put TLS in front of a server "
        "others can reach.")
    g.add_argument("--token-file", metavar="FILE", default=None,
                   help=f"file holding the bearer token for writes (default: ${TOKEN_ENV})")
    g.add_argument("--feedback-rate", type=float, default=defaults.feedback_rate,
                   help="POST /feedback per second per client address, 429 beyond "
                        "(default: %(default)s)")
    g.add_argument("--feedback-burst", type=int, default=defaults.feedback_burst,
                   help="feedback requests a client may send at once (default: %(default)s)")


def settings_from_args(args: argparse.Namespace) -> SecuritySettings:
    """The settings the command line asks for; ValueError naming what is wrong, including a
    non-loopback ``--host`` with a feedback store (``--feedback-db``) but no token."""
    settings = SecuritySettings(read_token(args.token_file), args.feedback_rate,
                                args.feedback_burst)
    check_exposure(args.host, settings, ["POST /feedback"] if args.feedback_db else [])
    return settings
