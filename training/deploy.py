"""Switch a running TorchServe to a new model version through its own management API, with no
failed request.

The sequence (TorchServe 0.12):

1. build the version's ``.mar`` and place it in TorchServe's model store as
   ``<name>.v<N>.mar`` (a local archive must be directly in ``model_store``; a distinct file
   name leaves the archive of the version being served untouched);
2. ``POST /models?url=<name>.v<N>.mar&model_name=<name>&synchronous=true``: TorchServe loads
   it beside the old version (a new version never becomes the default by itself), starting
   the workers the archive's ``model-config.yaml`` asks for;
3. wait until every worker of the new version is READY, then send it one warm-up request;
4. ``PUT /models/<name>/<N>/set-default``: requests arriving from now on go to the new
   version; requests already queued for the old one stay in its queue;
5. drain: wait until the old version's queue is empty (``jobQueueStatus.pendingRequests``)
   and the requests its workers hold have had ``drain_s`` to finish; unregistering kills the
   old workers, and a request still inside one would fail;
6. ``DELETE /models/<name>/<old>`` for every old version.

A failure before step 4 unregisters the new version again and leaves the old one serving.
Registering and unregistering need TorchServe's model API: start it with
``--enable-model-api`` (or ``enable_model_api=true``, or ``TS_ENABLE_MODEL_API=true`` with
``enable_envvars_config=true``); without it TorchServe answers 405.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class DeployError(RuntimeError):
    """The switch could not be made; the message says what TorchServe answered."""


@dataclass
class DeployResult:
    """What a deployment did."""

    name: str
    version: str
    replaced: list[str] = field(default_factory=list)
    mar: Path | None = None
    seconds: float = 0.0
    registered: bool = True  # False when the version was already registered


class Management:
    """A small client for TorchServe's management API (JSON in, JSON out)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout

    def call(self, method: str, path: str, params: dict | None = None,
             timeout: float | None = None) -> tuple[int, object]:
        """``(status, parsed JSON or text)``; HTTP errors are returned, not raised."""
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        request = urllib.request.Request(url, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as r:
                status, body = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        except OSError as e:
            raise DeployError(f"cannot reach TorchServe's management API at {self.url} "
                              f"({e}); is it running, and is this its management address?"
                              ) from None
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")

    def versions(self, name: str) -> list[dict]:
        """Every registered version of ``name`` (``GET /models/<name>/all``); [] if none."""
        status, body = self.call("GET", f"/models/{name}/all")
        if status == 404:
            return []
        _check(status, body, f"list the versions of {name}")
        return body

    def describe(self, name: str, version: str) -> dict | None:
        status, body = self.call("GET", f"/models/{name}/{version}")
        if status == 404:
            return None
        _check(status, body, f"describe {name} version {version}")
        return body[0]

    def default_version(self, name: str) -> str | None:
        status, body = self.call("GET", f"/models/{name}")
        if status == 404:
            return None
        _check(status, body, f"describe {name}")
        return str(body[0]["modelVersion"])


def _check(status: int, body: object, what: str) -> None:
    if status == 405:
        raise DeployError(f"TorchServe refused to {what} (405): its model API is disabled; "
                          f"start it with --enable-model-api (or enable_model_api=true in "
                          f"config.properties, or TS_ENABLE_MODEL_API=true)")
    if status >= 300:
        message = body.get("message", body) if isinstance(body, dict) else body
        raise DeployError(f"TorchServe could not {what} ({status}): {message}")


def workers_ready(described: dict | None, minimum: int = 1) -> bool:
    """True when a described version has at least ``minimum`` workers, all READY."""
    workers = (described or {}).get("workers", [])
    return len(workers) >= max(1, minimum) and all(w.get("status") == "READY"
                                                   for w in workers)


def _warmup_image() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (180, 120, 60)).save(buf, format="JPEG")
    return buf.getvalue()


