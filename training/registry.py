"""The MLflow model registry's ``champion`` alias: moved only by a fair comparison or by hand.

Two versions trained on different data have different validation sets, so their recorded
accuracies are not comparable. A candidate is therefore judged against the champion on the
candidate's own evaluation set (its validation split plus its feedback slice), both models
evaluated in the same run with the same code: the champion's weights are re-evaluated. The
candidate becomes champion only when its accuracy beats the champion's by more than
``min_gain`` (default 0.0: strictly better; a tie keeps the version already serving).

Every move of the alias, automatic or by hand, leaves tags on the model version that became
champion (``champion_reason``, ``champion_by``, ``champion_at``, ``champion_previous``) and
on the registered model (``champion_change``); the comparison's scores and decision are tags
on the candidate (``promotion_*``). ``rollback`` without a target follows
``champion_previous`` back one step at a time.
"""

from __future__ import annotations

import csv
import logging
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

CHAMPION = "champion"
VALIDATION, FEEDBACK = "validation", "feedback"
# Written next to predictions.csv when a version was evaluated on a feedback slice.
FEEDBACK_PREDICTIONS = "feedback_predictions.csv"


class RegistryError(RuntimeError):
    """A registry request that cannot be carried out; the message says why and what to do."""


@dataclass(frozen=True)
class EvalItem:
    """One image of an evaluation set: where it is, its true label, which part it is from."""

    path: str
    label: str
    part: str  # VALIDATION | FEEDBACK


@dataclass
class Decision:
    """The outcome of comparing a candidate with the champion on the candidate's set."""

    promoted: bool
    reason: str
    candidate: int
    champion: int | None
    candidate_score: dict | None = None
    champion_score: dict | None = None
    min_gain: float = 0.0

    @property
    def gain(self) -> float | None:
        if self.candidate_score is None or self.champion_score is None:
            return None
        return self.candidate_score["accuracy"] - self.champion_score["accuracy"]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _client(client=None):
    if client is not None:
        return client
    from mlflow import MlflowClient

    return MlflowClient()


# ---------------------------------------------------------------- evaluation on one set
def _read_predictions(path: Path, part: str) -> list[EvalItem]:
    with open(path, newline="") as f:
        return [EvalItem(row["path"], row["true_label"], part) for row in csv.DictReader(f)]


def evaluation_set(version_dir: str | Path) -> list[EvalItem]:
    """The images a version was judged on: its validation split (``predictions.csv``) and,
    when it was trained with feedback, its feedback slice (``feedback_predictions.csv``)."""
    version_dir = Path(version_dir)
    items = _read_predictions(version_dir / "predictions.csv", VALIDATION)
    if (version_dir / FEEDBACK_PREDICTIONS).is_file():
        items += _read_predictions(version_dir / FEEDBACK_PREDICTIONS, FEEDBACK)
    return items


def score(version_dir: str | Path, items: list[EvalItem], device: str = "auto",
          batch_size: int = 64) -> dict:
    """Top-1 accuracy of a version on ``items``, overall and per part.

    Labels are compared by name, so versions with different class orders (or a candidate
    with a class the champion never had: the champion cannot be right on those) compare
    fairly. Each version preprocesses with its own spec, as it is served.
    """
    import numpy as np

    from training.data import eval_transform, make_loader
    from training.engine import pick_device, run_inference
    from training.models import load_eager
    from training.version import load_version

    version = load_version(version_dir)
    missing = [it.path for it in items if not Path(it.path).is_file()]
    if missing:
        raise RegistryError(f"{len(missing)} evaluation image(s) of the candidate are gone, "
                            f"e.g. {missing[0]}; restore them to compare")
    labels_idx = version.class_to_idx
    samples = [(it.path, labels_idx.get(it.label, -1)) for it in items]
    dev = pick_device(device)
    loader = make_loader(samples, eval_transform(version.spec), batch_size, workers=0,
                         shuffle=False)
    logits, labels = run_inference(load_eager(version).to(dev), loader, dev)
    if len(labels) != len(items):
        raise RegistryError(f"{len(items) - len(labels)} evaluation image(s) could not be "
                            f"decoded; the comparison would not be on the same set")
    correct = logits.argmax(axis=1) == labels
    parts = np.array([it.part for it in items])
    out = {"accuracy": float(correct.mean()) if len(items) else 0.0,
           "num_samples": len(items), "unknown_labels": int((labels < 0).sum())}
    for part in (VALIDATION, FEEDBACK):
        mask = parts == part
        out[f"{part}_samples"] = int(mask.sum())
        out[f"{part}_accuracy"] = float(correct[mask].mean()) if mask.any() else None
    return out


