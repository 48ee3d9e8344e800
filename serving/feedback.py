"""The prediction log and the feedback store: what was answered, and what people confirmed.

``FeedbackStore(url)`` keeps three tables in any SQLAlchemy database (SQLite by default, in
WAL mode so several processes can share one file; PostgreSQL for more than one machine):

- ``prediction_log``: one row per answered prediction (uuid4-hex id, UTC time, model,
  version, top-k, top-1, image sha256, and the stored image's path when images are kept);
- ``prediction_feedback``: every confirmed label ever sent, oldest first; the **latest** row
  for a prediction id is its label (earlier rows stay as history);
- ``model_classes``: each served model version's labels, so feedback can be checked
  against the classes of the version that answered (also from apps that front TorchServe).

Predictions are recorded off the request path: ``log_prediction`` only puts the record on a
bounded queue that a writer thread drains in batches (one transaction per batch); a full
queue or a failing database drops records and counts them, it never blocks or fails the
request. ``add_feedback`` is synchronous and returns only after its transaction committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from serving.atomic import atomic_write_bytes, clean_stale
from serving.errors import ServingError

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///feedback.db"
MAX_LABEL_CHARS = 200
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
_IMAGE_SUFFIXES = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"),
                   (b"BM", ".bmp"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))

metadata = sa.MetaData()


class UTCDateTime(sa.TypeDecorator):
    """Timestamps stored as naive UTC (the same on SQLite and PostgreSQL), read back aware."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


predictions_table = sa.Table(
    "prediction_log", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("created_at", UTCDateTime, nullable=False, index=True),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("version", sa.String(100), nullable=False),
    sa.Column("top1_label", sa.String(MAX_LABEL_CHARS), nullable=False),
    sa.Column("top1_probability", sa.Float, nullable=False),
    sa.Column("topk", sa.JSON, nullable=False),
    sa.Column("image_sha256", sa.String(64), index=True),
    sa.Column("image_path", sa.Text),
    sa.Index("ix_prediction_log_model_version", "model", "version"),
)

feedback_table = sa.Table(
    "prediction_feedback", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("prediction_id", sa.String(32), sa.ForeignKey("prediction_log.id"),
              nullable=False, index=True),
    sa.Column("label", sa.String(MAX_LABEL_CHARS), nullable=False),
    sa.Column("new_class", sa.Boolean, nullable=False, default=False),
    sa.Column("source", sa.String(200)),
    sa.Column("created_at", UTCDateTime, nullable=False, index=True),
)

classes_table = sa.Table(
    "model_classes", metadata,
    sa.Column("model", sa.String(200), primary_key=True),
    sa.Column("version", sa.String(100), primary_key=True),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)


# ---- records and results ----------------------------------------------------------------

@dataclass
class PredictionRecord:
    """One answered prediction as the log keeps it."""

    id: str
    created_at: datetime
    model: str
    version: str
    topk: list[dict]  # [{"label", "probability"}], highest first
    image_sha256: str | None = None
    image_path: str | None = None  # set only when images are stored


@dataclass(frozen=True)
class ConfirmedSample:
    """A prediction with its latest confirmed label: one training sample when its image is kept."""

    prediction_id: str
    label: str
    image_path: str | None  # None when the image was not stored (or was pruned)
    image_sha256: str | None
    model: str
    version: str
    served_top1: str
    confirmed_at: datetime
    source: str | None
    new_class: bool = False


@dataclass(frozen=True)
class FeedbackResult:
    """What ``add_feedback`` committed."""

    prediction_id: str
    label: str
    model: str
    version: str
    served_top1: str
    agreed: bool  # the confirmed label equals the served top-1
    new_class: bool  # the label is not one of the version's classes (accepted on request)
    replaced: str | None  # the label this one supersedes, if the id had feedback already
    confirmed_at: datetime

    def to_dict(self) -> dict:
        d = asdict(self)
        d["confirmed_at"] = self.confirmed_at.isoformat()
        return d


@dataclass(frozen=True)
class PruneResult:
    images_removed: int = 0
    predictions_removed: int = 0


# ---- errors (rendered as {"code", "type", "message"} by the HTTP app) ----------------------

