"""Loading a model trusts nothing in it: .mar member caps, duplicate names, the thread count an
archive asks for, and the cache that ``models:/`` downloads go to. (A model whose ONNX input
or output disagrees with model_config.json is refused naming the file and the mismatch:
tests/test_artifacts.py.)"""

from __future__ import annotations

import json
import os
import shutil
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from test_predictor import write_mar

from serving import Predictor
from serving import artifacts as artifacts_mod
from serving.artifacts import host_cpus, read_model


def rewrite_mar(source: Path, target: Path, extra: list[tuple[str, bytes]],
                config_changes: dict | None = None) -> Path:
    """A copy of the .mar ``source`` with ``extra`` members appended (deflated)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w",
                                                        zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "model_config.json" and config_changes:
                data = json.dumps({**json.loads(data), **config_changes}).encode()
            out.writestr(info.filename, data)
        for name, data in extra:
            out.writestr(name, data)
    return target


@pytest.fixture
def mar(onnx_version, tmp_path) -> Path:
    return write_mar(onnx_version, tmp_path / "food.mar")


def test_a_member_that_inflates_past_its_cap_is_refused_before_it_is_read(mar, tmp_path):
    bomb = rewrite_mar(mar, tmp_path / "bomb.mar",
                       [("predictions.csv", bytes(200 * 1024 * 1024))])
    # 200 MB of zeros deflate to ~200 KB
    assert bomb.stat().st_size - mar.stat().st_size < 2 * 1024 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"predictions\.csv inflates to 209715200 bytes"):
            read_model(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024, peak


def test_a_compression_ratio_past_the_cap_is_refused(mar, tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts_mod, "MAX_OTHER_MEMBER_BYTES", 1024**3)
    bomb = rewrite_mar(mar, tmp_path / "ratio.mar", [("notes.txt", bytes(50 * 1024 * 1024))])
    with pytest.raises(ValueError, match=r"notes\.txt inflates .* more than 100x"):
        read_model(bomb)


def test_duplicate_member_names_are_refused(mar, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile: "Duplicate name"
        twice = rewrite_mar(mar, tmp_path / "twice.mar",
                            [("model_config.json", b'{"name": "evil"}')])
        dotted = rewrite_mar(mar, tmp_path / "dotted.mar", [("./model.onnx", b"other")])
    for archive in (twice, dotted):
        with pytest.raises(ValueError, match="more than once"):
            read_model(archive)


def test_thread_count_from_the_archive_is_capped_by_the_host(onnx_version, mar, tmp_path):
    greedy = rewrite_mar(mar, tmp_path / "greedy.mar", [], {"intra_op_threads": 512})
    assert read_model(greedy).config["intra_op_threads"] == host_cpus()
    predictor = Predictor.load(greedy)
    assert predictor.threads == host_cpus() < 512
    for bad in ("lots", -1, 0, 2.5):
        broken = rewrite_mar(mar, tmp_path / "bad.mar", [], {"intra_op_threads": bad})
        with pytest.raises(ValueError, match="intra_op_threads"):
            read_model(broken)
    # the operator's own --threads is taken as given
    assert Predictor.load(greedy, intra_op_threads=1).threads == 1


def test_models_uri_downloads_go_to_a_cache_that_is_pruned(onnx_version, tmp_path,
                                                          monkeypatch):
    """MLflow's download is replaced by a copy of a version (the cache is what is tested;
    real registry downloads: tests/test_predictor.py)."""
    import mlflow.artifacts

    cache = tmp_path / "cache"
    monkeypatch.setenv(artifacts_mod.MODEL_CACHE_ENV, str(cache))

    def download(artifact_uri: str, dst_path: str) -> str:
        target = Path(dst_path) / "version"
        shutil.copytree(onnx_version, target)
        return str(target)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download)
    leftover = cache / ".tmp-download.killed"
    leftover.mkdir(parents=True)
    old = time.time() - 7200
    os.utime(leftover, (old, old))  # a download killed two hours ago
    records = []
    for _ in range(artifacts_mod.MODEL_CACHE_KEEP + 2):
        records.append(read_model("models:/food-classifier@champion"))
    assert records[-1].path.parent.parent == cache
    kept = sorted(p for p in cache.iterdir())
    assert len(kept) == artifacts_mod.MODEL_CACHE_KEEP and not leftover.exists()
    assert records[-1].path.is_dir() and not records[0].path.exists()

    def broken(artifact_uri: str, dst_path: str) -> str:
        (Path(dst_path) / "half").write_bytes(b"partial")
        raise OSError("connection reset")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", broken)
    with pytest.raises(OSError, match="connection reset"):
        read_model("models:/food-classifier@champion")
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]
