"""One writer at a time per directory, and the leftovers of a killed writer removed.

``exclusive(directory, what)`` holds an advisory ``flock`` on the directory itself (no lock
file to leave behind: the kernel drops the lock when the holder dies, kill -9 included).
Whoever holds it is the only writer there, so the ``.tmp-*`` leftovers of an interrupted
writer can be removed at once (``serving.atomic.clean_stale``) instead of after an hour.
Used for a training run's checkpoint directory, a model's version root, a version's export
and the archive's model store. Unix only; elsewhere the lock is skipped (with the cleanup
falling back to leftovers older than an hour).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from serving.atomic import clean_stale

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

log = logging.getLogger(__name__)

WAIT_POLL_S = 0.1


class Busy(RuntimeError):
    """Another process holds the directory (a run of the same name, a concurrent export)."""


@contextlib.contextmanager
def exclusive(directory: str | os.PathLike, what: str, *, wait: float | None = None
              ) -> Iterator[list[Path]]:
    """Hold ``directory`` (created if missing) for ``what``; yields the leftovers removed.

    ``what`` says who else would hold it, for :class:`Busy` and the log. ``wait``: seconds
    to wait for another holder (None: forever); 0 raises :class:`Busy` at once."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield clean_stale(directory)
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise Busy(f"{directory} is in use by another process: {what}") from None
                time.sleep(WAIT_POLL_S)
        removed = clean_stale(directory, older_than_s=0)
        if removed:
            log.info("removed %d leftover(s) of an interrupted writer in %s: %s",
                     len(removed), directory, ", ".join(p.name for p in removed))
        yield removed
    finally:
        os.close(fd)  # closing the descriptor releases the lock
