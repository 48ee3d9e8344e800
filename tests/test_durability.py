"""Nothing half-written is served, nothing is written twice: real processes killed at chosen
points (``FOOD_CRASH_AT``, training/crashpoints.py, or a writer parked mid-write), races
between a writer and a reader of ``latest``, and the resume rules of a training run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from serving.artifacts import read_model
from training import engine
from training import train as train_mod
from training.archive import build_archive
from training.cli import main as cli_main
from training.config import load_config
from training.locks import Busy, exclusive
from training.sample_data import generate
from training.version import EXPORT_MANIFEST, create_version, existing_versions, write_export

REPO = Path(__file__).resolve().parents[1]
TINY = {"resize_size": 36, "crop_size": 32, "epochs": 2, "batch_size": 8, "workers": 0,
        "weights": "none", "freeze": "none", "lr": 0.003}


def run_python(code: str, *, env: dict | None = None, cwd: Path = REPO, timeout: float = 240
               ) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (this repository importable)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def start_python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "sample"
    generate(root, examples_dir=root.parent / "examples", per_class=6, seed=1)
    return root


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> str:
    """No MLflow store (tracking is not what these tests are about, and a fresh SQLite store
    costs seconds of migrations): the tracker turns itself off at its first call."""
    import mlflow

    uri = "bogus-scheme://nowhere"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    monkeypatch.chdir(tmp_path)
    yield uri
    mlflow.set_tracking_uri(None)


def tiny_config(tmp_path: Path, data: Path, **overrides):
    values = {**TINY, "data_dir": str(data), "artifacts_dir": str(tmp_path / "artifacts"),
              "checkpoint_dir": str(tmp_path / "checkpoints"), **overrides}
    return load_config(REPO / "configs/sample.yaml", values)


def cli_args(tmp_path: Path, data: Path, **overrides) -> list[str]:
    values = {**TINY, "data_dir": data, "artifacts_dir": tmp_path / "artifacts",
              "checkpoint_dir": tmp_path / "checkpoints", **overrides}
    return ["train", "--config", str(REPO / "configs/sample.yaml"),
            *(f"--{k.replace('_', '-')}={v}" for k, v in values.items())]


# ---------------------------------------------------------------- export: one unit
def fake_export(stage: Path, tag: str) -> None:
    """An export whose files say which export they belong to."""
    for name in ("model.onnx", "model.ts"):
        (stage / name).write_bytes(f"{tag}:{name}".encode())
    (stage / EXPORT_MANIFEST).write_text(json.dumps({"tag": tag}))


@pytest.mark.parametrize("point", ["export_staged", "export_published", "export_switched"])
def test_export_killed_at_any_step_leaves_one_matching_pair(tmp_path, point):
    version = tmp_path / "v1"
    version.mkdir()
    # a first export, in the old layout (plain files) and then through write_export
    write_export(version, lambda stage: fake_export(stage, "A"))
    pairs = {tag: (f"{tag}:model.onnx".encode(), f"{tag}:model.ts".encode()) for tag in "AB"}

    killed = run_python(f"""
        from pathlib import Path
        from training.version import write_export

        def fake_export(stage):  # as fake_export(stage, "B") here
            for name in ("model.onnx", "model.ts"):
                (stage / name).write_bytes(f"B:{{name}}".encode())
            (stage / "export.json").write_text("{{}}")

        write_export(Path({str(version)!r}), fake_export)
        """, env={"FOOD_CRASH_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    pair = ((version / "model.onnx").read_bytes(), (version / "model.ts").read_bytes())
    assert pair in pairs.values(), f"mixed pair after a kill at {point}: {pair}"
    record = read_model_dir(version)
    assert record in pairs.values()
    assert record == pair
    leftovers = sorted(p.name for p in version.iterdir() if p.name.startswith(".tmp-"))
    assert (point == "export_staged") == bool(leftovers), leftovers

    write_export(version, lambda stage: fake_export(stage, "C"))  # the next export cleans up
    assert not [p for p in version.iterdir() if p.name.startswith(".tmp-")]
    assert len(list(version.glob(".export-*"))) <= 2  # the current one and the previous one
    assert read_model_dir(version) == (b"C:model.onnx", b"C:model.ts")


def read_model_dir(version: Path) -> tuple[bytes, bytes]:
    """(model.onnx, model.ts) as serving.artifacts reads them: the export resolved once."""
    (version / "model_config.json").write_text(json.dumps({
        "name": "food", "version": 1, "num_classes": 1, "preprocessing": {
            "resize_size": 36, "crop_size": 32}}))
    (version / "class_to_idx.json").write_text(json.dumps({"pizza": 0}))
    record = read_model(version)
    return record.model_bytes("onnx"), record.model_bytes("torchscript")


# ---------------------------------------------------------------- latest: resolved once
def test_latest_read_while_versions_are_published_is_never_a_mix(tmp_path):
    root = tmp_path / "food"
    create_version(root, version_writer)
    writer = start_python(f"""
        import json
        from pathlib import Path
        from training.version import create_version

        def version_writer(tmp, number):
            classes = {{f"c{{i}}": i for i in range(number + 1)}}
            (tmp / "class_to_idx.json").write_text(json.dumps(classes))
            (tmp / "model.onnx").write_bytes(f"weights of v{{number}}".encode())
            (tmp / "model_config.json").write_text(json.dumps({{
                "name": "food", "version": number, "num_classes": number + 1,
                "preprocessing": {{"resize_size": 36, "crop_size": 32}}}}))

        for _ in range(40):
            create_version(Path({str(root)!r}), version_writer)
        """)
    reads, mixes = 0, []
    while writer.poll() is None or reads < 50:
        record = read_model(root / "latest")
        weights = record.model_bytes("onnx").decode()
        if weights != f"weights of v{record.version}" or \
                record.num_classes != int(record.version) + 1:
            mixes.append((record.version, record.num_classes, weights))
        reads += 1
    assert writer.wait() == 0, writer.stderr.read()
    assert not mixes, mixes[:3]
    assert existing_versions(root)[-1] == 41


def version_writer(tmp: Path, number: int) -> None:
    """Version N of the race above: N+1 classes, weights naming N (the writer process runs
    the same code)."""
    classes = {f"c{i}": i for i in range(number + 1)}
    (tmp / "class_to_idx.json").write_text(json.dumps(classes))
    (tmp / "model.onnx").write_bytes(f"weights of v{number}".encode())
    (tmp / "model_config.json").write_text(json.dumps({
        "name": "food", "version": number, "num_classes": number + 1,
        "preprocessing": {"resize_size": 36, "crop_size": 32}}))


# ---------------------------------------------------------------- leftovers of kill -9
PARKED = """
    import time
    from pathlib import Path
    from serving.atomic import atomic_write, staging_dir
    kind, where = {kind!r}, {where!r}

    def park(tmp):
        Path(tmp).write_bytes(b"half")
        print("parked", flush=True)
        time.sleep(600)

    if kind == "dir":
        with staging_dir(Path(where), "version") as tmp:
            park(tmp / "model.pth")
    else:
        atomic_write(Path(where), park)
