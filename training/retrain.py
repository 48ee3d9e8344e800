"""Retrain when it is time: enough new confirmed labels, or a champion that is too old.

``python -m training retrain --if-needed --min-new-labels N --max-age-days D`` is meant for a
cron line or a Kubernetes CronJob. It trains only when at least N labels were confirmed
since the reference time, or the reference time is D days or more ago; the reference time
is when the champion's training run started or, if later, when the last retrain that did
train started (a candidate that lost to the champion counts as an attempt, so an hourly cron
does not retrain on the same labels every hour). Otherwise it exits 0 and says why.

A retrain runs the usual recipe with the feedback store added (train -> evaluate -> register
-> promote on the same evaluation set) and, when the candidate became champion and
``--deploy-torchserve`` is given, switches TorchServe to it. ``--export`` exports the new
version (``model.onnx``, ``model.ts``) into its registry version, which is what an ONNX server
following the alias (``--model models:/<name>@champion --follow 30s``) loads: the alias moves
when training registers the version, so a follower that looks before the export is done
finds no ``model.onnx`` yet, keeps serving the old version and loads the new one at a later
tick. Every invocation is an MLflow
run named ``retrain`` in the training experiment: its decision, reason and outcome are tags,
its thresholds params, so the history is in the MLflow UI next to the training runs.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from training.config import TrainConfig

log = logging.getLogger(__name__)

RUN_NAME = "retrain"
DECISION_TAG = "retrain_decision"  # "train" | "skip"


@dataclass
class RetrainCheck:
    """Whether a retrain is due, and the figures that decided it."""

    needed: bool
    reason: str
    new_labels: int | None = None
    since: datetime | None = None
    champion: int | None = None
    age_days: float | None = None


@dataclass
class RetrainOutcome:
    """What one ``retrain`` invocation did."""

    check: RetrainCheck
    run_id: str | None = None
    version_dir: Path | None = None
    candidate: int | None = None
    promoted: bool = False
    promotion_reason: str | None = None
    exported: bool = False
    deployed: bool = False
    details: dict = field(default_factory=dict)


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, timezone.utc)


def _experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def _last_attempt(client, experiment_id: str) -> datetime | None:
    runs = client.search_runs([experiment_id],
                              filter_string=f"tags.{DECISION_TAG} = 'train'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return _utc(runs[0].info.start_time) if runs else None


def check(config: TrainConfig, min_new_labels: int, max_age_days: float, client=None,
          now: datetime | None = None) -> RetrainCheck:
    """Decide whether a retrain is due (see the module doc for the rule)."""
    from training.registry import champion_version

    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient()
    now = now or datetime.now(timezone.utc)
    champ = champion_version(config.registered_model, client)
    if champ is None:
        return RetrainCheck(True, f"{config.registered_model} has no champion yet")
    trained = _utc(client.get_run(champ.run_id).info.start_time) if champ.run_id \
        else _utc(champ.creation_timestamp)
    last = _last_attempt(client, _experiment_id(client, config.experiment))
    since = max(trained, last) if last else trained
    what = f"champion v{champ.version} trained" if since == trained else "last retrain"
    age = (now - since).total_seconds() / 86400
    new = None
    if config.feedback:
        from serving.feedback import FeedbackStore

        with FeedbackStore(config.feedback) as store:
            new = store.count_confirmed(config.name, since=since)
    labels = ("no feedback store given" if new is None else
              f"{new} new confirmed label(s) for {config.name!r} since the {what} "
              f"({since.isoformat(timespec='seconds')})")
    figures = {"new_labels": new, "since": since, "champion": int(champ.version),
               "age_days": age}
    if new is not None and new >= min_new_labels:
        return RetrainCheck(True, f"{labels} >= {min_new_labels}", **figures)
    if age >= max_age_days:
        return RetrainCheck(True, f"the {what} {age:.1f} days ago (>= {max_age_days:g}); "
                                  f"{labels}", **figures)
    below = "" if new is None else f" < {min_new_labels}"
    return RetrainCheck(False, f"nothing to do: {labels}{below}, and the {what} {age:.1f} "
                               f"days ago (< {max_age_days:g})", **figures)


def retrain(config: TrainConfig, *, if_needed: bool, min_new_labels: int, max_age_days: float,
            deploy_torchserve: str | None = None, deploy_options: dict | None = None,
            export: bool = False, client=None) -> RetrainOutcome:
    """Check, then train -> evaluate -> promote (inside training) -> optionally export and
    deploy; the whole invocation is recorded as a ``retrain`` MLflow run."""
    from training.feedback_data import redact_url

    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient()
    if if_needed:
        decision = check(config, min_new_labels, max_age_days, client)
    else:
        decision = RetrainCheck(True, "asked to retrain (without --if-needed)")
    log.info("retrain: %s", decision.reason)
    run = client.create_run(_experiment_id(client, config.experiment), run_name=RUN_NAME,
                            tags={DECISION_TAG: "train" if decision.needed else "skip",
                                  "retrain_reason": decision.reason[:5000]})
    run_id = run.info.run_id
    outcome = RetrainOutcome(decision, run_id)
    params = {"if_needed": if_needed, "min_new_labels": min_new_labels,
              "max_age_days": max_age_days, "registered_model": config.registered_model,
              "feedback": redact_url(config.feedback) if config.feedback else None,
              "deploy_torchserve": deploy_torchserve, "export": export}
    for key, value in params.items():
        client.log_param(run_id, key, str(value))
    for key, value in (("new_labels", decision.new_labels),
                       ("champion_age_days", decision.age_days)):
        if value is not None:
            client.log_metric(run_id, key, float(value))
    if not decision.needed:
        client.set_terminated(run_id, "FINISHED")
        return outcome
    try:
        _train_and_promote(config, client, outcome)
        if export:
            from training.export import export_version

            export_version(outcome.version_dir)  # logged into the version's MLflow run
            outcome.exported = True
            client.set_tag(run_id, "exported", "true")
        if outcome.promoted and deploy_torchserve:
            from training.deploy import deploy_torchserve as deploy

            result = deploy(deploy_torchserve, outcome.version_dir, name=config.name,
                            **(deploy_options or {}))
            outcome.deployed = True
            outcome.details["deploy"] = {"version": result.version,
                                         "replaced": result.replaced,
                                         "seconds": result.seconds}
        client.set_tag(run_id, "deployed", str(outcome.deployed).lower())
        client.set_terminated(run_id, "FINISHED")
    except BaseException as e:
        client.set_tag(run_id, "error", f"{type(e).__name__}: {e}"[:5000])
        client.set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt)
                              else "FAILED")
        raise
    return outcome


def _train_and_promote(config: TrainConfig, client, outcome: RetrainOutcome) -> None:
    from training.train import train
    from training.version import load_version

    version_dir = train(config)
    outcome.version_dir = version_dir
    training_run = load_version(version_dir).config.get("mlflow_run_id")
    client.set_tag(outcome.run_id, "version_dir", str(version_dir))
    if not training_run:
        raise RuntimeError(f"{version_dir} was trained without MLflow tracking, so it was not "
                           f"registered or compared; check MLFLOW_TRACKING_URI")
    client.set_tag(outcome.run_id, "training_run_id", training_run)
    versions = client.search_model_versions(
        f"name = '{config.registered_model}' and run_id = '{training_run}'")
    if not versions:
        raise RuntimeError(f"the training run {training_run} registered no version of "
                           f"{config.registered_model}")
    mv = versions[0]
    tags = mv.tags or {}
    outcome.candidate = int(mv.version)
    outcome.promoted = tags.get("promotion_decision") == "promoted"
    outcome.promotion_reason = tags.get("promotion_reason")
    client.set_tag(outcome.run_id, "candidate_version", str(mv.version))
    client.set_tag(outcome.run_id, "promoted", str(outcome.promoted).lower())
    if outcome.promotion_reason:
        client.set_tag(outcome.run_id, "promotion_reason", outcome.promotion_reason[:5000])


def retrain_cli(args, overrides: list[str]) -> int:
    """``python -m training retrain [--if-needed] ...``; config overrides as for ``train``."""
    from training.config import ConfigError, load_config

    if args.feedback:
        overrides = [*overrides, "--feedback", args.feedback]
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.if_needed and args.min_new_labels < 1:
        print(f"error: --min-new-labels {args.min_new_labels} must be >= 1", file=sys.stderr)
        return 2
    if args.if_needed and args.max_age_days <= 0:
        print(f"error: --max-age-days {args.max_age_days} must be > 0", file=sys.stderr)
        return 2
    options = {"model_store": args.model_store, "inference_url": args.inference}
    outcome = retrain(config, if_needed=args.if_needed, min_new_labels=args.min_new_labels,
                      max_age_days=args.max_age_days, deploy_torchserve=args.deploy_torchserve,
                      deploy_options=options, export=args.export)
    if not outcome.check.needed:
        print(f"no retrain: {outcome.check.reason}")
        return 0
    summary = {"reason": outcome.check.reason, "version_dir": str(outcome.version_dir),
               "candidate": outcome.candidate, "promoted": outcome.promoted,
               "promotion": outcome.promotion_reason, "exported": outcome.exported,
               "deployed": outcome.deployed,
               "retrain_run": outcome.run_id}
    print(json.dumps(summary, indent=2))
    return 0
