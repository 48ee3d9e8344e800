"""The synthetic sample dataset: layout, determinism, atomic writes, and not-trivial content."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from training import sample_data
from training.sample_data import CLASSES, EXAMPLE_SIZE, TRAIN_SHORT_SIDE, draw, generate


def tree_digest(*roots: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``roots``."""
    return {f"{r.name}/{p.relative_to(r)}": hashlib.sha256(p.read_bytes()).hexdigest()
            for r in roots for p in sorted(r.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[Path, Path, str]:
    base = tmp_path_factory.mktemp("sample")
    summary = generate(base / "data", examples_dir=base / "examples", per_class=4, seed=0)
    return base / "data", base / "examples", summary


def test_imagefolder_layout_sizes_and_summary(small_set):
    root, _, summary = small_set
    assert sorted(p.name for p in root.iterdir()) == sorted(CLASSES)
    for label in CLASSES:
        files = sorted(p.name for p in (root / label).iterdir())
        assert files == ["0000.jpg", "0001.jpg", "0002.jpg", "0003.jpg"]
        for name in files:
            with Image.open(root / label / name) as img:
                assert img.format == "JPEG" and img.mode == "RGB"
                short, long = sorted(img.size)
                assert TRAIN_SHORT_SIDE[0] <= short <= TRAIN_SHORT_SIDE[1]
                assert long <= 1.5 * short + 1
    assert str(root) in summary and "20" in summary and all(c in summary for c in CLASSES)
    assert not list(root.parent.glob(".data.tmp-*")), "temp dir left behind"
    assert not list(root.parent.glob(".tmp-*")), "temp dir left behind"


def test_examples_are_committable_photos(small_set):
    _, examples, _ = small_set
    assert sorted(p.name for p in examples.iterdir()) == sorted(f"{c}.jpg" for c in CLASSES)
    for label in CLASSES:
        path = examples / f"{label}.jpg"
        assert path.stat().st_size < 60_000
        assert path.stat().st_mode & 0o044, "examples must be readable like any other file"
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.size == EXAMPLE_SIZE


def test_examples_are_not_copies_of_training_images(small_set):
    root, examples, _ = small_set

    def thumb(path: Path) -> np.ndarray:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB").resize((32, 32)), dtype=np.float32)

    for label in CLASSES:
        ex = thumb(examples / f"{label}.jpg")
        for p in (root / label).iterdir():
            assert np.abs(ex - thumb(p)).mean() > 5


def test_same_seed_gives_byte_identical_files(tmp_path, small_set):
    root, examples, _ = small_set
    generate(tmp_path / "data", examples_dir=tmp_path / "examples", per_class=4, seed=0)
    assert tree_digest(tmp_path / "data", tmp_path / "examples") == tree_digest(root, examples)
    generate(tmp_path / "other", examples_dir=tmp_path / "ex1", per_class=4, seed=1)
    assert set(tree_digest(tmp_path / "other").values()).isdisjoint(tree_digest(root).values())


def test_complete_root_is_left_unchanged(tmp_path):
    generate(tmp_path / "data", examples_dir=tmp_path / "ex", per_class=1)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*.jpg")}
    summary = generate(tmp_path / "data", examples_dir=tmp_path / "ex", per_class=1)
    assert "left unchanged" in summary
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*.jpg")} == before


@pytest.mark.parametrize("per_class_again", [1, 2])
def test_incomplete_or_foreign_root_is_refused(tmp_path, per_class_again):
    root = tmp_path / "data"
    if per_class_again == 1:
        (root / "pizza").mkdir(parents=True)
        (root / "pizza" / "mine.jpg").write_bytes(b"user data")
    else:  # complete for per_class=1, but 2 were asked for
        generate(root, examples_dir=tmp_path / "ex", per_class=1)
    with pytest.raises(FileExistsError, match="data"):
        generate(root, examples_dir=tmp_path / "ex", per_class=per_class_again)
    if per_class_again == 1:
        assert (root / "pizza" / "mine.jpg").read_bytes() == b"user data"


def test_interrupted_run_leaves_no_dataset(tmp_path, monkeypatch):
    real_draw, calls = sample_data.draw, []

    def failing_draw(label, rng, size):
        calls.append(label)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_draw(label, rng, size)

    monkeypatch.setattr(sample_data, "draw", failing_draw)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "data", examples_dir=tmp_path / "ex", per_class=2)
    assert list(tmp_path.iterdir()) == [], "an interrupted run must leave nothing behind"


def test_classes_are_not_separable_by_colour_alone(tmp_path):
    """A nearest-centroid rule on the mean colour must do poorly: shape has to matter."""
    generate(tmp_path / "data", examples_dir=tmp_path / "ex", per_class=16, seed=3)
    feats, labels = [], []
    for ci, label in enumerate(CLASSES):
        for p in sorted((tmp_path / "data" / label).iterdir()):
            with Image.open(p) as img:
                feats.append(np.asarray(img.convert("RGB"), dtype=np.float32).mean((0, 1)))
            labels.append(ci)
    x, y = np.array(feats), np.array(labels)
    correct = 0
    for i in range(len(y)):  # leave-one-out nearest centroid
        keep = np.arange(len(y)) != i
        centroids = np.stack([x[keep & (y == c)].mean(0) for c in range(len(CLASSES))])
        correct += int(np.argmin(((centroids - x[i]) ** 2).sum(1)) == y[i])
    assert correct / len(y) < 0.5, f"mean colour alone classifies {correct}/{len(y)}"


@settings(max_examples=15, deadline=None)
@given(label=st.sampled_from(CLASSES), seed=st.integers(0, 2**32 - 1),
       width=st.integers(48, 260), height=st.integers(48, 260))
def test_draw_gives_an_rgb_image_of_the_asked_size(label, seed, width, height):
    img = draw(label, np.random.default_rng(seed), (width, height))
    assert img.mode == "RGB" and img.size == (width, height)
    assert np.asarray(img).std() > 5, "a photo, not a flat colour"


def test_unknown_label_and_bad_count_are_refused(tmp_path):
    with pytest.raises(ValueError, match="burger"):
        draw("burger", np.random.default_rng(0), (64, 64))
    with pytest.raises(ValueError, match="per_class"):
        generate(tmp_path / "data", per_class=0)


def test_cli_writes_the_set(tmp_path, capsys):
    from training.cli import main

    rc = main(["sample-data", str(tmp_path / "data"), "--examples", str(tmp_path / "ex"),
               "--per-class", "1", "--seed", "2"])
    assert rc == 0
    assert "5 synthetic images" in capsys.readouterr().out
    assert len(list((tmp_path / "data").rglob("*.jpg"))) == len(CLASSES)