def decide(candidate: dict, champion: dict, min_gain: float) -> tuple[bool, str]:
    """Promote when the candidate's accuracy exceeds the champion's by more than
    ``min_gain`` on the same set."""
    gain = candidate["accuracy"] - champion["accuracy"]
    verdict = "better" if gain > min_gain else "not better"
    return gain > min_gain, (f"{verdict} on the same {candidate['num_samples']} images: "
                             f"{candidate['accuracy']:.4f} vs {champion['accuracy']:.4f} "
                             f"(gain {gain:+.4f}, minimum {min_gain:+.4f})")


# ---------------------------------------------------------------- registry reads
def champion_version(model_name: str, client=None):
    """The registry's champion ``ModelVersion`` of ``model_name``, or None."""
    from mlflow.exceptions import MlflowException

    client = _client(client)
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def _model_version(client, model_name: str, version: int):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(model_name, str(version))
    except MlflowException:
        known = [int(mv.version) for mv in
                 client.search_model_versions(f"name = '{model_name}'")]
        raise RegistryError(f"{model_name} has no version {version}; registered versions: "
                            f"{', '.join(map(str, sorted(known))) or 'none'}") from None


def version_dir_of(mv, client=None, download_to: str | Path | None = None) -> Path:
    """A local directory holding the files of registry version ``mv``: the version directory
    it was trained into when still present, else its artifacts downloaded under
    ``download_to`` (a new temp directory by default)."""
    import mlflow

    client = _client(client)
    local = mv.tags.get("version_path")
    if not local and mv.run_id:
        local = client.get_run(mv.run_id).data.tags.get("version_dir")
    if local and (Path(local) / "model_config.json").is_file() \
            and (Path(local) / "model.pth").is_file():
        return Path(local)
    dst = Path(download_to or tempfile.mkdtemp(prefix=f"{mv.name}-v{mv.version}-"))
    log.info("%s version %s: downloading its files from %s", mv.name, mv.version, mv.source)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source,
                                                    dst_path=str(dst)))


def version_dir_for(model_name: str, version: int, client=None,
                    download_to: str | Path | None = None) -> Path:
    """:func:`version_dir_of` for a version number."""
    client = _client(client)
    return version_dir_of(_model_version(client, model_name, version), client, download_to)


def list_versions(model_name: str, client=None) -> list[dict]:
    """Every version of ``model_name`` with its metrics and promotion record, newest first."""
    client = _client(client)
    champ = champion_version(model_name, client)
    rows = []
    for mv in client.search_model_versions(f"name = '{model_name}'"):
        tags = mv.tags or {}
        rows.append({
            "version": int(mv.version),
            "champion": champ is not None and int(champ.version) == int(mv.version),
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc)
            .isoformat(timespec="seconds"),
            "val_acc": _float(tags.get("val_acc")),
            "feedback_acc": _float(tags.get("feedback_acc")),
            "compared_acc": _float(tags.get("promotion_candidate_accuracy")),
            "champion_acc": _float(tags.get("promotion_champion_accuracy")),
            "compared_with": tags.get("promotion_champion_version") or None,
            "decision": tags.get("promotion_decision"),
            "decision_reason": tags.get("promotion_reason"),
            "champion_by": tags.get("champion_by"),
            "champion_reason": tags.get("champion_reason"),
            "rolled_back": tags.get("rolled_back"),
            "version_dir": tags.get("version_path") or tags.get("version_dir"),
            "run_id": mv.run_id,
        })
    return sorted(rows, key=lambda r: -r["version"])


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


