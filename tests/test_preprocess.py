"""The shared preprocessing equals torchvision's evaluation transforms and refuses bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import jpeg_bytes
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision import transforms as T

from serving.artifacts import labels_from_class_to_idx
from serving.predictor import parse_topk, softmax, top_k
from serving.preprocess import (
    DEFAULT_DRAFT_FACTOR,
    InputError,
    PreprocessSpec,
    decode_image,
    draft_target,
    preprocess,
    preprocess_bytes,
)


def torchvision_eval(spec: PreprocessSpec):
    return T.Compose([T.Resize(spec.resize_size), T.CenterCrop(spec.crop_size), T.ToTensor(),
                      T.Normalize(spec.mean, spec.std)])


@settings(max_examples=40, deadline=None)
@given(w=st.integers(8, 300), h=st.integers(8, 300), crop=st.integers(8, 64),
       extra=st.integers(0, 40), seed=st.integers(0, 1000))
def test_matches_torchvision_eval_transforms(w, h, crop, extra, seed):
    spec = PreprocessSpec(resize_size=crop + extra, crop_size=crop)
    data = jpeg_bytes(w, h, seed=seed)
    ours = preprocess_bytes(data, spec, draft_factor=None)  # torchvision decodes in full
    ref = torchvision_eval(spec)(Image.open(io.BytesIO(data)).convert("RGB")).numpy()
    assert ours.shape == (3, crop, crop) and ours.dtype == np.float32
    # Same PIL resize, same crop box; only float rounding of the normalization can differ.
    assert np.abs(ours - ref).max() <= 1e-5


def test_max_abs_difference_on_example_sizes(capsys):
    spec = PreprocessSpec(resize_size=256, crop_size=224)
    worst = 0.0
    for w, h in [(500, 375), (375, 500), (1024, 768), (300, 300)]:
        data = jpeg_bytes(w, h, seed=w)
        ref = torchvision_eval(spec)(Image.open(io.BytesIO(data)).convert("RGB")).numpy()
        ours = preprocess_bytes(data, spec, draft_factor=None)
        worst = max(worst, float(np.abs(ours - ref).max()))
    print(f"max abs difference vs torchvision: {worst:.2e}")
    assert worst <= 1e-5


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"),
                                      ("CMYK", "JPEG"), ("I;16", "PNG"), ("LA", "PNG")])
def test_convertible_modes_become_rgb(mode, fmt):
    img = Image.new("RGB", (20, 10), (200, 30, 30)).convert(mode) if mode != "I;16" else \
        Image.fromarray(np.full((10, 20), 40000, dtype=np.uint16))
    out = decode_image(_encode(img, fmt))
    assert out.mode == "RGB" and out.size == (20, 10)


def test_sixteen_bit_grey_is_rescaled_not_clipped():
    img = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    out = np.asarray(decode_image(_encode(img, "PNG")))
    assert 126 <= out[0, 0, 0] <= 130  # half of full scale, not clipped to 255


def test_transparent_pixels_are_composited_on_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    out = np.asarray(decode_image(_encode(img, "PNG")))
    assert (out == 255).all()


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(_encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_float_mode_is_refused_with_415():
    img = Image.fromarray(np.zeros((4, 4), dtype=np.float32), "F")
    with pytest.raises(InputError) as e:
        decode_image(_encode(img, "TIFF"))
    assert e.value.status == 415 and "F" in e.value.message


@pytest.mark.parametrize("data,status", [
    (b"", 400),
    (b"definitely not an image", 400),
    (jpeg_bytes(64, 64)[:300], 400),  # truncated JPEG
])
def test_bad_bytes_are_client_errors(data, status):
    with pytest.raises(InputError) as e:
        decode_image(data)
    assert e.value.status == status
    body = e.value.to_dict()
    assert body["code"] == status and body["type"] and body["message"]


def test_too_many_pixels_is_413_before_decoding():
    data = _encode(Image.new("L", (5000, 5000)), "PNG")
    with pytest.raises(InputError) as e:
        decode_image(data, max_pixels=1_000_000)
    assert e.value.status == 413 and "5000x5000" in e.value.message


def test_spec_round_trips_and_validates():
    spec = PreprocessSpec(resize_size=72, crop_size=64)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="crop_size"):
        PreprocessSpec(resize_size=32, crop_size=64)
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessSpec(interpolation="cubic-ish")


def test_preprocess_accepts_non_rgb_pil_images():
    spec = PreprocessSpec(resize_size=40, crop_size=32)
    assert preprocess(Image.new("L", (50, 60), 128), spec).shape == (3, 32, 32)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=2, max_size=12), st.integers(1, 12))
def test_topk_is_sorted_and_sums_at_most_one(logits, k):
    probs = softmax(np.array([logits]))[0]
    labels = [f"c{i}" for i in range(len(logits))]
    k = min(k, len(logits))
    out = [p.to_dict() for p in top_k(probs, labels, k)]
    assert len(out) == k
    ps = [o["probability"] for o in out]
    assert ps == sorted(ps, reverse=True)
    assert sum(ps) <= 1 + 1e-5
    assert out[0]["label"] == labels[int(np.argmax(probs))] or ps[0] == ps[1]


def test_labels_need_a_bijection_and_topk_is_validated():
    assert labels_from_class_to_idx({"b": 1, "a": 0}) == ["a", "b"]
    with pytest.raises(ValueError):
        labels_from_class_to_idx({"a": 0, "b": 2})
    assert parse_topk(None, 3, 5) == 3 and parse_topk(b"2", 3, 5) == 2
    for bad in ("0", "6", "two"):
        with pytest.raises(ValueError, match="allowed: 1..5"):
            parse_topk(bad, 3, 5)


def _smooth_jpeg(width: int, height: int, quality: int = 90, **kw) -> bytes:
    """A photo-like JPEG (smooth gradients, a little noise) of any size, quick to encode."""
    small = np.asarray(Image.open(io.BytesIO(jpeg_bytes(64, 48, seed=width * 7 + height))))
    img = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    return _encode(img, "JPEG", quality=quality, **kw)


@pytest.mark.parametrize("factor", [None, 1, 2, 3])
def test_draft_keeps_the_output_shape_and_dtype(factor):
    spec = PreprocessSpec(resize_size=64, crop_size=56)
    out = preprocess_bytes(_smooth_jpeg(1200, 900), spec, draft_factor=factor)
    assert out.shape == (3, 56, 56) and out.dtype == np.float32 and out.flags.c_contiguous


@pytest.mark.parametrize("size,spec", [((500, 375), PreprocessSpec()),
                                       ((64, 48), PreprocessSpec(resize_size=40, crop_size=32))])
def test_draft_on_a_small_image_is_identical_to_full_decode(size, spec):
    data = _smooth_jpeg(*size)
    full = preprocess_bytes(data, spec, draft_factor=None)
    for factor in (1, 2):
        assert np.array_equal(preprocess_bytes(data, spec, draft_factor=factor), full)


def test_draft_on_a_big_image_stays_close_to_full_decode():
    spec = PreprocessSpec(resize_size=64, crop_size=56)
    data = _smooth_jpeg(1600, 1200)
    full = preprocess_bytes(data, spec, draft_factor=None)
    for factor in (1, 2):
        draft = preprocess_bytes(data, spec, draft_factor=factor)
        assert not np.array_equal(draft, full)  # the draft did happen
        assert float(np.abs(draft - full).mean()) < 0.05  # same picture, same framing


@settings(max_examples=40, deadline=None)
@given(w=st.integers(1, 1500), h=st.integers(1, 1500), target=st.integers(1, 300))
def test_draft_never_decodes_below_the_resize_target(w, h, target):
    data = _smooth_jpeg(w, h, quality=75)
    img = decode_image(data, draft_size=target)
    # Both sides keep the target (or the whole side, where the image is smaller than it)...
    assert img.width >= min(w, target) and img.height >= min(h, target)
    # ...and the draft only ever scales down, by 1, 2, 4 or 8.
    scale = max(-(-w // img.width), -(-h // img.height))
    assert scale in (1, 2, 4, 8) and img.size == (-(-w // scale), -(-h // scale))


def test_draft_keeps_the_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: a phone's portrait shot
    data = _smooth_jpeg(1600, 1200, exif=exif.tobytes())
    assert decode_image(data).size == (1200, 1600)
    assert decode_image(data, draft_size=100).size == (150, 200)


def test_pixel_limit_is_judged_on_the_full_size_even_with_draft():
    data = _smooth_jpeg(3000, 2000, quality=50)
    spec = PreprocessSpec(resize_size=64, crop_size=56)
    for factor in (None, 1, 2):
        with pytest.raises(InputError) as e:
            preprocess_bytes(data, spec, max_pixels=1_000_000, draft_factor=factor)
        # A draft would decode 375x250: the refusal names the size the header declares.
        assert e.value.status == 413 and "3000x2000" in e.value.message


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_draft_factor_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="draft_factor"):
        draft_target(PreprocessSpec(), bad)


def test_draft_target_and_default():
    spec = PreprocessSpec(resize_size=72, crop_size=64)
    assert draft_target(spec, None) is None and draft_target(spec, 2) == 144
    assert DEFAULT_DRAFT_FACTOR is None or draft_target(spec, DEFAULT_DRAFT_FACTOR) >= 72
