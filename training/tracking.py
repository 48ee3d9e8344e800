"""MLflow tracking and registry, best effort: a tracking failure never stops training.

The first failure (server down, bad URI, permissions) is logged once and every later call
becomes a no-op, so a user without MLflow still gets their model version.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

CHAMPION = "champion"


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

    def __init__(self, experiment: str, run_id: str | None = None) -> None:
        self.enabled = True
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

    def register(self, model_name: str, version_number: int, val_acc: float) -> int | None:
        """Register ``<run>/version`` as a new version of ``model_name``; move ``champion``
        to it when its validation accuracy beats the current champion's."""
        return self._guard("register the model", self._register, model_name,
                           version_number, val_acc)

    def _register(self, model_name: str, version_number: int, val_acc: float) -> int:
        from mlflow.exceptions import MlflowException

        client = self._mlflow.MlflowClient()
        if not client.search_registered_models(filter_string=f"name = '{model_name}'"):
            client.create_registered_model(model_name, description="Food-image classifier")
        source = f"{self._mlflow.get_run(self.run_id).info.artifact_uri}/version"
        mv = client.create_model_version(
            model_name, source=source, run_id=self.run_id,
            tags={"version_dir": f"v{version_number}", "val_acc": f"{val_acc:.6f}"})
        if int(mv.version) != version_number:
            log.warning("registry version %s of %r differs from the directory v%d "
                        "(the registry and artifacts/ were written by different runs); "
                        "the tag version_dir links them", mv.version, model_name,
                        version_number)
        champion_acc = None
        try:
            champ = client.get_model_version_by_alias(model_name, CHAMPION)
            champion_acc = float(champ.tags.get("val_acc", "nan"))
        except MlflowException:
            log.info("%s has no %s yet", model_name, CHAMPION)
        if champion_acc is None or not champion_acc >= val_acc:
            client.set_registered_model_alias(model_name, CHAMPION, mv.version)
            log.info("%s version %s is the new %s (val_acc %.4f, previous %s)", model_name,
                     mv.version, CHAMPION, val_acc, champion_acc)
        else:
            log.info("the %s of %s stays (its val_acc %.4f >= %.4f)", CHAMPION,
                     model_name, champion_acc, val_acc)
        return int(mv.version)

    def end(self, status: str = "FINISHED") -> None:
        self._guard("end the run", self._mlflow_call, "end_run", status=status)
