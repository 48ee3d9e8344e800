"""The prediction log and feedback store (serving/feedback.py) on a SQLite file.

The API tests take a ``db_url`` fixture; tests/test_feedback_postgres.py runs the same
functions against a real PostgreSQL server.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from email.message import Message
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from serving.feedback import (
    FeedbackStore,
    LabelNotAllowed,
    PredictionNotFound,
    PredictionRecord,
    StoreUnavailable,
    new_prediction_id,
    predictions_table,
)

CLASSES = ["pizza", "salad", "sushi"]
REPO = Path(__file__).resolve().parents[1]


def answer(top1: str = "pizza", p: float = 0.7) -> list[dict]:
    rest = [c for c in CLASSES if c != top1]
    return [{"label": top1, "probability": p},
            {"label": rest[0], "probability": (1 - p) * 0.6},
            {"label": rest[1], "probability": (1 - p) * 0.4}]


def sample(registry: CollectorRegistry, name: str, labels: dict) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def db_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'feedback.db'}"


@pytest.fixture
def store(db_url):
    with FeedbackStore(db_url) as s:
        s.register_model("food", "1", CLASSES)
        yield s


def logged(store: FeedbackStore, top1: str = "pizza", version: str = "1",
           image: bytes | None = None) -> str:
    prediction_id = store.log_prediction("food", version, answer(top1), image)
    assert prediction_id is not None
    return prediction_id


# ---- the API (also run against PostgreSQL) ------------------------------------------------

def test_feedback_right_after_the_answer_finds_the_prediction(store):
    """The id is usable at once: feedback waits for the writer rather than 404."""
    ids = [logged(store) for _ in range(20)]
    results = [store.add_feedback(i, "salad") for i in ids]
    assert [r.prediction_id for r in results] == ids
    assert all(r.served_top1 == "pizza" and not r.agreed for r in results)


def test_latest_feedback_wins_and_history_is_kept(store):
    a, b = logged(store), logged(store, top1="sushi")
    first = store.add_feedback(a, "salad", source="app")
    assert first.replaced is None and not first.agreed
    second = store.add_feedback(a, "pizza", source="app")
    assert second.replaced == "salad" and second.agreed
    store.add_feedback(b, "sushi")
    confirmed = {s.prediction_id: s for s in store.confirmed("food")}
    assert confirmed[a].label == "pizza" and confirmed[a].served_top1 == "pizza"
    assert confirmed[b].label == "sushi" and confirmed[b].version == "1"
    assert store.count_confirmed("food") == 2
    stats = store.stats("food")
    assert stats["feedback_rows"] == 3  # the history row of `a` is still there
    assert stats["confirmed"] == 2 and stats["agreement_rate"] == 1.0
    with store.engine.connect() as conn:
        labels = conn.execute(sa.text(
            "SELECT label FROM prediction_feedback WHERE prediction_id = :i ORDER BY id"),
            {"i": a}).scalars().all()
    assert labels == ["salad", "pizza"]


def test_since_filters_on_the_latest_label(store):
    a, b = logged(store), logged(store)
    store.add_feedback(a, "salad")
    time.sleep(0.01)
    cut = datetime.now(timezone.utc)
    store.add_feedback(b, "sushi")
    assert [s.prediction_id for s in store.confirmed("food", since=cut)] == [b]
    store.add_feedback(a, "pizza")  # a's latest label is now newer than the cut
    assert {s.prediction_id for s in store.confirmed("food", since=cut)} == {a, b}
    assert store.count_confirmed("food", since=cut) == 2
    assert store.count_confirmed("food", since=cut + timedelta(days=1)) == 0
    assert store.confirmed("other-model") == []


def test_unknown_id_is_a_404(store):
    for bad in (new_prediction_id(), "not-an-id", ""):
        with pytest.raises(PredictionNotFound) as e:
            store.add_feedback(bad, "pizza")
        assert e.value.status == 404 and e.value.to_dict()["type"] == \
            "PredictionNotFoundException"


def test_label_outside_the_classes_is_a_400_naming_them(store):
    prediction_id = logged(store)
    with pytest.raises(LabelNotAllowed) as e:
        store.add_feedback(prediction_id, "burger")
    body = e.value.to_dict()
    assert body["code"] == 400 and "burger" in body["message"]
    assert all(c in body["message"] for c in CLASSES) and e.value.allowed == CLASSES
    assert store.count_confirmed("food") == 0


def test_new_class_is_accepted_when_asked(store):
    prediction_id = logged(store)
    result = store.add_feedback(prediction_id, "burger", allow_new_class=True)
    assert result.new_class and not result.agreed
    [confirmed] = store.confirmed("food")
    assert confirmed.label == "burger" and confirmed.new_class
    assert store.stats()["versions"][0]["new_class_labels"] == 1


def test_classes_are_those_of_the_version_that_answered(store):
    store.register_model("food", "2", CLASSES + ["ramen"])
    old, new = logged(store, version="1"), logged(store, version="2")
    assert store.add_feedback(new, "ramen").new_class is False
    with pytest.raises(LabelNotAllowed):
        store.add_feedback(old, "ramen")


def test_classes_given_with_a_prediction_are_saved_by_the_writer(db_url):
    with FeedbackStore(db_url) as store:
        prediction_id = store.log_prediction("soup", "7", answer(), labels=CLASSES)
        assert store.flush()
    with FeedbackStore(db_url) as other:  # another process: the classes are in the database
        with pytest.raises(LabelNotAllowed) as e:
            other.add_feedback(prediction_id, "ramen")
        assert e.value.allowed == CLASSES
        assert other.add_feedback(prediction_id, "sushi").model == "soup"


def test_a_second_store_on_the_same_url_reads_everything(store, db_url):
    """An app that fronts TorchServe: FeedbackStore(url).add_feedback(...)."""
    prediction_id = logged(store)
    assert store.flush()
    with FeedbackStore(db_url) as app_side:
        assert app_side.add_feedback(prediction_id, "sushi").model == "food"
        with pytest.raises(LabelNotAllowed):  # the classes live in the database
            app_side.add_feedback(prediction_id, "burger")
    assert store.confirmed("food")[0].label == "sushi"


def test_metrics_count_top1_confidence_feedback_and_agreement(db_url):
    registry = CollectorRegistry()
    with FeedbackStore(db_url, registry=registry) as store:
        store.register_model("food", "1", CLASSES)
        ids = [store.log_prediction("food", "1", answer("pizza", 0.92)) for _ in range(3)]
        ids.append(store.log_prediction("food", "1", answer("salad", 0.55)))
        mv = {"model": "food", "version": "1"}
        assert sample(registry, "predictions_top1_total", {**mv, "label": "pizza"}) == 3
        assert sample(registry, "predictions_top1_total", {**mv, "label": "salad"}) == 1
        assert sample(registry, "prediction_confidence_count", mv) == 4
        assert sample(registry, "prediction_confidence_bucket", {**mv, "le": "0.6"}) == 1
        store.add_feedback(ids[0], "pizza")
        store.add_feedback(ids[1], "pizza")
        store.add_feedback(ids[2], "sushi")
        store.add_feedback(ids[2], "pizza")  # a correction: counted as feedback only
        store.add_feedback(ids[3], "sushi")
        assert sample(registry, "feedback_total", mv) == 5
        assert sample(registry, "feedback_confirmed_predictions_total", mv) == 4
        assert sample(registry, "feedback_agreed_predictions_total", mv) == 2
        store.refresh_metrics()
        # latest labels: pizza, pizza, pizza (corrected), sushi -> 3 of 4 agree
        assert sample(registry, "feedback_agreement_ratio", mv) == pytest.approx(0.75)
        assert sample(registry, "prediction_log_written_total", {}) == 4


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.sampled_from(CLASSES), min_size=1, max_size=4), min_size=1,
                max_size=4))
def test_confirmed_is_the_last_label_sent(store, sequences):
    ids = [logged(store) for _ in sequences]
    for i, labels in zip(ids, sequences):
        for label in labels:
            store.add_feedback(i, label)
    confirmed = {s.prediction_id: s.label for s in store.confirmed("food")}
    assert {i: confirmed[i] for i in ids} == {i: labels[-1]
                                              for i, labels in zip(ids, sequences)}


def test_two_processes_write_one_store(db_url, tmp_path):
    """Two processes log and confirm at the same time; nothing is lost or refused."""
    script = textwrap.dedent("""
        import json, sys
        from serving.feedback import FeedbackStore
        store = FeedbackStore(sys.argv[1])
        store.register_model("food", "1", ["pizza", "salad", "sushi"])
        ids = [store.log_prediction("food", "1", [{"label": "pizza", "probability": 0.9}])
               for _ in range(150)]
        for i in ids:
            store.add_feedback(i, "salad")
        store.close()
        print(json.dumps({"ids": ids, "log": store.stats()["log"]}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, db_url], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    results = [json.loads(out) for out, _ in outputs]
    assert all(r["log"]["store_error"] == 0 and r["log"]["written"] == 150 for r in results)
    with FeedbackStore(db_url) as store:
        stats = store.stats("food")
        assert stats["predictions"] == 300 and stats["confirmed"] == 300
        assert {s.prediction_id for s in store.confirmed("food")} == \
            set(results[0]["ids"]) | set(results[1]["ids"])


# ---- SQLite specifics, the writer, faults, images -----------------------------------------

def test_sqlite_file_is_in_wal_mode(store, db_url):
    logged(store)
    store.flush()
    path = sa.engine.make_url(db_url).database
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_writer_batches_records(db_url):
    """Records queued while a write is under way go to the database together."""
    with FeedbackStore(db_url) as store:
        store.register_model("food", "1", CLASSES)
        calls, gate, real = [], threading.Event(), store.record_predictions

        def slow(rows: list[PredictionRecord]) -> None:
            calls.append(len(rows))
            gate.wait(10)
            real(rows)

        store.record_predictions = slow
        ids = [logged(store) for _ in range(1 + 300)]
        gate.set()
        assert store.flush(10)
        assert sum(calls) == 301 and len(calls) <= 3 and max(calls) > 100
        assert store.stats()["predictions"] == 301 and len(set(ids)) == 301


def test_store_outage_counts_failures_and_recovers(db_url):
    registry = CollectorRegistry()
    with FeedbackStore(db_url, registry=registry, busy_timeout_ms=100) as store:
        store.register_model("food", "1", CLASSES)
        before = logged(store)
        assert store.flush()
        locker = sqlite3.connect(sa.engine.make_url(db_url).database, timeout=0,
                                 isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the database
        try:
            during = [logged(store) for _ in range(5)]  # the predictions still succeed
            assert store.flush(10)
            assert sample(registry, "prediction_log_failures_total",
                          {"reason": "store_error"}) == 5
            with pytest.raises(StoreUnavailable) as e:
                store.add_feedback(before, "salad")
            assert e.value.status == 503
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        after = logged(store)
        assert store.add_feedback(after, "salad").label == "salad"
        with pytest.raises(PredictionNotFound):  # lost in the outage, and counted
            store.add_feedback(during[0], "salad")
        assert store.stats()["predictions"] == 2


def test_unusable_database_never_fails_a_prediction(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    registry = CollectorRegistry()
    store = FeedbackStore(f"sqlite:///{blocker}/sub/feedback.db", registry=registry)
    try:
        assert logged(store)
        assert store.flush(10)
        assert sample(registry, "prediction_log_failures_total",
                      {"reason": "store_error"}) == 1
    finally:
        store.close()


def test_full_queue_drops_and_counts_without_blocking(db_url):
    registry = CollectorRegistry()
    with FeedbackStore(db_url, registry=registry, queue_size=2) as store:
        gate, real = threading.Event(), store.record_predictions
        store.record_predictions = lambda rows: (gate.wait(10), real(rows))
        ids = [store.log_prediction("food", "1", answer()) for _ in range(10)]
        gate.set()
        assert ids.count(None) >= 5  # one in the writer's hands, two queued, the rest dropped
        assert sample(registry, "prediction_log_failures_total",
                      {"reason": "queue_full"}) == ids.count(None)
        store.flush()
        assert store.stats()["predictions"] == 10 - ids.count(None)


def test_images_are_stored_by_digest_and_pruned_by_count_and_age(db_url, tmp_path):
    from conftest import jpeg_bytes

    images = [jpeg_bytes(seed=s) for s in range(3)]
    with FeedbackStore(db_url, images_dir=tmp_path / "images") as store:
        store.register_model("food", "1", CLASSES)
        ids = [logged(store, image=img) for img in images] + [logged(store, image=images[0])]
        store.flush()
        for i in ids:
            store.add_feedback(i, "salad")
        paths = {s.prediction_id: s.image_path for s in store.confirmed("food")}
        assert paths[ids[0]] == paths[ids[3]]  # one file per distinct image
        assert len(set(paths.values())) == 3
        for i, img in zip(ids, images):
            assert Path(paths[i]).read_bytes() == img and paths[i].endswith(".jpg")
        now = time.time()
        for age, i in zip((3, 2, 1), ids):  # ids[0] is the oldest
            os.utime(paths[i], (now - age * 86400, now - age * 86400))

        assert store.prune(max_age_days=2.5).images_removed == 1
        assert not Path(paths[ids[0]]).exists()
        kept = {s.prediction_id: s.image_path for s in store.confirmed("food")}
        assert kept[ids[0]] is None and kept[ids[3]] is None  # same digest, same file
        assert store.prune(max_images=1).images_removed == 1
        assert [i for i, p in store_paths(store).items() if p] == [ids[2]]
        assert store.prune(max_age_days=0).images_removed == 1
        assert not any(store_paths(store).values())
        assert store.confirmed("food")[0].image_sha256  # the digest stays


def test_images_beyond_the_memory_budget_keep_only_their_digest(db_url, tmp_path):
    import hashlib

    from conftest import jpeg_bytes

    registry, image = CollectorRegistry(), jpeg_bytes(seed=9)
    with FeedbackStore(db_url, images_dir=tmp_path / "images", registry=registry,
                       max_queued_image_bytes=len(image) - 1) as store:
        store.register_model("food", "1", CLASSES)
        store.add_feedback(logged(store, image=image), "pizza")
        [confirmed] = store.confirmed("food")
        assert confirmed.image_path is None
        assert confirmed.image_sha256 == hashlib.sha256(image).hexdigest()
        assert sample(registry, "prediction_log_failures_total",
                      {"reason": "image_queue_full"}) == 1


def store_paths(store: FeedbackStore) -> dict[str, str | None]:
    return {s.prediction_id: s.image_path for s in store.confirmed("food")}


def test_images_are_off_by_default(store, tmp_path):
    from conftest import jpeg_bytes

    image = jpeg_bytes()
    store.add_feedback(logged(store, image=image), "pizza")
    [confirmed] = store.confirmed("food")
    assert confirmed.image_path is None and len(confirmed.image_sha256) == 64
    assert not list(tmp_path.rglob("*.jpg"))


def test_retention_removes_old_unconfirmed_predictions_only(store):
    old_confirmed, old, fresh = logged(store), logged(store), logged(store)
    store.add_feedback(old_confirmed, "salad")
    p = predictions_table
    with store.engine.begin() as conn:
        conn.execute(p.update().where(p.c.id.in_([old_confirmed, old]))
                     .values(created_at=datetime(2000, 1, 1, tzinfo=timezone.utc)))
    assert store.prune(prediction_max_age_days=30).predictions_removed == 1
    with pytest.raises(PredictionNotFound):
        store.add_feedback(old, "salad")
    assert store.add_feedback(fresh, "salad").label == "salad"
    assert store.count_confirmed("food") == 2


def test_predictor_in_process_logs_and_returns_ids(onnx_version, db_url, tmp_path):
    import hashlib

    from conftest import jpeg_bytes
    from PIL import Image

    from serving.predictor import Predictor

    image = jpeg_bytes(seed=5)
    (tmp_path / "dish.jpg").write_bytes(image)
    plain = Predictor.load(onnx_version)
    with FeedbackStore(db_url) as store:
        predictor = Predictor.load(onnx_version, feedback=store)
        assert predictor.predict(image) == plain.predict(image)  # same answer, same type
        answer, prediction_id = predictor.predict(tmp_path / "dish.jpg", return_id=True)
        assert answer == plain.predict(image) and len(prediction_id) == 32
        answers, ids = predictor.predict_batch(
            [image, Image.open(tmp_path / "dish.jpg")], 2, return_ids=True)
        assert [len(a) for a in answers] == [2, 2] and len(set(ids)) == 2
        result = store.add_feedback(prediction_id, "sushi")  # classes came with the log
        assert result.served_top1 == answer[0].label and result.version == plain.version
        assert store.stats()["predictions"] == 4
        by_id = {s.prediction_id: s for s in (store.confirmed("food"))}
        assert by_id[prediction_id].image_sha256 == hashlib.sha256(image).hexdigest()
        store.add_feedback(ids[1], "pizza")  # a PIL image: logged, no digest
        assert {s.prediction_id: s for s in store.confirmed("food")}[ids[1]].image_sha256 \
            is None
    assert Predictor.load(onnx_version).predict(image, return_id=True)[1] is None


@pytest.mark.parametrize("configured_by", ["model-config.yaml", "environment"])
def test_torchserve_handler_logs_and_sets_the_header(onnx_version, db_url, monkeypatch,
                                                     configured_by):
    from conftest import jpeg_bytes
    from ts.context import Context, RequestProcessor

    from handlers.food_handler import FoodHandler

    handler_config = {"topk": 3}
    if configured_by == "environment":
        monkeypatch.setenv("FOOD_FEEDBACK_DB", db_url)
    else:
        handler_config["feedback_db"] = db_url
    manifest = {"model": {"serializedFile": "model.onnx"}}
    context = Context("food", str(onnx_version), manifest, 2, None, "0.12.0",
                      model_yaml_config={"handler": handler_config})
    context.request_processor = [RequestProcessor({}) for _ in range(2)]
    handler = FoodHandler()
    handler.initialize(context)
    try:
        answers = handler.handle([{"body": jpeg_bytes(seed=2)}, {"body": b"junk"}], context)
        headers = [context.get_response_headers(i) for i in range(2)]
        assert "X-Prediction-Id" not in headers[1]  # a 400 is not logged
        prediction_id = headers[0]["X-Prediction-Id"]
        top1 = json.loads(answers[0])[0]["label"]
    finally:
        handler.feedback.close()
    with FeedbackStore(db_url) as app:  # the app that fronts TorchServe
        result = app.add_feedback(prediction_id, top1)
        assert result.agreed and result.model == "food"
        with pytest.raises(LabelNotAllowed):
            app.add_feedback(prediction_id, "burger")


# ---- the ONNX server: X-Prediction-Id, POST /feedback, kill -9, two servers ---------------

def http(method: str, url: str, body: bytes | dict | None = None,
         timeout: float = 30) -> tuple[int, Message, bytes]:
    """``(status, headers, body)``; a dict body is sent as JSON. Headers match any case."""
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/octet-stream"}  # urllib would say form-encoded
    if isinstance(body, dict):
        body, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def start_server(model: Path, log_path: Path, *args: str):
    from serving.launch import start_onnx_server

    # these tests send feedback as fast as they can: lift the per-client rate limit
    return start_onnx_server([str(model)], log_path, extra_args=[
        "--feedback-rate", "1000000", "--feedback-burst", "1000000", *args])


def metric(metrics_url: str, name: str, labels: dict) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    _, _, text = http("GET", metrics_url)
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


@pytest.mark.integration
def test_server_logs_predictions_and_takes_feedback(onnx_version, tmp_path):
    from conftest import jpeg_bytes

    from serving.predictor import Predictor, to_json

    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    image = jpeg_bytes(seed=3)
    expected = to_json(Predictor.load(onnx_version).predict(image)).encode()
    with start_server(onnx_version, tmp_path / "server.log", "--feedback-db", url,
                      "--store-images", str(tmp_path / "images")) as server:
        status, headers, body = http("POST", f"{server.url}/predictions/food", image)
        assert status == 200 and body == expected  # the JSON is TorchServe's, unchanged
        prediction_id = headers["X-Prediction-Id"]
        top1 = json.loads(body)[0]["label"]
        wrong = next(c for c in CLASSES if c != top1)

        status, _, body = http("POST", f"{server.url}/feedback",
                               {"prediction_id": prediction_id, "label": wrong})
        assert status == 200, body
        answer_ = json.loads(body)
        assert answer_["label"] == wrong and answer_["served_top1"] == top1
        assert answer_["agreed"] is False
        status, _, body = http("POST", f"{server.url}/feedback",
                               {"prediction_id": prediction_id, "label": top1})
        assert status == 200 and json.loads(body)["replaced"] == wrong

        for request, code, kind in [
                ({"prediction_id": new_prediction_id(), "label": top1}, 404,
                 "PredictionNotFoundException"),
                ({"prediction_id": prediction_id, "label": "burger"}, 400, "InvalidLabel"),
                ({"prediction_id": prediction_id}, 400, "BadRequestException"),
                ({"prediction_id": prediction_id, "label": ""}, 400, "BadRequestException")]:
            status, _, body = http("POST", f"{server.url}/feedback", request)
            error = json.loads(body)
            assert (status, error["code"], error["type"]) == (code, code, kind), error
        status, _, body = http("POST", f"{server.url}/feedback", b"{not json")
        assert status == 400 and json.loads(body)["code"] == 400
        assert "pizza" in json.loads(http("POST", f"{server.url}/feedback", {
            "prediction_id": prediction_id, "label": "burger"})[2])["message"]
        status, _, body = http("POST", f"{server.url}/feedback", {
            "prediction_id": prediction_id, "label": "burger", "allow_new_class": True})
        assert status == 200 and json.loads(body)["new_class"] is True

        status, headers, _ = http("POST", f"{server.url}/predictions/food", b"not an image")
        assert status == 400 and "X-Prediction-Id" not in headers  # only answers are logged

        status, _, body = http("GET", f"{server.url}/feedback/stats?model=food")
        stats = json.loads(body)
        assert status == 200 and stats["predictions"] == 1 and stats["confirmed"] == 1
        assert stats["feedback_rows"] == 3 and stats["versions"][0]["new_class_labels"] == 1

        mv = {"model": "food", "version": "1"}
        assert metric(server.metrics_url, "predictions_top1_total", {**mv, "label": top1}) == 1
        assert metric(server.metrics_url, "prediction_confidence_count", mv) == 1
        assert metric(server.metrics_url, "feedback_total", mv) == 3
        deadline = time.monotonic() + 10  # the writer refreshes the gauge off the request path
        while metric(server.metrics_url, "feedback_agreement_ratio", mv) is None:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert metric(server.metrics_url, "feedback_agreement_ratio", mv) == 0.0  # "burger"
    with FeedbackStore(url) as store:
        [confirmed] = store.confirmed("food")
        assert confirmed.prediction_id == prediction_id and confirmed.label == "burger"
        assert Path(confirmed.image_path).read_bytes() == image


@pytest.mark.integration
def test_server_without_feedback_db_sends_no_id(onnx_version, tmp_path):
    from conftest import jpeg_bytes

    with start_server(onnx_version, tmp_path / "server.log") as server:
        status, headers, _ = http("POST", f"{server.url}/predictions/food", jpeg_bytes())
        assert status == 200 and "X-Prediction-Id" not in headers
        status, _, body = http("POST", f"{server.url}/feedback",
                               {"prediction_id": new_prediction_id(), "label": "pizza"})
        assert status == 404 and json.loads(body)["type"] == "FeedbackDisabled"


def burst(url: str, images: list[bytes], stop: threading.Event, acknowledged: list,
          errors: list) -> None:
    """Predict, then confirm a label, until ``stop`` or the server goes away."""
    i = 0
    while not stop.is_set():
        try:
            status, headers, _ = http("POST", f"{url}/predictions/food", images[i % 4], 10)
            if status != 200:
                errors.append(status)
                continue
            label = CLASSES[i % 3]
            status, _, _ = http("POST", f"{url}/feedback",
                                {"prediction_id": headers["X-Prediction-Id"], "label": label}, 10)
            if status == 200:
                acknowledged.append((headers["X-Prediction-Id"], label))
            else:
                errors.append(status)
        except OSError:  # the server was killed
            return
        i += 1


@pytest.mark.integration
def test_kill_9_loses_no_acknowledged_feedback(onnx_version, tmp_path):
    import signal

    from conftest import jpeg_bytes

    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    images = [jpeg_bytes(seed=s) for s in range(4)]
    server = start_server(onnx_version, tmp_path / "server.log", "--feedback-db", url)
    stop, acknowledged, errors = threading.Event(), [], []
    try:
        threads = [threading.Thread(target=burst, args=(server.url, images, stop,
                                                        acknowledged, errors))
                   for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(server.proc.pid, signal.SIGKILL)  # mid-burst, right after some 200s
        server.proc.wait(10)
        acked = list(acknowledged)
    finally:
        stop.set()
        server.stop(grace=1)
    for t in threads:
        t.join(15)
    assert errors == [] and len(acked) >= 200
    with FeedbackStore(url) as store:
        stored = {s.prediction_id: s.label for s in store.confirmed("food")}
    missing = [(i, label) for i, label in acked if stored.get(i) != label]
    print(f"kill -9: {len(acked)} feedback acknowledged, {len(stored)} stored, "
          f"{len(missing)} acknowledged but missing")
    assert missing == []


@pytest.mark.integration
def test_two_servers_share_one_sqlite_file(onnx_version, tmp_path):
    from conftest import jpeg_bytes

    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    images = [jpeg_bytes(seed=s) for s in range(4)]
    with start_server(onnx_version, tmp_path / "a.log", "--feedback-db", url) as a, \
            start_server(onnx_version, tmp_path / "b.log", "--feedback-db", url) as b:
        results: dict[str, list] = {}

        def drive(server, key: str) -> None:
            stop, acknowledged, errors = threading.Event(), [], []
            t = threading.Timer(3.0, stop.set)
            t.start()
            burst(server.url, images, stop, acknowledged, errors)
            results[key] = [acknowledged, errors]

        threads = [threading.Thread(target=drive, args=(s, k)) for s, k in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        (acked_a, errors_a), (acked_b, errors_b) = results["a"], results["b"]
        assert errors_a == [] and errors_b == [] and acked_a and acked_b
        # a prediction answered by one server can be confirmed through the other
        prediction_id = acked_a[0][0]
        status, _, body = http("POST", f"{b.url}/feedback",
                               {"prediction_id": prediction_id, "label": "sushi"})
        assert status == 200, body
        stats = json.loads(http("GET", f"{a.url}/feedback/stats")[2])
    assert stats["predictions"] == len(acked_a) + len(acked_b)
    assert stats["confirmed"] == len(acked_a) + len(acked_b)
    with FeedbackStore(url) as store:
        stored = {s.prediction_id: s.label for s in store.confirmed("food")}
    assert stored[prediction_id] == "sushi"


@pytest.mark.integration
@pytest.mark.skipif(not os.environ.get("FOOD_MEASURE_LOG_OVERHEAD"),
                    reason="a measurement, not a check: FOOD_MEASURE_LOG_OVERHEAD=1 pytest -s "
                           "tests/test_feedback.py -k overhead")
def test_write_overhead_on_the_request_path(onnx_version, tmp_path):
    """p50/p99 of /predictions without the log, with it, and with images kept: three servers
    of the same model in one run, requests interleaved so drift hits all alike."""
    import statistics

    from conftest import jpeg_bytes

    n = int(os.environ.get("FOOD_MEASURE_REQUESTS", "400"))
    images = [jpeg_bytes(320, 240, seed=s) for s in range(8)]
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    variants = {"off": (), "log": ("--feedback-db", url),
                "log+images": ("--feedback-db", f"sqlite:///{tmp_path / 'f2.db'}",
                               "--store-images", str(tmp_path / "images"))}
    servers = {k: start_server(onnx_version, tmp_path / f"{i}.log", *args)
               for i, (k, args) in enumerate(variants.items())}
    try:
        times: dict[str, list[float]] = {k: [] for k in servers}
        for i in range(n + 20):
            for key, server in servers.items():
                start = time.perf_counter()
                status, headers, _ = http("POST", f"{server.url}/predictions/food",
                                          images[i % len(images)])
                elapsed = time.perf_counter() - start
                assert status == 200 and (key == "off") != ("X-Prediction-Id" in headers)
                if i >= 20:  # warm-up
                    times[key].append(elapsed * 1000)
        logged = json.loads(http("GET", f"{servers['log'].url}/feedback/stats")[2])
    finally:
        for server in servers.values():
            server.stop()
    assert logged["predictions"] == n + 20
    for key, values in times.items():
        q = statistics.quantiles(values, n=100)
        print(f"{key:>10}: n={len(values)} p50={q[49]:.2f} ms p99={q[98]:.2f} ms")


@pytest.mark.integration
@pytest.mark.skipif(not shutil.which("java"), reason="TorchServe needs Java 17")
def test_torchserve_sends_the_id_header_and_an_app_confirms_it(onnx_version, tmp_path):
    """The real frontend copies the handler's X-Prediction-Id onto the HTTP answer."""
    from conftest import jpeg_bytes

    from serving.launch import start_torchserve
    from training.archive import build_archive

    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    mar = build_archive(onnx_version, "onnx", export_path=tmp_path / "store")
    with start_torchserve(tmp_path / "store", {"food": mar.name}, tmp_path / "ts",
                          env={"FOOD_FEEDBACK_DB": url}) as ts:
        status, headers, body = http("POST", f"{ts.url}/predictions/food", jpeg_bytes(seed=4))
        assert status == 200, body
        prediction_id, top1 = headers["X-Prediction-Id"], json.loads(body)[0]["label"]
        with FeedbackStore(url) as app:  # the worker writes off the request path: wait
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert app.add_feedback(prediction_id, top1).agreed
                    break
                except PredictionNotFound:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
