"""Durable, atomic file and directory writes: the one "write to temp, fsync, rename" helper.

A reader never sees half a file: data goes to a hidden temp file in the target's own
directory, is flushed to disk (fsync), renamed over the target, and the directory is fsynced
so the rename itself survives a power cut. Stdlib only: training, serving and the benchmarks
all write through here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

STALE_PREFIX = ".tmp-"  # temp files and directories all start with this; see clean_stale


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (a rename or a new file in it) to disk; no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file below ``root`` and every directory, deepest first."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], mode: int = 0o644) -> None:
    """Create ``path`` by calling ``write(tmp_path)``, then fsync and rename it into place.

    ``write`` may be anything that fills a file by name (``torch.save``, ``fig.savefig``...).
    If it raises, the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{STALE_PREFIX}{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600; servers may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically and durably."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), mode)


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


@contextlib.contextmanager
def staging_dir(parent: str | os.PathLike, label: str = "dir") -> Iterator[Path]:
    """A hidden temp directory in ``parent`` (same filesystem, so it can be renamed into
    place); removed on exit unless the caller renamed it away."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f"{STALE_PREFIX}{label}."))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, final: Path) -> None:
    """fsync a filled staging directory and rename it to ``final`` (which must not exist or
    be empty); the parent is fsynced so the new name is durable."""
    fsync_tree(tmp)
    os.rename(tmp, final)
    fsync_dir(final.parent)


def point_symlink(link: str | os.PathLike, target: str) -> None:
    """Atomically make ``link`` a (relative) symlink to ``target``."""
    link = Path(link)
    tmp_link = link.with_name(f"{STALE_PREFIX}{link.name}.{os.getpid()}")
    tmp_link.unlink(missing_ok=True)
    os.symlink(target, tmp_link)
    os.replace(tmp_link, link)
    fsync_dir(link.parent)


def clean_stale(parent: str | os.PathLike, older_than_s: float = 3600.0) -> list[Path]:
    """Remove temp files/directories a killed writer left in ``parent`` (``.tmp-*`` older
    than ``older_than_s``, so a writer still at work keeps its own). Returns what went."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed, now = [], time.time()
    for p in parent.iterdir():
        if not p.name.startswith(STALE_PREFIX):
            continue
        try:
            if now - p.lstat().st_mtime < older_than_s:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except FileNotFoundError:
            continue
    return removed
