"""Follow an MLflow registry alias: ``--model models:/food-classifier@champion --follow 30s``.

At start the alias is resolved once and that registry version is loaded (``models:/<name>/<N>``),
so the server knows which version it serves. Then a task on the server's event loop asks the
registry every interval which version the alias names. When it moved, the new version is
downloaded, loaded and warmed beside the old one, becomes the default at once, and the old
one drains and is unloaded. A failure (registry unreachable, a broken model) is logged and
retried at the next tick; the old version keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serving.errors import ModelNotFound
from serving.http.dataplane import version_key

if TYPE_CHECKING:
    from serving.http.dataplane import DataPlane

log = logging.getLogger(__name__)

_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_ALIAS_URI = re.compile(r"models:/(?P<model>[^/@]+)@(?P<alias>[^/@]+)")


def parse_duration(text: str) -> float:
    """``"30s"``, ``"2m"``, ``"1h"``, ``"500ms"`` or plain seconds (``"45"``) as seconds > 0;
    ValueError naming the bad value and the accepted forms."""
    match = _DURATION.fullmatch(str(text))
    seconds = float(match[1]) * _UNITS[match[2]] if match else 0.0
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration; give seconds (30) or a number "
                         f"with a unit: 500ms, 30s, 2m, 1h")
    return seconds


@dataclass(frozen=True)
class AliasTarget:
    """A registry alias to follow, and the name it is served under (None: the model
    config's)."""

    model: str
    alias: str
    name: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.model}@{self.alias}"

    def version_uri(self, version: str) -> str:
        """The URI of one registry version, which no alias move can change."""
        return f"models:/{self.model}/{version}"


def alias_target(source: str, name: str | None = None) -> AliasTarget | None:
    """The alias a ``--model`` value names (``models:/<model>@<alias>``), else None."""
    match = _ALIAS_URI.fullmatch(source)
    return AliasTarget(match["model"], match["alias"], name) if match else None


def registry_version(target: AliasTarget) -> str:
    """The registry version the alias names now (blocking; MlflowException if it cannot
    be told). The registry is the one of ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI``."""
    from mlflow import MlflowClient

    return str(MlflowClient().get_model_version_by_alias(target.model, target.alias).version)


@dataclass(frozen=True)
class Followed:
    """An alias and where it stood at start: its registry version and the version served."""

    target: AliasTarget
    registry_version: str
    name: str  # the served model name
    version: str  # the served version (model_config.json's)


@dataclass(frozen=True)
class FollowSettings:
    """The aliases to follow and how often to ask the registry."""

    interval_s: float
    followed: tuple[Followed, ...]


class AliasFollower:
    """Polls one alias and switches the served default when it moves (see the module doc)."""

    def __init__(self, dataplane: DataPlane, followed: Followed, interval_s: float) -> None:
        self.dataplane = dataplane
        self.target = followed.target
        self.registry_version = followed.registry_version
        self.name = followed.name
        self.version = followed.version
        self.interval_s = interval_s
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        """Start polling on the running event loop."""
        self.task = asyncio.get_running_loop().create_task(self.run())
        log.info("following %s every %gs (registry version %s is served as %s v%s)",
                 self.target.uri, self.interval_s, self.registry_version, self.name,
                 self.version)

    async def stop(self) -> None:
        """Stop polling (a switch in progress is abandoned; the old version stays)."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def run(self) -> None:
        """Check the alias every interval until cancelled; a failed check waits for the next."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception as e:  # noqa: BLE001 - any failure: keep serving, retry next tick
                log.error("following %s: %s: %s; %s v%s keeps serving, retrying in %gs",
                          self.target.uri, type(e).__name__, e, self.name, self.version,
                          self.interval_s)

    async def check(self) -> bool:
        """Switch to the version the alias names if it moved; True when it switched."""
        loop = asyncio.get_running_loop()
        version = await loop.run_in_executor(None, registry_version, self.target)
        if version == self.registry_version:
            return False
        log.info("%s moved from registry version %s to %s: loading it", self.target.uri,
                 self.registry_version, version)
        predictor = await self.dataplane.load_version(self.target.version_uri(version),
                                                      self.name)
        key = version_key(predictor.version)
        if key == version_key(self.version):
            log.warning("registry version %s holds %s v%s, which is already served; nothing "
                        "to switch", version, self.name, self.version)
            self.registry_version = version
            return False
        if key in self.dataplane.models.versions.get(self.name, {}):
            raise ValueError(f"registry version {version} holds {self.name} "
                             f"v{predictor.version}, which is already served (registered "
                             f"through the management API); unregister it to let the alias "
                             f"switch to it")
        self.dataplane.add_version(predictor, default=True)
        old, self.version, self.registry_version = self.version, predictor.version, version
        log.info("%s now serves %s v%s (registry version %s); draining v%s", self.target.uri,
                 self.name, self.version, version, old)
        with contextlib.suppress(ModelNotFound):  # already unregistered by hand
            await self.dataplane.remove_version(self.name, old)
        return True


def start_followers(dataplane: DataPlane, settings: FollowSettings | None
                    ) -> list[AliasFollower]:
    """One started follower per followed alias (none without settings)."""
    followers = [AliasFollower(dataplane, f, settings.interval_s)
                 for f in (settings.followed if settings else ())]
    for follower in followers:
        follower.start()
    return followers
