"""The protocol-free data plane: which models are served, and the path of every inference.

``ModelTable`` holds one :class:`ModelEntry` per model version (its Predictor and its
Batcher) and each name's default version; entries are added one at a time, so versions can
come and go while serving. ``DataPlane.serve`` wraps one request's work in the request
timeout, metrics and the access log; ``predict`` and ``infer_images`` / ``infer_arrays`` run
the Predictor's stages under admission (one queue slot per image, taken once the body has
arrived): decode in a thread pool under the decode budget, infer through the batcher,
encode. When one image of a request fails, or its client goes away, the request's other
images are cancelled. The protocol routers parse and render HTTP around these calls and
nothing else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from starlette.responses import Response

from serving.errors import (
    InputError,
    InternalError,
    ModelNotFound,
    RequestTimeout,
    ServingError,
)
from serving.http.batcher import Batcher
from serving.http.config import ServerConfig
from serving.http.protocol import BodyTimeout, ClientDisconnected, client_state, forget_cancel
from serving.metrics import ServerMetrics
from serving.predictor import Prediction, Predictor

if TYPE_CHECKING:  # SQLAlchemy is imported only when the prediction log is on
    from serving.feedback import FeedbackStore

log = logging.getLogger(__name__)
access_log = logging.getLogger("serving.access")

T = TypeVar("T")
# A decode still running this long past its budget's time limit is abandoned (its thread
# stops at its next read); the budget's own check normally answers first.
DECODE_ABANDON_GRACE_S = 0.5
# Shutdown, after uvicorn's drain (ServerConfig.drain_s): drain + these < 30 s, Kubernetes'
# default grace period.
STOP_BATCHERS_S = 3.0
STOP_FEEDBACK_S = 4.0
VERSION_HEADER = "X-Model-Version"  # on every answer of a model: the version that answered
Logits = tuple[np.ndarray, int]  # one image's logits row and the size of its batch


def version_key(version: str) -> str:
    """``v3``, ``3`` and ``3.0`` all name version 3."""
    v = str(version).strip()
    v = v[1:] if v[:1] in ("v", "V") else v
    return v.removesuffix(".0")


def _newest(keys: list[str]) -> str:
    return max(keys, key=lambda k: (k.isdigit(), int(k) if k.isdigit() else 0, k))


@dataclass(frozen=True)
class ModelEntry:
    """One served model version: its stages and its batching loop."""

    predictor: Predictor
    batcher: Batcher

    @property
    def key(self) -> str:
        return version_key(self.predictor.version)


class ModelTable:
    """The served models: name -> version key -> entry, and each name's default version
    (the newest, like ``latest`` in artifacts/)."""

    def __init__(self) -> None:
        self.versions: dict[str, dict[str, ModelEntry]] = {}
        self.default: dict[str, str] = {}

    def add(self, entry: ModelEntry, default: bool | None = None) -> None:
        """Serve one more version; ValueError if its name and version are taken.

        ``default``: None makes the newest version the default (startup), True this one,
        False keeps the current default (a name's first version is always its default)."""
        name = entry.predictor.name
        versions = self.versions.setdefault(name, {})
        if entry.key in versions:
            raise ValueError(f"model {name} version {entry.key} given twice "
                             f"({versions[entry.key].predictor.source} and "
                             f"{entry.predictor.source})")
        versions[entry.key] = entry
        if default is None:
            self.default[name] = _newest(list(versions))
        elif default or name not in self.default:
            self.default[name] = entry.key

    def set_default(self, name: str, version: str) -> ModelEntry:
        """Route ``name``'s requests without a version to ``version`` from now on."""
        entry = self.get(name, version)
        self.default[name] = entry.key
        return entry

    def remove(self, name: str, version: str) -> ModelEntry:
        """Stop routing to a version at once and return its entry (to drain); ValueError for
        a name's default or last version."""
        entry = self.get(name, version)
        if len(self.versions[name]) == 1:
            raise ValueError(f"version {entry.key} is the last version of model {name!r}; "
                             f"register another version before unregistering it")
        if self.is_default(entry):
            raise ValueError(f"version {entry.key} is the default version of model {name!r}; "
                             f"set another default first (PUT /models/{name}/<version>/"
                             f"set-default)")
        del self.versions[name][entry.key]
        return entry

    def get(self, name: str, version: str | None = None) -> ModelEntry:
        """The entry for a name and optional version, or ModelNotFound naming what is."""
        if name not in self.versions:
            raise ModelNotFound(f"Model not found: {name!r}; loaded models: "
                                f"{sorted(self.versions)}")
        if version is None or version == "":
            return self.versions[name][self.default[name]]
        key = version_key(version)
        if key not in self.versions[name]:
            raise ModelNotFound(f"Model version not found: {name!r} has no version "
                                f"{version!r}; loaded versions: {sorted(self.versions[name])}",
                                type="ModelVersionNotFoundException")
        return self.versions[name][key]

    def of(self, name: str) -> list[ModelEntry]:
        """Every version of ``name`` (ModelNotFound if none)."""
        self.get(name)
        return list(self.versions[name].values())

    def entries(self) -> list[ModelEntry]:
        return [e for versions in self.versions.values() for e in versions.values()]

    def is_default(self, entry: ModelEntry) -> bool:
        return self.default.get(entry.predictor.name) == entry.key


class DataPlane:
    """The served models and the shared runtime they use: decode pool, batchers, metrics."""

    def __init__(self, predictors: list[Predictor], config: ServerConfig) -> None:
        if not predictors:
            raise ValueError("give at least one model to serve")
        self.config = config
        self.metrics = ServerMetrics()
        self.models = ModelTable()
        for p in predictors:
            self.models.add(ModelEntry(p, Batcher(p, config, self.metrics)))
        self.started = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        self.decode_pool: ThreadPoolExecutor | None = None
        self.feedback: FeedbackStore | None = (
            config.feedback.open(self.metrics.registry) if config.feedback else None)

    def start(self) -> None:
        """Warm every version at each batch size, then start the decode pool and every
        batching loop (on the running event loop)."""
        for entry in self.models.entries():
            entry.predictor.warm(self.config.max_batch_size)
        self.decode_pool = ThreadPoolExecutor(self.config.preprocess_threads,
                                              thread_name_prefix="preprocess")
        for entry in self.models.entries():
            entry.batcher.start()

    async def load_version(self, source: str, name: str | None = None) -> Predictor:
        """Load and warm a version to add while serving, off the event loop.

        It runs with the settings of a version already served (``name``'s default if it
        has one): intra-op threads, spinning, streams, decode budget and JPEG draft, on the
        variant the server's ``engine``/``precision`` pick for it. It is warmed at every batch
        size, so its first requests pay no start-up cost."""
        like = (self.models.get(name) if name in self.models.versions
                else self.models.entries()[0]).predictor

        def load() -> Predictor:
            predictor = Predictor.load(source, intra_op_threads=like.threads,
                                       allow_spinning=like.spinning, budget=like.budget,
                                       name=name, engine=self.config.engine,
                                       precision=self.config.precision,
                                       streams=self.config.streams,
                                       draft_factor=like.draft_factor)
            predictor.warm(self.config.max_batch_size)
            return predictor

        return await asyncio.get_running_loop().run_in_executor(None, load)

    def add_version(self, predictor: Predictor, default: bool = False) -> ModelEntry:
        """Start serving a loaded version (its batching loop starts now); ``default`` routes
        the name's unversioned requests to it at once. ValueError if the version is taken."""
        entry = ModelEntry(predictor, Batcher(predictor, self.config, self.metrics))
        self.models.add(entry, default=default)
        entry.batcher.start()
        return entry

    async def remove_version(self, name: str, version: str) -> ModelEntry:
        """Stop routing to a version at once, let its admitted requests finish (up to the
        request timeout), then stop its batching loop; its session is freed with the entry.
        ValueError for a name's default or last version."""
        entry = self.models.remove(name, version)
        await entry.batcher.stop(self.config.request_timeout_s)
        log.info("unloaded %s v%s", entry.predictor.name, entry.predictor.version)
        return entry

    async def stop(self, timeout: float = STOP_BATCHERS_S) -> None:
        """Let admitted requests finish (``timeout`` s for all batchers together: uvicorn's
        drain has already waited for the requests), then stop; the feedback store gets
        STOP_FEEDBACK_S to write what is queued. Both fit the drain budget (``drain_s``)."""
        deadline = time.monotonic() + timeout
        for entry in self.models.entries():
            await entry.batcher.stop(max(0.0, deadline - time.monotonic()))
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=False, cancel_futures=True)
        if self.feedback is not None:  # writes what is still queued
            await asyncio.get_running_loop().run_in_executor(None, self.feedback.close,
                                                             STOP_FEEDBACK_S)

    async def serve(self, name: str, version: str | None,
                    work: Callable[[ModelEntry], Awaitable[tuple[T, int]]], *,
                    method: str, path: str) -> T:
        """Run ``work(entry)`` -> (result, batch size) for the named model under admission,
        the request timeout, metrics and the access log. Failures propagate as ServingError
        (an unexpected one is logged and becomes InternalError)."""
        start = time.perf_counter()
        self.metrics.in_flight.inc()
        labels, batch, error = ("unknown", ""), 0, None
        try:
            entry = self.models.get(name, version)
            labels = (entry.predictor.name, entry.predictor.version)
            with entry.batcher.routed():
                result, batch = await asyncio.wait_for(work(entry),
                                                       self.config.request_timeout_s)
            if isinstance(result, Response):  # which version answered, outside the body
                result.headers[VERSION_HEADER] = entry.predictor.version
        except ServingError as e:
            error = e
        except asyncio.TimeoutError:
            client = client_state()
            if client is not None and not client.body_received:
                error = BodyTimeout(f"the request body did not arrive within "
                                    f"{self.config.request_timeout_s}s")
            else:
                error = RequestTimeout(f"no answer within {self.config.request_timeout_s}s; "
                                       f"the server is overloaded")
        except asyncio.CancelledError:
            client = client_state()
            if client is None or not client.disconnected:
                raise
            forget_cancel()
            error = ClientDisconnected("the client went away before the answer; its queued "
                                       "work was dropped")
        except Exception:
            client = client_state()
            if client is not None and client.disconnected:  # mid-upload
                error = ClientDisconnected("the connection closed during the upload (the "
                                           "client left, or its body deadline passed)")
            else:
                log.exception("internal error on %s", path)
                error = InternalError("internal server error")
        finally:
            self.metrics.in_flight.dec()
        status = error.status if error is not None else 200
        elapsed = time.perf_counter() - start
        self.metrics.requests.labels(*labels, str(status)).inc()
        if error is None or labels[0] != "unknown":
            self.metrics.latency.labels(*labels).observe(elapsed)
        record = {"method": method, "path": path, "model": labels[0], "version": labels[1],
                  "status": status, "latency_ms": round(elapsed * 1000, 2),
                  "batch_size": batch}
        if error is not None:
            record["error"] = error.message
        access_log.info(json.dumps(record))
        if error is not None:
            if labels[0] != "unknown":
                error.headers = {**(error.headers or {}), VERSION_HEADER: labels[1]}
            raise error
        return result

    async def infer_arrays(self, entry: ModelEntry, arrays: list[np.ndarray]) -> list[Logits]:
        """Preprocessed CHW arrays through the batcher, one admission slot each."""
        with entry.batcher.admission(len(arrays)):
            return await _all_or_none(entry.batcher.submit(a) for a in arrays)

    async def infer_images(self, entry: ModelEntry, images: list[bytes]) -> list[Logits]:
        """Encoded images: decode off the event loop, then queue each one for a batch; one
        admission slot per image, and the others cancelled as soon as one fails."""
        predictor, batcher = entry.predictor, entry.batcher
        timing = self.metrics.preprocess.labels(predictor.name, predictor.version)

        async def one(data: bytes) -> Logits:
            with batcher.preparing_one():
                start = time.perf_counter()
                array = await self.decode(predictor, data)
                timing.observe(time.perf_counter() - start)
            return await batcher.submit(array)

        with batcher.admission(len(images)):
            return await _all_or_none(one(d) for d in images)

    async def decode(self, predictor: Predictor, data: bytes) -> np.ndarray:
        """One image's decode stage in the decode pool. Once a thread has started it, it gets
        its budget's time limit (plus a grace); past that it is abandoned and answered 413."""
        loop = asyncio.get_running_loop()
        started = loop.create_future()

        def run() -> np.ndarray:
            loop.call_soon_threadsafe(lambda: started.done() or started.set_result(None))
            return predictor.decode(data)

        done = loop.run_in_executor(self.decode_pool, run)
        limit = predictor.budget.timeout_s
        if limit is None:
            return await done
        try:
            await asyncio.wait({started, done}, return_when=asyncio.FIRST_COMPLETED)
            return await asyncio.wait_for(done, limit + DECODE_ABANDON_GRACE_S)
        except asyncio.TimeoutError:
            raise InputError(f"decoding took longer than the limit of {limit}s; send a "
                             f"smaller or simpler image", 413, "DecodeTimeout") from None
        finally:
            started.cancel()
            done.cancel()  # dropped from the pool's queue if no thread has started it

    async def predict(self, entry: ModelEntry, image: bytes,
                      k: int) -> tuple[list[Prediction], int]:
        """One encoded image's top-k answer and the size of the batch it ran in."""
        [(row, batch)] = await self.infer_images(entry, [image])
        return entry.predictor.encode(row, k), batch

    def log_prediction(self, entry: ModelEntry, predictions: list[Prediction],
                       image: bytes) -> str | None:
        """Queue an answer for the prediction log (written off the request path); its id, or
        None when the log is off or its queue is full."""
        if self.feedback is None:
            return None
        p = entry.predictor
        return self.feedback.log_prediction(p.name, p.version, predictions, image,
                                            labels=p.labels)


async def _all_or_none(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Await every one; when one fails (or the caller is cancelled) cancel the others, so a
    request's remaining images stop costing anything."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