def _warm_up(inference_url: str, name: str, version: str, timeout: float) -> None:
    request = urllib.request.Request(f"{inference_url.rstrip('/')}/predictions/{name}/{version}",
                                     data=_warmup_image(), method="POST",
                                     headers={"Content-Type": "image/jpeg"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            r.read()
    except urllib.error.HTTPError as e:
        raise DeployError(f"{name} version {version} answered {e.code} to a warm-up image: "
                          f"{e.read()[:300]!r}") from None
    except OSError as e:
        raise DeployError(f"warm-up request to {name} version {version} failed: {e}") from None


def place_archive(version_dir: Path, model_store: Path, name: str, fmt: str) -> Path:
    """Build the version's .mar and publish it atomically as ``<store>/<name>.v<N>.mar``."""
    from serving.atomic import atomic_write
    from training.archive import build_archive
    from training.version import load_version

    version = load_version(version_dir)
    if not Path(model_store).is_dir():
        raise DeployError(f"--model-store {str(model_store)!r} is not a directory; pass the "
                          f"model_store directory of the TorchServe being switched")
    target = Path(model_store) / f"{name}.v{version.version}.mar"
    with tempfile.TemporaryDirectory(prefix="deploy-") as tmp:
        built = build_archive(version_dir, fmt, name, export_path=tmp)
        atomic_write(target, lambda path: shutil.copyfile(built, path))
    return target


def deploy_torchserve(management_url: str, version_dir: str | Path, *,
                      name: str | None = None, model_store: str | Path = "model_store",
                      fmt: str = "onnx", inference_url: str | None = None,
                      token: str | None = None, ready_timeout: float = 180.0,
                      drain_s: float = 2.0) -> DeployResult:
    """Register ``version_dir`` on the TorchServe at ``management_url`` as the new default
    version of ``name`` and unregister the versions it replaces (see the module doc).

    ``inference_url`` (when given) receives one warm-up request for the new version before
    traffic moves to it.
    """
    from training.version import load_version

    start = time.monotonic()
    version = load_version(version_dir)
    name = name or version.name
    new = str(version.version)
    ts = Management(management_url, token)
    before = [str(v["modelVersion"]) for v in ts.versions(name)]
    old = [v for v in before if v != new]
    registered = new not in before
    mar = None
    if registered:
        if not (Path(version_dir) / ("model.onnx" if fmt == "onnx" else "model.ts")).is_file():
            from training.export import export_version

            export_version(version_dir)
        mar = place_archive(Path(version_dir), Path(model_store), name, fmt)
        log.info("registering %s version %s from %s", name, new, mar)
        status, body = ts.call("POST", "/models", {"url": mar.name, "model_name": name,
                                                   "synchronous": "true"},
                               timeout=ready_timeout)
        if status == 404 or (status >= 400 and "not found" in str(body).lower()):
            raise DeployError(f"TorchServe did not find {mar.name} in its model store "
                              f"({body}); pass its model_store directory as --model-store")
        _check(status, body, f"register {mar.name}")
    try:
        _wait_ready(ts, name, new, ready_timeout)
        if inference_url:
            _warm_up(inference_url, name, new, ready_timeout)
        status, body = ts.call("PUT", f"/models/{name}/{new}/set-default")
        _check(status, body, f"make version {new} of {name} the default")
    except BaseException:
        if registered:
            log.warning("switch failed: unregistering %s version %s again; the old version "
                        "keeps serving", name, new)
            ts.call("DELETE", f"/models/{name}/{new}")
        raise
    log.info("%s: version %s is the default; draining %s", name, new, ", ".join(old) or "none")
    for v in old:
        _drain(ts, name, v, drain_s)
        status, body = ts.call("DELETE", f"/models/{name}/{v}", timeout=ready_timeout)
        _check(status, body, f"unregister {name} version {v}")
        log.info("unregistered %s version %s", name, v)
    return DeployResult(name, new, old, mar, round(time.monotonic() - start, 2), registered)


def _wait_ready(ts: Management, name: str, version: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        described = ts.describe(name, version)
        if workers_ready(described, int((described or {}).get("minWorkers", 1))):
            return
        if time.monotonic() > deadline:
            raise DeployError(f"{name} version {version} has no READY workers after "
                              f"{timeout:.0f}s: {(described or {}).get('workers')}")
        time.sleep(0.25)


def _drain(ts: Management, name: str, version: str, drain_s: float) -> None:
    """Wait until no request is queued for ``version`` (twice in a row), then ``drain_s``
    more for the batches its workers already took."""
    deadline = time.monotonic() + 60
    empty = 0
    while empty < 2 and time.monotonic() < deadline:
        described = ts.describe(name, version)
        if described is None:
            return
        pending = (described.get("jobQueueStatus") or {}).get("pendingRequests", 0)
        empty = empty + 1 if pending == 0 else 0
        time.sleep(0.1)
    time.sleep(drain_s)


def deploy_cli(args) -> int:
    """``python -m training deploy --torchserve URL [--model DIR | --version N]``."""
    from training.archive import ArchiveError

    try:
        if args.version is not None:
            from training.registry import RegistryError, version_dir_for

            try:
                model_dir = version_dir_for(args.registered_model, args.version)
            except RegistryError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        else:
            model_dir = Path(args.model)
        result = deploy_torchserve(args.torchserve, model_dir, name=args.name,
                                   model_store=args.model_store, fmt=args.format,
                                   inference_url=args.inference, token=args.token,
                                   drain_s=args.drain_seconds)
    except (DeployError, ArchiveError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    replaced = ", ".join(result.replaced) or "nothing"
    print(f"{result.name}: version {result.version} is serving (replaced {replaced}) "
          f"in {result.seconds:.1f}s")
    return 0