# ---------------------------------------------------------------- moving the alias
def _move_champion(client, model_name: str, version: int, reason: str, by: str) -> int | None:
    """Point ``champion`` at ``version`` and record why; returns the previous champion."""
    if not reason.strip():
        raise RegistryError("a reason is required: say why the champion moves (--reason)")
    previous = champion_version(model_name, client)
    prev = int(previous.version) if previous is not None else None
    client.set_registered_model_alias(model_name, CHAMPION, str(version))
    tags = {"champion_reason": reason, "champion_by": by, "champion_at": _now()}
    if by != "rollback" and prev is not None and prev != version:
        tags["champion_previous"] = str(prev)  # a rollback keeps the target's own history
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(version), key, value)
    change = f"v{prev} -> v{version}" if prev is not None else f"-> v{version}"
    client.set_registered_model_tag(model_name, "champion_change",
                                    f"{change} ({by}, {tags['champion_at']}): {reason}")
    log.info("%s: champion %s (%s): %s", model_name, change, by, reason)
    return prev


def promote(model_name: str, version: int, reason: str, client=None) -> int | None:
    """Make ``version`` the champion by hand; returns the previous champion."""
    client = _client(client)
    _model_version(client, model_name, version)
    return _move_champion(client, model_name, version, reason, "manual")


def rollback(model_name: str, reason: str, to: int | None = None, client=None
             ) -> tuple[int, int]:
    """Move the champion back to ``to`` (default: the version it replaced); returns
    ``(from, to)``. The version rolled back from gets a ``rolled_back`` tag with the reason."""
    client = _client(client)
    current = champion_version(model_name, client)
    if current is None:
        raise RegistryError(f"{model_name} has no champion to roll back from; use promote")
    if to is None:
        previous = (current.tags or {}).get("champion_previous")
        if not previous:
            raise RegistryError(f"{model_name} champion v{current.version} records no previous "
                                f"champion; name the target with --to N")
        to = int(previous)
    _model_version(client, model_name, to)
    if int(current.version) == to:
        raise RegistryError(f"v{to} is already the champion of {model_name}")
    _move_champion(client, model_name, to, reason, "rollback")
    client.set_model_version_tag(model_name, str(current.version), "rolled_back",
                                 f"{_now()}: {reason}")
    return int(current.version), to


def register_version(model_name: str, run_id: str, source: str, version_dir: Path,
                     metrics: dict[str, float], client=None):
    """Register ``source`` (the run's copy of ``version_dir``) as a new version, tagged with
    where it was trained and its own metrics; the alias is not touched."""
    client = _client(client)
    if not client.search_registered_models(filter_string=f"name = '{model_name}'"):
        client.create_registered_model(model_name, description="Food-image classifier")
    tags = {"version_dir": Path(version_dir).name, "version_path": str(version_dir),
            **{k: f"{v:.6f}" for k, v in metrics.items() if v is not None}}
    mv = client.create_model_version(model_name, source=source, run_id=run_id, tags=tags)
    if f"v{mv.version}" != Path(version_dir).name:
        log.warning("registry version %s of %r differs from the directory %s (the registry "
                    "and artifacts/ were written by different runs); the tag version_path "
                    "links them", mv.version, model_name, version_dir)
    return mv


