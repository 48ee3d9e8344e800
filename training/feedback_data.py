"""Confirmed feedback as training data: the photos people confirmed become extra samples in the
model's classes, and a seeded slice of them is kept aside to evaluate on.

Which slice a photo lands in depends only on its digest and the seed (never on the other
samples or on their order), so a retrain next week with more feedback keeps every evaluation
photo on the evaluation side, and one photo confirmed under two prediction ids can never be
both trained on and evaluated on. Confirmations whose image was not stored (the server runs
without ``--store-images``) cannot be trained on: they are counted and logged, then skipped.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

Sample = tuple[str, int]


@dataclass
class FeedbackSamples:
    """What the feedback store adds to a training run."""

    train: list[Sample]
    eval: list[Sample]
    classes: list[str]  # the model's classes, then any new ones (sorted) when allowed
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    source: dict = field(default_factory=dict)


def in_eval_slice(key: str, seed: int, fraction: float) -> bool:
    """True for the ``fraction`` of keys kept for evaluation: a hash of seed and key, so the
    answer for one key never changes with what else is in the store."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def redact_url(url: str) -> str:
    """A database URL fit for logs and MLflow params: any password replaced by ``***``."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy can parse: show only its scheme
        return url.split(":", 1)[0] + ":..."


def source_key(source: str | None) -> str:
    """Who a confirmation came from, for the per-source cap: the client address the server
    recorded (``app@address`` or ``address``), else the source as given."""
    return (source or "unknown").rsplit("@", 1)[-1]


def cap_per_source(usable: list, max_per_source: int | None) -> tuple[list, int]:
    """Keep at most ``max_per_source`` of each source's samples (its newest: ``usable`` is
    oldest first); returns the kept ones, in order, and how many were dropped."""
    if max_per_source is None:
        return usable, 0
    seen: dict[str, int] = {}
    kept = []
    for item in reversed(usable):
        key = source_key(item[0].source)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= max_per_source:
            kept.append(item)
    kept.reverse()
    dropped = len(usable) - len(kept)
    if dropped:
        heavy = sorted((k for k, n in seen.items() if n > max_per_source))
        log.warning("feedback: %d confirmed photo(s) over feedback_max_per_source=%d dropped "
                    "(from %s)", dropped, max_per_source, ", ".join(heavy[:5]))
    return kept, dropped


def load_feedback(url: str, model: str, classes: list[str], *, seed: int,
                  eval_fraction: float, allow_new_classes: bool = False,
                  max_per_source: int | None = None) -> FeedbackSamples:
    """Confirmed samples of ``model`` from the store at ``url`` -> train and eval samples.

    Labels outside ``classes`` are skipped unless ``allow_new_classes``, which appends them.
    ``max_per_source`` caps what one source contributes (:func:`cap_per_source`).
    """
    from serving.feedback import FeedbackStore

    if not 0 <= eval_fraction < 1:
        raise ValueError(f"feedback_eval_fraction={eval_fraction} must be in [0, 1)")
    with FeedbackStore(url) as store:  # no images_dir: reading must never prune images
        confirmed = store.confirmed(model)
    classes = list(classes)
    known = set(classes)
    skipped = {"no_image": 0, "missing_file": 0, "unknown_class": 0}
    usable = []
    for sample in confirmed:
        if sample.image_path is None:
            skipped["no_image"] += 1
            continue
        path = Path(sample.image_path)
        if not path.is_file():
            skipped["missing_file"] += 1
            log.warning("feedback %s: stored image %s is gone; skipped", sample.prediction_id,
                        path)
            continue
        if sample.label not in known and not allow_new_classes:
            skipped["unknown_class"] += 1
            continue
        usable.append((sample, str(path.resolve())))
    usable, skipped["over_source_cap"] = cap_per_source(usable, max_per_source)
    new = sorted({s.label for s, _ in usable} - known)
    classes += new
    idx = {c: i for i, c in enumerate(classes)}
    train, held_out = [], []
    # ordered by image digest, not by the random prediction id: the same photos give the
    # same training order, so a retrain on them is reproducible
    for sample, path in sorted(usable, key=lambda item: (item[0].image_sha256 or
                                                         item[0].prediction_id,
                                                         item[0].prediction_id)):
        key = sample.image_sha256 or sample.prediction_id
        (held_out if in_eval_slice(key, seed, eval_fraction) else train).append(
            (path, idx[sample.label]))
    if skipped["no_image"]:
        log.info("feedback: %d confirmed label(s) of %r have no stored image (the server ran "
                 "without --store-images); they cannot be trained on and are skipped",
                 skipped["no_image"], model)
    if skipped["unknown_class"]:
        log.info("feedback: %d confirmed label(s) name a class the model does not have; "
                 "skipped (set feedback_new_classes: true to add them as classes)",
                 skipped["unknown_class"])
    if new:
        log.info("feedback: new class(es) %s", ", ".join(new))
    log.info("feedback from %s: %d confirmed, %d to train on, %d kept for evaluation",
             redact_url(url), len(confirmed), len(train), len(held_out))
    source = {"url": redact_url(url), "model": model, "confirmed": len(confirmed),
              "train": len(train), "eval": len(held_out), "eval_fraction": eval_fraction,
              "new_classes": new, "skipped": {k: v for k, v in skipped.items() if v}}
    return FeedbackSamples(train, held_out, classes, skipped, source)
