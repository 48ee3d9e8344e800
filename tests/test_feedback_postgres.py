"""The feedback store's API tests against a real PostgreSQL server.

The server is started for this module in a temporary directory (``initdb`` + ``pg_ctl``, a
free loopback port, trust authentication) and stopped afterwards; each test gets a fresh
database. Skipped only where the PostgreSQL server binaries are not installed.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from test_feedback import (  # noqa: F401  (collected here with this module's db_url)
    store,
    test_a_second_store_on_the_same_url_reads_everything,
    test_classes_are_those_of_the_version_that_answered,
    test_classes_given_with_a_prediction_are_saved_by_the_writer,
    test_confirmed_is_the_last_label_sent,
    test_feedback_right_after_the_answer_finds_the_prediction,
    test_images_are_stored_by_digest_and_pruned_by_count_and_age,
    test_label_outside_the_classes_is_a_400_naming_them,
    test_latest_feedback_wins_and_history_is_kept,
    test_metrics_count_top1_confidence_feedback_and_agreement,
    test_new_class_is_accepted_when_asked,
    test_retention_removes_old_unconfirmed_predictions_only,
    test_since_filters_on_the_latest_label,
    test_two_processes_write_one_store,
    test_unknown_id_is_a_404,
)

from serving.launch import free_port

psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install "
                                                "'psycopg[binary]' (the postgres extra)")


def postgres_bin() -> Path | None:
    """The directory holding initdb and pg_ctl, or None."""
    on_path = shutil.which("pg_ctl")
    candidates = ([Path(on_path).parent] if on_path else []) + \
        [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    return next((d for d in candidates if (d / "initdb").exists() and (d / "pg_ctl").exists()),
                None)


@pytest.fixture(scope="module")
def postgres_server():
    """``(host, port)`` of a PostgreSQL server running for this module."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
                    "/usr/lib/postgresql/*/bin; install the postgresql package")
    root = Path(tempfile.mkdtemp(prefix="feedback-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(root, "nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
    data, port = root / "data", free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=120)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--no-sync")
        run(str(bindir / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(data),
            "-l", str(root / "server.log"),
            "-o", f"-F -p {port} -k {root} -c listen_addresses=127.0.0.1")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {e.stderr.decode()}") from e
    try:
        yield "127.0.0.1", port
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "stop", "-w", "-m", "fast",
                        "-D", str(data)], check=False, capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def db_url(postgres_server) -> str:
    """A fresh, empty database on the module's server."""
    host, port = postgres_server
    name = f"feedback_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(host=host, port=port, user="postgres", dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"postgresql://postgres@{host}:{port}/{name}"
    with psycopg.connect(host=host, port=port, user="postgres", dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_postgres_url_uses_the_installed_driver(db_url):
    from serving.feedback import FeedbackStore

    with FeedbackStore(db_url) as pg_store:
        assert pg_store.engine.dialect.name == "postgresql"
        assert pg_store.engine.dialect.driver in ("psycopg", "psycopg2")


def test_unreachable_postgres_never_fails_a_prediction():
    from prometheus_client import CollectorRegistry

    from serving.feedback import FeedbackStore, StoreUnavailable

    registry = CollectorRegistry()
    down = FeedbackStore(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere",
                         registry=registry)
    try:
        prediction_id = down.log_prediction("food", "1", [{"label": "pizza",
                                                           "probability": 0.9}])
        assert prediction_id is not None and down.flush(20)
        assert registry.get_sample_value("prediction_log_failures_total",
                                         {"reason": "store_error"}) == 1
        with pytest.raises(StoreUnavailable):
            down.add_feedback(prediction_id, "pizza")
    finally:
        down.close()