def promote_if_better(model_name: str, candidate: int, candidate_dir: str | Path,
                      min_gain: float = 0.0, client=None, device: str = "auto") -> Decision:
    """Compare ``candidate`` with the champion on the candidate's evaluation set, both
    evaluated now, and move ``champion`` when the candidate is better by more than
    ``min_gain``. The scores and the decision are tagged on the candidate version."""
    client = _client(client)
    champ = champion_version(model_name, client)
    if champ is None:
        decision = Decision(True, "first version: there is no champion yet", candidate, None,
                            min_gain=min_gain)
    elif int(champ.version) == candidate:
        return Decision(False, "already the champion", candidate, candidate, min_gain=min_gain)
    else:
        items = evaluation_set(candidate_dir)
        with tempfile.TemporaryDirectory(prefix="champion-") as tmp:
            champion_dir = version_dir_of(champ, client, tmp)
            champion_score = score(champion_dir, items, device)
        candidate_score = score(candidate_dir, items, device)
        promoted, why = decide(candidate_score, champion_score, min_gain)
        decision = Decision(promoted, why, candidate, int(champ.version), candidate_score,
                            champion_score, min_gain)
    _record(client, model_name, decision)
    if decision.promoted:
        _move_champion(client, model_name, candidate, decision.reason, "auto")
    else:
        log.info("%s: v%d stays champion; candidate v%d %s", model_name, decision.champion,
                 candidate, decision.reason)
    return decision


def _record(client, model_name: str, d: Decision) -> None:
    tags = {"promotion_decision": "promoted" if d.promoted else "rejected",
            "promotion_reason": d.reason, "promotion_at": _now(),
            "promotion_min_gain": f"{d.min_gain:.6f}"}
    if d.champion is not None:
        tags["promotion_champion_version"] = str(d.champion)
    if d.candidate_score and d.champion_score:
        tags.update({
            "promotion_candidate_accuracy": f"{d.candidate_score['accuracy']:.6f}",
            "promotion_champion_accuracy": f"{d.champion_score['accuracy']:.6f}",
            "promotion_gain": f"{d.gain:.6f}",
            "promotion_eval_samples": str(d.candidate_score["num_samples"]),
            "promotion_eval_feedback_samples": str(d.candidate_score["feedback_samples"])})
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(d.candidate), key, value)


# ---------------------------------------------------------------- CLI
def promote_cli(args) -> int:
    """``python -m training promote --version N --reason ...``."""
    try:
        previous = promote(args.registered_model, args.version, args.reason)
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.registered_model}: champion is now v{args.version} (was "
          f"{'v' + str(previous) if previous is not None else 'none'})")
    return 0


def rollback_cli(args) -> int:
    """``python -m training rollback [--to N] --reason ...``."""
    try:
        old, new = rollback(args.registered_model, args.reason, args.to)
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.registered_model}: champion rolled back from v{old} to v{new}")
    return 0


def models_cli(args) -> int:
    """``python -m training models``: versions, their metrics, which one is champion."""
    import json

    rows = list_versions(args.registered_model)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"{args.registered_model}: no registered versions")
        return 0

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    print(f"{'':2}{'version':>7}  {'created':<25} {'own_val':>7} {'feedback':>8} "
          f"{'same_set':>8} {'champion':>8} {'vs':>3}  decision")
    for r in rows:
        note = r["decision_reason"] or ""
        if r["rolled_back"]:
            note = f"rolled back {r['rolled_back']}"
        elif r["champion_by"] in ("manual", "rollback"):
            note = f"made champion ({r['champion_by']}): {r['champion_reason']}"
        vs = f"v{r['compared_with']}" if r["compared_with"] else "-"
        print(f"{'*' if r['champion'] else '':2}{r['version']:>7}  {r['created']:<25} "
              f"{fmt(r['val_acc']):>7} {fmt(r['feedback_acc']):>8} {fmt(r['compared_acc']):>8} "
              f"{fmt(r['champion_acc']):>8} {vs:>3}  {r['decision'] or '-'}"
              + (f" - {note}" if note else ""))
    print("* = champion; own_val: accuracy on its own validation split (not comparable "
          "across versions); same_set/champion: both on this version's evaluation set")
    return 0
