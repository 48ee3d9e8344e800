"""The phone photo set builds from installed packages, and the draft benchmark's parts work."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from benchmarks import draft_decode, photos
from serving.preprocess import PreprocessSpec, decode_image, preprocess_bytes

SMALL_SIZES = {"12mp": (400, 300), "1080p": (192, 108)}


@pytest.fixture
def small_sizes(monkeypatch):
    """The photo set at a tenth of the size and one extra framing, so it builds in seconds."""
    monkeypatch.setattr(photos, "SIZES", SMALL_SIZES)
    monkeypatch.setattr(photos, "CROPS", 1)


def test_sources_are_found_in_the_installed_packages():
    found = photos.source_paths()
    # scikit-learn and matplotlib are dependencies; scikit-image adds six more when present.
    assert {"china", "flower", "grace_hopper"} <= set(found)
    for path in found.values():
        with Image.open(path) as img:
            assert min(img.size) >= 200


def test_photo_set_builds_once_with_the_sizes_asked_for(tmp_path, small_sizes):
    rows = photos.build(tmp_path)
    sources = photos.source_paths()
    assert len(rows) == len(sources) * len(SMALL_SIZES) * 2  # center crop + one framing
    assert all((r["zoom"] == 1.0) == (r["crop"] == 0) and 0.5 <= r["zoom"] <= 1.0
               for r in rows)
    for row in rows:
        with Image.open(row["file"]) as img:
            assert img.format == "JPEG" and img.size == SMALL_SIZES[row["size"]]
            orientation = img.getexif().get(photos.EXIF_ORIENTATION)
        assert (orientation == photos.ROTATE_90_CW) == row["portrait"]
        upright = decode_image(open(row["file"], "rb").read()).size  # noqa: SIM115
        w, h = SMALL_SIZES[row["size"]]
        assert upright == ((h, w) if row["portrait"] else (w, h))
    assert any(r["portrait"] for r in rows) and not all(r["portrait"] for r in rows)
    manifest = tmp_path / "photos" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert photos.build(tmp_path) == rows and manifest.stat().st_mtime_ns == stamp  # reused


def test_photo_set_is_rebuilt_when_the_set_changes(tmp_path, small_sizes, monkeypatch):
    photos.build(tmp_path)
    monkeypatch.setattr(photos, "QUALITIES", (80,))
    rows = photos.build(tmp_path)
    assert {r["quality"] for r in rows} == {80}
    held = json.loads((tmp_path / "photos" / "manifest.json").read_text())
    assert held["set"]["qualities"] == [80]
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == sorted(
        [r["file"].rsplit("/", 1)[1] for r in rows] + ["manifest.json"])


def test_phone_images_groups_the_files_by_size(tmp_path, small_sizes):
    images, every = photos.phone_images(tmp_path), photos.agreement_images(tmp_path)
    sources = len(photos.source_paths())
    assert set(images) == set(every) == set(SMALL_SIZES)
    for label in SMALL_SIZES:
        assert len(images[label]) == sources and len(every[label]) == 2 * sources
        assert set(images[label]) < set(every[label])
        assert all(p.name.startswith(label + "-") and "crop" not in p.name
                   for p in images[label])


def test_a_12mp_photo_carries_camera_like_entropy():
    source = photos.source_paths()["china"]
    img = photos.phone_photo(source, (4000, 3000), seed=0)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    assert img.size == (4000, 3000)
    assert len(buf.getvalue()) > 1_000_000  # an upscale without noise is a few hundred KB


def test_agreement_counts_changes_and_runs_the_model_only_when_needed(tmp_path, small_sizes):
    spec = PreprocessSpec(resize_size=40, crop_size=32)
    calls = []

    def logits(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return x.mean(axis=(2, 3))  # 3 "classes": the mean of each channel

    small = [tmp_path / "small.jpg"]
    Image.new("RGB", (60, 50), (200, 30, 30)).save(small[0])
    rows = draft_decode.agreement(spec, logits, small)
    assert [(r["factor"], r["changed"], r["agreement"]) for r in rows] == [(1, 0, 1.0),
                                                                           (2, 0, 1.0)]
    assert calls == []  # identical inputs: nothing to run
    big = photos.phone_images(tmp_path)["12mp"]
    rows = draft_decode.agreement(spec, logits, big)
    assert all(r["n"] == len(big) and r["changed"] == len(big) for r in rows)
    assert all(0.0 <= r["agreement"] <= 1.0 and r["mean_abs_input_diff"] > 0 for r in rows)
    assert calls


def test_agreement_reports_flips_and_their_margin(tmp_path, small_sizes):
    spec = PreprocessSpec(resize_size=40, crop_size=32)
    photo = photos.phone_images(tmp_path)["12mp"][:1]
    data = photo[0].read_bytes()
    full = float(preprocess_bytes(data, spec, draft_factor=None).mean())
    draft = float(preprocess_bytes(data, spec, draft_factor=1).mean())
    assert full != draft
    middle = (full + draft) / 2

    def logits(x: np.ndarray) -> np.ndarray:  # class 0 on one side of the middle, else 1
        gap = x.mean(axis=(1, 2, 3)) - middle
        return np.stack([gap, -gap], axis=1)

    row = draft_decode.agreement(spec, logits, photo, factors=(1,))[0]
    gap = abs(full - middle)
    expected = float(np.tanh(gap))  # softmax([g, -g]): the two probabilities differ by tanh(g)
    assert row["agreement"] == 0.0 and row["max_flip_margin"] == pytest.approx(expected, abs=1e-4)


def test_model_rows_on_an_onnx_version(tmp_path, small_sizes, onnx_version, sample_images):
    row = draft_decode.model_rows(onnx_version, "trained", tmp_path,
                                  sample_root=sample_images[0].parent)
    assert row["engine"] == "onnx" and row["spec"]["resize_size"] == 40
    sets = {(s["set"], s["factor"]) for s in row["sets"]}
    assert sets == {(name, f) for name in (*SMALL_SIZES, "sample") for f in (1, 2)}
    sample = {s["factor"]: s for s in row["sets"] if s["set"] == "sample"}
    # Only a JPEG of at least 2 x factor x resize_size (40) on its short side is drafted.
    short = [min(Image.open(p).size) for p in sample_images]
    for factor in (1, 2):
        assert sample[factor]["n"] == len(sample_images)
        assert sample[factor]["changed"] == sum(s >= 2 * factor * 40 for s in short)
    assert sample[2]["changed"] == 0 and sample[2]["agreement"] == 1.0


def _times(full_ms: float, draft_ms: dict[int, float]) -> list[dict]:
    rows = [{"set": "12mp", "resize": 256, "factor": None, "p50_ms": full_ms}]
    return rows + [{"set": "12mp", "resize": 256, "factor": f, "p50_ms": ms}
                   for f, ms in draft_ms.items()]


def _model(kind: str, agreement: dict[int, float]) -> dict:
    return {"kind": kind, "sets": [{"set": "12mp", "n": 200, "factor": f, "agreement": a}
                                   for f, a in agreement.items()]}


def test_decide_follows_the_issue_rule():
    times = _times(100.0, {1: 20.0, 2: 30.0})
    # Below 99.5 % on a trained model: off, whatever the speed.
    off = draft_decode.decide([_model("trained", {1: 0.99, 2: 0.994})], times)
    assert off["default_factor"] is None and "99.5" in off["why"]
    # Random-weight agreement does not count.
    on = draft_decode.decide([_model("trained", {1: 0.995, 2: 1.0}),
                              _model("random-weight", {1: 0.5, 2: 0.5})], times)
    assert on["default_factor"] == 2  # the best worst-case agreement wins
    # Not faster: off.
    slow = draft_decode.decide([_model("trained", {1: 1.0, 2: 1.0})],
                               _times(100.0, {1: 120.0, 2: 110.0}))
    assert slow["default_factor"] is None
    # No trained version: off, and says what to run.
    assert "make train" in draft_decode.decide([], times)["why"]


def test_markdown_renders_every_section():
    times = [{**t, "crop": 224, "decoded": "500x375", "p50_ms_spread": [1.0, 2.0],
              "items_per_s": 10.0, "mean_kb": 2000} for t in _times(100.0, {1: 20.0, 2: 30.0})]
    models = [{**_model("trained", {1: 1.0, 2: 1.0}), "version": "artifacts/food/v1",
               "engine": "onnx", "spec": {"resize_size": 256, "crop_size": 224}}]
    for m in models:
        for s in m["sets"]:
            s.update(changed=200, mean_abs_input_diff=0.01)
    result = {"timestamp": "t", "quick": True, "machine": {"cpu": "cpu", "usable_cores": 2},
              "load_average": {"before": [0.1], "after": [0.2]}, "models": models,
              "timing": times, "decision": draft_decode.decide(models, times)}
    text = draft_decode.markdown(result)
    assert "Default draft factor: **1**" in text and "| 12mp | 2000 | 256/224 | full |" in text
    assert "Random-weight" in text and "none found" in text