"""


def kill_parked_writer(kind: str, where: Path) -> list[str]:
    """Start a writer, let it park in the middle of its write, kill -9 it; its leftovers."""
    proc = start_python(PARKED.format(kind=kind, where=str(where)))
    assert proc.stdout.readline().strip() == "parked", proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parent = where if kind == "dir" else where.parent
    return [p.name for p in parent.iterdir() if p.name.startswith(".tmp-")]


def test_leftovers_of_killed_writers_are_removed_by_the_next_run(tmp_path, image_root,
                                                                 tracking):
    root = tmp_path / "artifacts" / "food"
    root.mkdir(parents=True)
    assert kill_parked_writer("dir", root)
    store = tmp_path / "model_store"
    store.mkdir()
    assert kill_parked_writer("file", store / "food.mar")
    ckpt_dir = tmp_path / "checkpoints" / "food"
    ckpt_dir.mkdir(parents=True)
    assert kill_parked_writer("file", ckpt_dir / "last.pt")

    # the next run of each writer removes them (they are fresh: no hour-long grace)
    version = train_mod.train(tiny_config(tmp_path, image_root, epochs=1))
    assert version.parent == root
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.pt"]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    exported = tmp_path / "exported" / "v1"
    exported.mkdir(parents=True)
    write_export(exported, lambda stage: fake_export(stage, "A"))
    read_model_dir(exported)  # model_config.json and labels beside the export
    build_archive(exported, "onnx", export_path=store)
    assert sorted(p.name for p in store.iterdir()) == ["food.mar"]


def test_two_archive_builds_of_one_model_name_at_once_both_succeed(tmp_path):
    """torch-model-archiver assembles in $TMPDIR/<model name>: two builds of "food" into two
    stores at once must not wipe each other's files."""
    from concurrent.futures import ThreadPoolExecutor

    versions = []
    for tag in "AB":
        version = tmp_path / tag / "v1"
        version.mkdir(parents=True)
        write_export(version, lambda stage, tag=tag: fake_export(stage, tag))
        read_model_dir(version)
        versions.append(version)
    jobs = [(versions[i % 2], tmp_path / f"store{i}") for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        built = list(pool.map(lambda job: build_archive(job[0], "onnx", export_path=job[1]),
                              jobs))
    for (version, _), mar in zip(jobs, built):
        assert read_model(mar).model_bytes("onnx") == read_model(version).model_bytes("onnx")


# ---------------------------------------------------------------- resume rules
def test_kill_after_version_publish_then_resume_writes_no_second_version(tmp_path, image_root,
                                                                          tracking):
    args = cli_args(tmp_path, image_root, epochs=1)
    killed = run_python(f"from training.cli import main; main({args!r})", cwd=tmp_path,
                        env={"FOOD_CRASH_AT": "after_version_publish"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    root = tmp_path / "artifacts" / "food"
    ckpt_file = tmp_path / "checkpoints" / "food" / "last.pt"
    assert existing_versions(root) == [1]
    ckpt = engine.load_checkpoint(ckpt_file)
    assert not ckpt.finished and ckpt.run_id
    assert read_model(root / "v1").config["training_run_id"] == ckpt.run_id

    # a new run of the same name must not take the unfinished run's checkpoint
    before = ckpt_file.read_bytes()
    with pytest.raises(train_mod.RunConflict, match="--resume.*another --name"):
        train_mod.train(tiny_config(tmp_path, image_root, epochs=1))
    assert ckpt_file.read_bytes() == before

    assert cli_main(["train", "--config", str(REPO / "configs/sample.yaml"), "--resume",
                     "--checkpoint-dir",
                     str(tmp_path / "checkpoints")]) == 0
    assert existing_versions(root) == [1]
    done = engine.load_checkpoint(ckpt_file)
    assert done.finished and Path(done.version_dir).name == "v1"


def test_resume_honours_an_early_stop_decided_before_the_interruption(tmp_path, image_root,
                                                                        tracking, monkeypatch):
    def flat_validate(model, loader, criterion, device):
        logits, labels = train_mod.run_inference(model, loader, device)
        return {"val_loss": 1.0, "val_acc": 0.5}, logits, labels

    def killed(*args, **kwargs):
        raise SystemExit("killed before the version was written")

    monkeypatch.setattr(train_mod, "validate", flat_validate)
    config = tiny_config(tmp_path, image_root, epochs=6, early_stop_patience=1)
    real_write = train_mod._write_version
    monkeypatch.setattr(train_mod, "_write_version", killed)
    with pytest.raises(SystemExit):
        train_mod.train(config)
    ckpt = engine.load_checkpoint(tmp_path / "checkpoints" / "food" / "last.pt")
    assert (ckpt.epoch, ckpt.stale_epochs) == (2, 1)  # the run had decided to stop

    monkeypatch.setattr(train_mod, "_write_version", real_write)
    epochs = []
    real_epoch = train_mod.train_one_epoch
    monkeypatch.setattr(train_mod, "train_one_epoch",
                        lambda *a, **k: epochs.append(a[7]) or real_epoch(*a, **k))
    version = train_mod.train(config, resume=True)
    assert epochs == []  # no epoch after the stop
    assert read_model(version).config["metrics"]["epochs_run"] == 2


def test_two_runs_of_one_name_at_once_the_second_is_refused(tmp_path, image_root):
    ckpt_dir = tmp_path / "checkpoints" / "food"
    holder = start_python(f"""
        import time
        from pathlib import Path
        from training.locks import exclusive
        with exclusive(Path({str(ckpt_dir)!r}), "training run"):
            print("holding", flush=True)
            time.sleep(600)
        """)
    assert holder.stdout.readline().strip() == "holding"
    with pytest.raises(Busy, match="another --name"):
        train_mod.train(tiny_config(tmp_path, image_root))
    assert cli_main(cli_args(tmp_path, image_root)) == 2
    holder.send_signal(signal.SIGKILL)  # the kernel drops a dead holder's lock
    holder.wait()
    with exclusive(ckpt_dir, "training run", wait=5):
        pass


def test_checkpoint_written_by_a_killed_writer_keeps_the_previous_one_whole(tmp_path):
    ckpt = engine.Checkpoint(
        config={}, epoch=1, model={"w": torch.ones(2)}, optimizer={}, scheduler={}, scaler={},
        best_acc=0.5, best_state=None, stale_epochs=0, history=[], train_time=0.0,
        rng=engine.rng_state(), mlflow_run_id=None, run_id="r1")
    path = tmp_path / "food" / "last.pt"
    engine.save_checkpoint(path, ckpt)
    assert kill_parked_writer("file", path)
    assert engine.load_checkpoint(path).epoch == 1 and engine.load_checkpoint(path).run_id == "r1"