class FeedbackError(ServingError):
    """A feedback request that cannot be accepted."""

    status = 400
    type = "InvalidFeedback"


class PredictionNotFound(FeedbackError):
    """No logged prediction has this id (never logged, dropped, or pruned by retention)."""

    status = 404
    type = "PredictionNotFoundException"


class LabelNotAllowed(FeedbackError):
    """The label is not a class of the model version that answered."""

    status = 400
    type = "InvalidLabel"

    def __init__(self, message: str, allowed: Sequence[str]) -> None:
        super().__init__(message)
        self.allowed = list(allowed)


class StoreUnavailable(FeedbackError):
    """The database cannot be reached or written right now; the client may retry."""

    status = 503
    type = "ServiceUnavailableException"


# ---- metrics ------------------------------------------------------------------------------

class FeedbackMetrics:
    """Prediction-log and feedback metrics, registered in the server's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        mv = ["model", "version"]
        self.top1 = Counter(
            "predictions_top1", "Predictions served, by model, version and top-1 label",
            mv + ["label"], registry=registry)
        self.confidence = Histogram(
            "prediction_confidence", "Top-1 probability of served predictions", mv,
            buckets=CONFIDENCE_BUCKETS, registry=registry)
        self.written = Counter(
            "prediction_log_written", "Prediction records committed to the store",
            registry=registry)
        self.failures = Counter(
            "prediction_log_failures", "Prediction-log writes that did not happen: "
            "queue_full and store_error lose the record, image_error and image_queue_full "
            "only its image", ["reason"], registry=registry)
        self.queue_depth = Gauge(
            "prediction_log_queue_depth", "Prediction records waiting for the writer",
            registry=registry)
        self.feedback = Counter(
            "feedback", "Feedback labels committed (corrections included)", mv,
            registry=registry)
        self.rejected = Counter(
            "feedback_rejected", "Feedback refused, by reason", ["reason"], registry=registry)
        self.confirmed = Counter(
            "feedback_confirmed_predictions", "Predictions that received their first "
            "confirmed label in this process", mv, registry=registry)
        self.agreed = Counter(
            "feedback_agreed_predictions", "Predictions whose first confirmed label equals "
            "the served top-1, in this process", mv, registry=registry)
        self.agreement = Gauge(
            "feedback_agreement_ratio", "Share of confirmed predictions whose latest label "
            "equals the served top-1 (whole store, refreshed by the writer)", mv,
            registry=registry)


# ---- the store ------------------------------------------------------------------------------

@dataclass(frozen=True)
class FeedbackSettings:
    """Where a server logs its predictions and how long it keeps them (``--feedback-db``)."""

    url: str = DEFAULT_URL
    images_dir: str | None = None  # None: images are not kept, only their sha256
    image_max_age_days: float | None = 30.0
    max_images: int | None = 10_000
    prediction_max_age_days: float | None = None  # None: unconfirmed rows are kept

    def open(self, registry: CollectorRegistry | None = None) -> FeedbackStore:
        """The store these settings describe, its metrics in ``registry``."""
        return FeedbackStore(self.url, self.images_dir, registry=registry,
                             image_max_age_days=self.image_max_age_days,
                             max_images=self.max_images,
                             prediction_max_age_days=self.prediction_max_age_days)


@dataclass
class _Queued:
    record: PredictionRecord
    image: bytes | None = None


@dataclass
class _Retention:
    image_max_age_days: float | None = 30.0
    max_images: int | None = 10_000
    prediction_max_age_days: float | None = None
    interval_s: float = 600.0
    next_run: float = field(default=0.0)


_WAKE = _Queued(PredictionRecord("", datetime.min, "", "", []))  # wakes the writer on close


def new_prediction_id() -> str:
    """A fresh prediction id: uuid4 as 32 hex digits."""
    return uuid.uuid4().hex


def _normalize_topk(topk: Iterable) -> list[dict]:
    out = []
    for p in topk:
        d = p.to_dict() if hasattr(p, "to_dict") else dict(p)
        out.append({"label": str(d["label"]), "probability": float(d["probability"])})
    if not out:
        raise ValueError("a logged prediction needs at least one {label, probability}")
    return out


def _image_suffix(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((s for magic, s in _IMAGE_SUFFIXES if data.startswith(magic)), ".bin")


def _make_engine(url: str, busy_timeout_ms: int) -> Engine:
    """An engine for ``url``; SQLite gets WAL, synchronous=FULL, a busy timeout and
    ``BEGIN IMMEDIATE`` for write transactions so processes queue instead of failing."""
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as e:
        raise ValueError(f"feedback database URL {url!r} is not a SQLAlchemy URL ({e}); use "
                         f"sqlite:///feedback.db or postgresql://user@host/db") from e
    if parsed.drivername == "postgresql":  # SQLAlchemy's default driver is psycopg2
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            parsed = parsed.set(drivername="postgresql+psycopg")
    if not parsed.drivername.startswith("sqlite"):
        try:
            connect_args = ({"connect_timeout": 10} if parsed.drivername.startswith("postgresql")
                            and "connect_timeout" not in parsed.query else {})
            return sa.create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
        except (sa.exc.ArgumentError, ImportError) as e:
            raise ValueError(
                f"feedback database {parsed.render_as_string(hide_password=True)}: {e}; for "
                f"PostgreSQL pip install 'food-classifier[postgres]'") from e

    memory = parsed.database in (None, "", ":memory:")
    if not memory:
        with contextlib.suppress(OSError):  # if it cannot be made, connecting says why
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        parsed, connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000},
        poolclass=StaticPool if memory else None)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if not memory:
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")  # a commit survives power loss
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("feedback_write")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class FeedbackStore:
    """The prediction log + feedback tables behind one SQLAlchemy URL, with a writer thread.

    ``images_dir`` turns on image storage (off by default: these are people's photos):
    images are written atomically under ``images_dir/<sha[:2]>/<sha256>.<ext>`` (one file per
    distinct image) and pruned by age and count (``prune``, run by the writer every
    ``prune_interval_s``). ``prediction_max_age_days`` also deletes unconfirmed prediction
    rows older than that. Metrics go to ``registry`` (a private one if not given).
    """

    def __init__(self, url: str = DEFAULT_URL, images_dir: str | os.PathLike | None = None, *,
                 registry: CollectorRegistry | None = None, queue_size: int = 10_000,
                 batch_size: int = 500, max_queued_image_bytes: int = 256 * 1024 * 1024,
                 image_max_age_days: float | None = 30.0, max_images: int | None = 10_000,
                 prediction_max_age_days: float | None = None,
                 prune_interval_s: float = 600.0, metrics_interval_s: float = 30.0,
                 busy_timeout_ms: int = 10_000, flush_timeout_s: float = 5.0) -> None:
        if queue_size < 1 or batch_size < 1:
            raise ValueError(f"queue_size and batch_size must be >= 1, got {queue_size}, "
                             f"{batch_size}")
        self.url = url
        self.engine = _make_engine(url, busy_timeout_ms)
        self.images_dir = Path(images_dir).resolve() if images_dir else None
        if self.images_dir is not None:
            self.images_dir.mkdir(parents=True, exist_ok=True)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = FeedbackMetrics(self.registry)
        self.batch_size = batch_size
        self.flush_timeout_s = flush_timeout_s
        self.metrics_interval_s = metrics_interval_s
        self.retention = _Retention(image_max_age_days, max_images, prediction_max_age_days,
                                    prune_interval_s)
        self._queue: queue.Queue[_Queued] = queue.Queue(maxsize=queue_size)
        self._max_queued_image_bytes = max_queued_image_bytes
        self._queued_image_bytes = 0
        self._pending: set[str] = set()  # ids queued or being written by this process
        self._lock = threading.Lock()
        self._written = threading.Condition(self._lock)
        self._classes: dict[tuple[str, str], list[str]] = {}
        self._classes_saved: set[tuple[str, str]] = set()
        self._dirty_versions: set[tuple[str, str]] = set()
        self._ready = False
        self._healthy = True
        self._stop = threading.Event()
        self._log_counts = {"written": 0, "queue_full": 0, "store_error": 0, "image_error": 0,
                            "image_queue_full": 0}  # this process's, for stats()
        try:
            self._ensure_ready()
        except sa.exc.SQLAlchemyError as e:  # serve anyway; the writer retries and counts
            log.error("feedback store %s is not usable yet (%s); predictions are served and "
                      "failed log writes counted until it is", self.safe_url, e)
        self._writer = threading.Thread(target=self._run, name="prediction-log-writer",
                                        daemon=True)
        self._writer.start()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._log_counts[key] += n

    def _fail(self, reason: str, n: int = 1) -> None:
        self.metrics.failures.labels(reason).inc(n)
        self._count(reason, n)

    @property
    def safe_url(self) -> str:
        """The URL with its password hidden, for logs and messages."""
        return make_url(self.url).render_as_string(hide_password=True)

    # ---- schema and connections ----------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite), committed on exit."""
        with self.engine.connect() as conn:
            conn.execution_options(feedback_write=True)
            with conn.begin():
                yield conn

    def _ensure_ready(self) -> None:
        """Create missing tables and save model classes registered while the store was down."""
        if not self._ready:
            for attempt in range(3):  # two processes creating the same tables may race
                try:
                    with self._write() as conn:
                        metadata.create_all(conn, checkfirst=True)
                    break
                except (sa.exc.OperationalError, sa.exc.ProgrammingError,
                        sa.exc.IntegrityError):
                    if attempt == 2:
                        raise
                    time.sleep(0.1)
            self._ready = True
        with self._lock:
            unsaved = [(k, v) for k, v in self._classes.items() if k not in self._classes_saved]
        for key, labels in unsaved:
            self._save_classes(*key, labels)

    def _save_classes(self, model: str, version: str, labels: list[str]) -> None:
        for attempt in range(2):
            try:
                with self._write() as conn:
                    where = (classes_table.c.model == model) & (classes_table.c.version == version)
                    row = conn.execute(sa.select(classes_table.c.labels).where(where)).first()
                    now = datetime.now(timezone.utc)
                    if row is None:
                        conn.execute(classes_table.insert().values(
                            model=model, version=version, labels=labels, updated_at=now))
                    elif list(row.labels) != labels:
                        conn.execute(classes_table.update().where(where).values(
                            labels=labels, updated_at=now))
                break
            except sa.exc.IntegrityError:  # another process inserted it first; compare again
                if attempt == 1:
                    raise
        with self._lock:
            if self._classes.get((model, version)) == labels:
                self._classes_saved.add((model, version))

    def register_model(self, model: str, version: str, labels: Sequence[str]) -> None:
        """Remember a served version's classes (checked by ``add_feedback``); call at load."""
        key = (str(model), str(version))
        with self._lock:
            self._classes[key] = [str(label) for label in labels]
            self._classes_saved.discard(key)
        try:
            self._ensure_ready()
        except sa.exc.SQLAlchemyError as e:
            log.warning("could not save the classes of %s v%s yet: %s", *key, e)

    # ---- the prediction log --------------------------------------------------------------

    def log_prediction(self, model: str, version: str, topk: Iterable,
                       image: bytes | None = None,
                       labels: Sequence[str] | None = None) -> str | None:
        """Count a served prediction and queue its record; returns its id, or None when the
        queue is full (the record is dropped and counted). Never blocks, never raises for
        store trouble. ``labels`` (the version's classes) are saved by the writer the first
        time a version is seen, so feedback can be checked against them."""
        answer = _normalize_topk(topk)
        model, version = str(model), str(version)
        if labels is not None and (model, version) not in self._classes:
            with self._lock:
                self._classes.setdefault((model, version), [str(x) for x in labels])
        self.metrics.top1.labels(model, version, answer[0]["label"]).inc()
        self.metrics.confidence.labels(model, version).observe(answer[0]["probability"])
        record = PredictionRecord(id=new_prediction_id(), created_at=datetime.now(timezone.utc),
                                  model=model, version=version, topk=answer)
        return record.id if self.submit(record, image) else None

    def submit(self, record: PredictionRecord, image: bytes | None = None) -> bool:
        """Queue a record for the writer, with the image bytes it is to hash (and store,
        when images are kept) if ``image`` is given. Queued images are held within a memory
        budget; beyond it the image is hashed here and not stored. False if the queue is full.
        """
        if image is not None:
            with self._lock:
                fits = self._queued_image_bytes + len(image) <= self._max_queued_image_bytes
                if fits:
                    self._queued_image_bytes += len(image)
            if fits:
                image = bytes(image)
            else:
                record.image_sha256 = hashlib.sha256(image).hexdigest()
                image = None
                if self.images_dir is not None:
                    self._fail("image_queue_full")
        with self._lock:
            self._pending.add(record.id)
        try:
            self._queue.put_nowait(_Queued(record, image))
        except queue.Full:
            with self._lock:
                self._pending.discard(record.id)
                if image is not None:
                    self._queued_image_bytes -= len(image)
            self._fail("queue_full")
            return False
        self.metrics.queue_depth.set(self._queue.qsize())
        return True

    def record_predictions(self, rows: list[PredictionRecord]) -> None:
        """Insert prediction records in one transaction (executemany); raises on failure."""
        if not rows:
            return
        self._ensure_ready()
        values = [{"id": r.id, "created_at": r.created_at, "model": r.model,
                   "version": r.version, "top1_label": r.topk[0]["label"],
                   "top1_probability": r.topk[0]["probability"], "topk": r.topk,
                   "image_sha256": r.image_sha256, "image_path": r.image_path} for r in rows]
        with self._write() as conn:
            conn.execute(predictions_table.insert(), values)
        self.metrics.written.inc(len(rows))
        self._count("written", len(rows))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record queued so far was written (or failed); False on timeout."""
        deadline = time.monotonic() + (self.flush_timeout_s if timeout is None else timeout)
        with self._written:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._writer.is_alive():
                    return False
                self._written.wait(remaining)
        return True

    def _store_image(self, record: PredictionRecord, data: bytes) -> None:
        sha = record.image_sha256
        folder = self.images_dir / sha[:2]
        path = folder / f"{sha}{_image_suffix(data)}"
        try:
            if path.exists():
                os.utime(path)  # seen again: its retention age starts over
            else:
                folder.mkdir(exist_ok=True)
                atomic_write_bytes(path, data)
            record.image_path = str(path)
        except OSError as e:
            self._fail("image_error")
            log.warning("could not store image %s: %s", path, e)

    def _write_batch(self, batch: list[_Queued]) -> None:
        try:
            for item in batch:
                if item.image is not None:
                    item.record.image_sha256 = hashlib.sha256(item.image).hexdigest()
                    if self.images_dir is not None:
                        self._store_image(item.record, item.image)
            try:
                self.record_predictions([item.record for item in batch])
            except Exception as e:  # noqa: BLE001  any store trouble: count it, keep serving
                self._fail("store_error", len(batch))
                if self._healthy:
                    log.error("prediction log: %d records not written to %s: %s",
                              len(batch), self.safe_url, e)
                self._healthy = False
            else:
                if not self._healthy:
                    log.info("prediction log: writing to %s again", self.safe_url)
                self._healthy = True
        finally:
            with self._written:
                for item in batch:
                    self._pending.discard(item.record.id)
                    if item.image is not None:
                        self._queued_image_bytes -= len(item.image)
                self._written.notify_all()
            self.metrics.queue_depth.set(self._queue.qsize())

    def _run(self) -> None:
        """The writer: drain the queue in batches; refresh metrics and prune on schedule."""
        next_refresh = 0.0
        while True:
            batch: list[_Queued] = []
            try:
                batch.append(self._queue.get(timeout=0.5))
                while len(batch) < self.batch_size:
                    batch.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            batch = [item for item in batch if item is not _WAKE]
            if batch:
                self._write_batch(batch)
            elif self._stop.is_set():
                return
            now = time.monotonic()
            try:
                if now >= next_refresh:
                    next_refresh = now + self.metrics_interval_s
                    self.refresh_metrics()
                elif self._dirty_versions:
                    self.refresh_metrics(dirty_only=True)
                if now >= self.retention.next_run:
                    self.retention.next_run = now + self.retention.interval_s
                    self.prune()
            except Exception as e:  # noqa: BLE001  the writer must outlive a bad moment
                log.warning("feedback store housekeeping failed: %s", e)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to ``timeout`` s), stop the writer, close connections."""
        self._stop.set()
        with contextlib.suppress(queue.Full):  # wake the writer now (a full queue keeps it busy)
            self._queue.put_nowait(_WAKE)
        self._writer.join(timeout)
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- feedback ------------------------------------------------------------------------

    def _allowed_labels(self, conn: Connection, model: str, version: str) -> list[str]:
        row = conn.execute(sa.select(classes_table.c.labels).where(
            (classes_table.c.model == model) & (classes_table.c.version == version))).first()
        if row is not None:
            return list(row.labels)
        with self._lock:
            return list(self._classes.get((model, version), []))

    def add_feedback(self, prediction_id: str, label: str, *, allow_new_class: bool = False,
                     source: str | None = None) -> FeedbackResult:
        """Attach a confirmed label to a logged prediction; returns after the commit.

        Raises PredictionNotFound (404) for an unknown id, LabelNotAllowed (400, naming the
        allowed labels) for a label that is not a class of the version that answered unless
        ``allow_new_class``, StoreUnavailable (503) when the database fails. Sending feedback
        again for an id adds a row; the latest one is the label (``confirmed``).
        """
        prediction_id = str(prediction_id).strip().lower()
        label = label.strip() if isinstance(label, str) else label
        if not isinstance(label, str) or not label or len(label) > MAX_LABEL_CHARS:
            self.metrics.rejected.labels("bad_label").inc()
            raise FeedbackError(f"label must be a non-empty string of at most "
                                f"{MAX_LABEL_CHARS} characters, got {label!r}")
        if len(prediction_id) != 32 or any(c not in "0123456789abcdef" for c in prediction_id):
            self.metrics.rejected.labels("not_found").inc()
            raise PredictionNotFound(f"unknown prediction id {prediction_id!r}: ids are the "
                                     f"32 hex digits of the X-Prediction-Id response header")
        with self._lock:
            pending = prediction_id in self._pending
        if pending:  # answered a moment ago and still on its way to the database
            self.flush()
        try:
            return self._commit_feedback(prediction_id, label, allow_new_class, source)
        except FeedbackError as e:
            self.metrics.rejected.labels(
                "not_found" if isinstance(e, PredictionNotFound) else "bad_label").inc()
            raise
        except sa.exc.IntegrityError as e:  # deleted by retention while we wrote
            self.metrics.rejected.labels("not_found").inc()
            raise PredictionNotFound(f"unknown prediction id {prediction_id!r}") from e
        except sa.exc.SQLAlchemyError as e:
            self.metrics.rejected.labels("store_error").inc()
            log.error("feedback for %s not stored: %s", prediction_id, e)
            raise StoreUnavailable(f"the feedback store is not available right now "
                                   f"({type(e).__name__}); retry later") from e

    def _commit_feedback(self, prediction_id: str, label: str, allow_new_class: bool,
                         source: str | None) -> FeedbackResult:
        self._ensure_ready()
        p = predictions_table
        with self._write() as conn:
            row = conn.execute(sa.select(p.c.model, p.c.version, p.c.top1_label)
                               .where(p.c.id == prediction_id)).first()
            if row is None:
                raise PredictionNotFound(
                    f"unknown prediction id {prediction_id!r}: never logged, dropped while "
                    f"the store was unavailable, or removed by retention")
            allowed = self._allowed_labels(conn, row.model, row.version)
            new_class = label not in allowed
            if new_class and not allow_new_class:
                raise LabelNotAllowed(
                    f"label {label!r} is not a class of model {row.model} v{row.version}; "
                    f"allowed labels: {allowed}; send \"allow_new_class\": true to add a new "
                    f"class", allowed)
            f = feedback_table
            previous = conn.execute(sa.select(f.c.label).where(f.c.prediction_id == prediction_id)
                                    .order_by(f.c.id.desc()).limit(1)).scalar()
            now = datetime.now(timezone.utc)
            conn.execute(f.insert().values(prediction_id=prediction_id, label=label,
                                           new_class=new_class, source=source, created_at=now))
        agreed = label == row.top1_label
        labels = (row.model, row.version)
        self.metrics.feedback.labels(*labels).inc()
        if previous is None:
            self.metrics.confirmed.labels(*labels).inc()
            if agreed:
                self.metrics.agreed.labels(*labels).inc()
        with self._lock:
            self._dirty_versions.add(labels)
        return FeedbackResult(prediction_id, label, row.model, row.version, row.top1_label,
                              agreed, new_class, previous, now)

    # ---- reading ---------------------------------------------------------------------------

    def _latest_feedback(self) -> sa.Subquery:
        f = feedback_table
        return (sa.select(f.c.prediction_id, sa.func.max(f.c.id).label("feedback_id"))
                .group_by(f.c.prediction_id).subquery("latest"))

    def confirmed(self, model: str, *, since: datetime | None = None) -> list[ConfirmedSample]:
        """The latest confirmed label of each prediction of ``model``, oldest first;
        ``since`` keeps those whose latest label was given at or after it."""
        p, f, latest = predictions_table, feedback_table, self._latest_feedback()
        query = (sa.select(f.c.prediction_id, f.c.label, f.c.new_class, f.c.source,
                           f.c.created_at, p.c.image_path, p.c.image_sha256, p.c.model,
                           p.c.version, p.c.top1_label)
                 .join(latest, latest.c.feedback_id == f.c.id)
                 .join(p, p.c.id == f.c.prediction_id)
                 .where(p.c.model == model).order_by(f.c.id))
        if since is not None:
            query = query.where(f.c.created_at >= since)
        self._ensure_ready()
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [ConfirmedSample(
            prediction_id=r.prediction_id, label=r.label, image_path=r.image_path,
            image_sha256=r.image_sha256, model=r.model, version=r.version,
            served_top1=r.top1_label, confirmed_at=r.created_at, source=r.source,
            new_class=bool(r.new_class)) for r in rows]

    def count_confirmed(self, model: str, since: datetime | None = None) -> int:
        """How many predictions of ``model`` have a confirmed label (latest given >= since)."""
        p, f, latest = predictions_table, feedback_table, self._latest_feedback()
        query = (sa.select(sa.func.count()).select_from(f)
                 .join(latest, latest.c.feedback_id == f.c.id)
                 .join(p, p.c.id == f.c.prediction_id).where(p.c.model == model))
        if since is not None:
            query = query.where(f.c.created_at >= since)
        self._ensure_ready()
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    def _agreement_rows(self, conn: Connection, model: str | None = None,
                        versions: Iterable[tuple[str, str]] | None = None) -> list:
        p, f, latest = predictions_table, feedback_table, self._latest_feedback()
        agreed = sa.case((f.c.label == p.c.top1_label, 1), else_=0)
        query = (sa.select(p.c.model, p.c.version, sa.func.count().label("confirmed"),
                           sa.func.sum(agreed).label("agreed"),
                           sa.func.sum(sa.case((f.c.new_class, 1), else_=0)).label("new_class"))
                 .select_from(f).join(latest, latest.c.feedback_id == f.c.id)
                 .join(p, p.c.id == f.c.prediction_id).group_by(p.c.model, p.c.version))
        if model is not None:
            query = query.where(p.c.model == model)
        if versions is not None:
            query = query.where(sa.tuple_(p.c.model, p.c.version).in_(list(versions)))
        return conn.execute(query).all()

    def stats(self, model: str | None = None) -> dict:
        """Counts per model version: predictions logged, confirmed, agreed, agreement rate;
        plus this process's log counters."""
        p, f = predictions_table, feedback_table
        self._ensure_ready()
        with self.engine.connect() as conn:
            counted = sa.select(p.c.model, p.c.version, sa.func.count().label("n"),
                                sa.func.max(p.c.created_at).label("last"))
            if model is not None:
                counted = counted.where(p.c.model == model)
            logged = conn.execute(counted.group_by(p.c.model, p.c.version)).all()
            confirmed = {(r.model, r.version): r for r in self._agreement_rows(conn, model)}
            feedback_rows = conn.execute(
                sa.select(sa.func.count()).select_from(f).join(p, p.c.id == f.c.prediction_id)
                .where(p.c.model == model if model is not None else sa.true())).scalar()
        versions = []
        for r in sorted(logged, key=lambda r: (r.model, r.version)):
            c = confirmed.get((r.model, r.version))
            n_confirmed, n_agreed = (c.confirmed, int(c.agreed or 0)) if c else (0, 0)
            versions.append({
                "model": r.model, "version": r.version, "predictions": r.n,
                "last_prediction_at": r.last.isoformat() if r.last else None,
                "confirmed": n_confirmed, "agreed": n_agreed,
                "agreement_rate": round(n_agreed / n_confirmed, 6) if n_confirmed else None,
                "new_class_labels": int(c.new_class or 0) if c else 0})
        total_confirmed = sum(v["confirmed"] for v in versions)
        total_agreed = sum(v["agreed"] for v in versions)
        return {
            "predictions": sum(v["predictions"] for v in versions),
            "confirmed": total_confirmed,
            "feedback_rows": int(feedback_rows or 0),
            "agreement_rate": round(total_agreed / total_confirmed, 6) if total_confirmed
            else None,
            "versions": versions,
            "images_stored": self.images_dir is not None,
            "log": {"queued": self._queue.qsize(), **self._log_counts},
        }

    def refresh_metrics(self, dirty_only: bool = False) -> None:
        """Set the agreement gauge from the store (latest label per prediction)."""
        with self._lock:
            dirty, self._dirty_versions = self._dirty_versions, set()
        if dirty_only and not dirty:
            return
        try:
            self._ensure_ready()
            with self.engine.connect() as conn:
                rows = self._agreement_rows(conn, versions=dirty if dirty_only else None)
        except Exception:
            with self._lock:
                self._dirty_versions |= dirty
            raise
        for r in rows:
            if r.confirmed:
                self.metrics.agreement.labels(r.model, r.version).set(
                    int(r.agreed or 0) / r.confirmed)

    # ---- retention -------------------------------------------------------------------------

    def prune(self, max_age_days: float | None = None, max_images: int | None = None,
              prediction_max_age_days: float | None = None) -> PruneResult:
        """Delete stored images older than ``max_age_days`` and beyond the newest
        ``max_images`` (their rows keep the digest, lose the path), and unconfirmed
        prediction rows older than ``prediction_max_age_days``. None: the store's setting."""
        r = self.retention
        max_age_days = r.image_max_age_days if max_age_days is None else max_age_days
        max_images = r.max_images if max_images is None else max_images
        prediction_max_age_days = (r.prediction_max_age_days if prediction_max_age_days is None
                                   else prediction_max_age_days)
        removed = self._prune_images(max_age_days, max_images)
        rows = 0
        if prediction_max_age_days is not None:
            cutoff = datetime.now(timezone.utc) - timedelta(days=prediction_max_age_days)
            p, f = predictions_table, feedback_table
            self._ensure_ready()
            with self._write() as conn:
                rows = conn.execute(p.delete().where(
                    (p.c.created_at < cutoff)
                    & ~sa.exists().where(f.c.prediction_id == p.c.id))).rowcount
        if removed or rows:
            log.info("retention: removed %d images and %d unconfirmed predictions",
                     removed, rows)
        return PruneResult(removed, rows)

    def _prune_images(self, max_age_days: float | None, max_images: int | None) -> int:
        if self.images_dir is None or not self.images_dir.is_dir():
            return 0
        files = []
        for folder in self.images_dir.iterdir():
            if not folder.is_dir():
                continue
            clean_stale(folder)
            for entry in os.scandir(folder):
                if entry.is_file() and not entry.name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        files.append((entry.stat().st_mtime, entry.path))
        files.sort(reverse=True)  # newest first
        doomed = []
        if max_age_days is not None:
            cutoff = time.time() - max_age_days * 86400
            doomed += [path for mtime, path in files if mtime < cutoff]
            files = [(m, path) for m, path in files if m >= cutoff]
        if max_images is not None and len(files) > max_images:
            doomed += [path for _, path in files[max_images:]]
        if not doomed:
            return 0
        digests = [Path(path).name.split(".")[0] for path in doomed]
        p = predictions_table
        self._ensure_ready()
        with self._write() as conn:  # rows first, so no row keeps naming a deleted file
            for i in range(0, len(digests), 500):
                conn.execute(p.update().where(p.c.image_sha256.in_(digests[i:i + 500]))
                             .values(image_path=None))
        for path in doomed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return len(doomed)
