"""Dynamic batching for one model version: concurrent requests become one ``infer`` call.

The loop knows nothing of HTTP: it takes preprocessed CHW arrays and hands back logits rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from serving.errors import Overloaded
from serving.http.config import ServerConfig
from serving.metrics import ServerMetrics
from serving.predictor import Predictor

log = logging.getLogger(__name__)


@dataclass
class _Item:
    array: np.ndarray
    future: asyncio.Future
    enqueued: float


class Batcher:
    """Gathers concurrent requests for one model version into batches for ``infer``.

    A batch starts as soon as the first image is queued. It waits up to
    ``max_batch_delay_ms`` for more only while other admitted requests are still being
    preprocessed, so a lone request never pays the delay; requests that queued up while the
    previous batch ran are taken at once, up to ``max_batch_size``. With ``streams`` > 1
    (the predictor's), that many batches run at once, each on its own executor thread.
    """

    def __init__(self, predictor: Predictor, config: ServerConfig,
                 metrics: ServerMetrics) -> None:
        self.predictor = predictor
        self.config = config
        self.labels = (predictor.name, predictor.version)
        self.metrics = metrics
        self.items: deque[_Item] = deque()
        self.admitted = 0  # images: being preprocessed, queued or running
        self.requests = 0  # requests routed here and not yet answered
        self.preparing = 0
        self.wakeup = asyncio.Event()
        self.executor = ThreadPoolExecutor(predictor.streams,
                                           thread_name_prefix=f"infer-{predictor.name}")
        self.tasks: list[asyncio.Task] = []

    @contextlib.contextmanager
    def routed(self) -> Iterator[None]:
        """Count a request routed to this version until it is answered (``stop`` waits)."""
        self.requests += 1
        try:
            yield
        finally:
            self.requests -= 1

    @contextlib.contextmanager
    def admission(self, images: int = 1) -> Iterator[None]:
        """Count a request's ``images`` against ``max_queue`` while they are served.

        Callers ask only once the request's body has arrived, so a slow upload holds no
        slot; a request of several images takes one slot per image.
        """
        if self.admitted + images > self.config.max_queue:
            raise Overloaded(f"model {self.predictor.name} v{self.predictor.version} has "
                             f"{self.admitted} images queued (max_queue="
                             f"{self.config.max_queue}); retry later")
        self.admitted += images
        try:
            yield
        finally:
            self.admitted -= images

    @contextlib.contextmanager
    def preparing_one(self) -> Iterator[None]:
        """Mark a request as being preprocessed, so the batch being formed may wait for it."""
        self.preparing += 1
        try:
            yield
        finally:
            self.preparing -= 1
            self.wakeup.set()

    async def submit(self, array: np.ndarray) -> tuple[np.ndarray, int]:
        """Queue one CHW image; returns its logits row and the size of the batch it ran in."""
        future = asyncio.get_running_loop().create_future()
        self.items.append(_Item(array, future, time.perf_counter()))
        self.wakeup.set()
        return await future

    async def _next_batch(self) -> list[_Item]:
        while not self.items:
            self.wakeup.clear()
            await self.wakeup.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.max_batch_delay_ms / 1000
        while len(self.items) < self.config.max_batch_size and self.preparing > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch = []
        while self.items and len(batch) < self.config.max_batch_size:
            item = self.items.popleft()
            if not item.future.done():  # its client timed out or went away
                batch.append(item)
        return batch

    async def run(self) -> None:
        """Form batches and run them until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            start = time.perf_counter()
            for item in batch:
                self.metrics.queue_wait.labels(*self.labels).observe(start - item.enqueued)
            try:
                logits = await loop.run_in_executor(
                    self.executor, self.predictor.infer, np.stack([i.array for i in batch]))
            except Exception as e:  # a broken model must fail its requests, not the loop
                log.exception("inference failed for a batch of %d", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            self.metrics.inference.labels(*self.labels).observe(time.perf_counter() - start)
            self.metrics.batch_size.labels(*self.labels).observe(len(batch))
            for item, row in zip(batch, logits):
                if not item.future.done():
                    item.future.set_result((row, len(batch)))

    def start(self) -> None:
        """Start the batching loops (one per stream) on the running event loop."""
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self.run()) for _ in range(self.predictor.streams)]
        self.metrics.variant.labels(*self.labels, self.predictor.runtime).set(1)

    async def stop(self, timeout: float) -> None:
        """Let admitted requests finish (up to ``timeout`` seconds), then stop the loop."""
        deadline = time.monotonic() + timeout
        while (self.requests or self.admitted) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.executor.shutdown(wait=True)
        with contextlib.suppress(KeyError):
            self.metrics.variant.remove(*self.labels, self.predictor.runtime)
