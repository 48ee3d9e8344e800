"""MLflow tracking and registry, best effort: a tracking failure never stops training.

The first failure (server down, bad URI, permissions) is logged once and every later call
becomes a no-op, so a user without MLflow still gets their model version.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


def git_commit() -> str | None:
    """The commit this code was checked out at (recorded in a version), or None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=False, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class Tracker:
    """One MLflow run for one training run (kept across ``--resume``)."""

    def __init__(self, experiment: str, run_id: str | None = None,
                 enabled: bool = True) -> None:
        """``enabled=False``: every call is a no-op (the ranks other than 0 of a job)."""
        self.enabled = enabled
        self.run_id: str | None = None
        self._mlflow = None
        self._guard("start the MLflow run", self._start, experiment, run_id)

    def _start(self, experiment: str, run_id: str | None) -> None:
        import mlflow

        self._mlflow = mlflow
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_id=run_id)
        self.run_id = run.info.run_id
        log.info("MLflow run %s in experiment %r (tracking URI %s)", self.run_id, experiment,
                 mlflow.get_tracking_uri())

    def _guard(self, what: str, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any tracking failure: say so once, keep training
            self.enabled = False
            log.warning("MLflow tracking disabled for the rest of this run: could not %s "
                        "(%s: %s). Training continues; set MLFLOW_TRACKING_URI to a reachable "
                        "store to track runs.", what, type(e).__name__, e)
            return None

    def log_params(self, params: dict) -> None:
        flat = {k: (",".join(map(str, v)) if isinstance(v, list) else v)
                for k, v in params.items()}
        self._guard("log params", self._mlflow_call, "log_params", flat)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._guard("log metrics", self._mlflow_call, "log_metrics", metrics, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._guard("set tags", self._mlflow_call, "set_tags", tags)

    def log_version_dir(self, version_dir: Path) -> None:
        """Log the version's files under ``version/`` (the registered model's source)."""
        self._guard("log artifacts", self._mlflow_call, "log_artifacts", str(version_dir),
                    "version")

    def _mlflow_call(self, name: str, *args, **kwargs):
        return getattr(self._mlflow, name)(*args, **kwargs)

    def register(self, model_name: str, version_dir: Path, metrics: dict[str, float | None],
                 min_gain: float = 0.0, device: str = "auto") -> int | None:
        """Register ``<run>/version`` as a new version of ``model_name`` (tagged with
        ``metrics``), then move ``champion`` to it only if it beats the champion on its own
        evaluation set, both evaluated now (:func:`training.registry.promote_if_better`)."""
        return self._guard("register the model", self._register, model_name,
                           Path(version_dir), metrics, min_gain, device)

    def _register(self, model_name: str, version_dir: Path, metrics: dict[str, float | None],
                  min_gain: float, device: str) -> int:
        from training.registry import RegistryError, promote_if_better, register_version

        source = f"{self._mlflow.get_run(self.run_id).info.artifact_uri}/version"
        mv = register_version(model_name, self.run_id, source, version_dir, metrics)
        try:
            promote_if_better(model_name, int(mv.version), version_dir, min_gain,
                              device=device)
        except RegistryError as e:
            log.warning("%s version %s is registered but was not compared with the champion "
                        "(%s); `python -m training promote --version %s` makes it champion "
                        "by hand", model_name, mv.version, e, mv.version)
        return int(mv.version)

    def end(self, status: str = "FINISHED") -> None:
        self._guard("end the run", self._mlflow_call, "end_run", status=status)
