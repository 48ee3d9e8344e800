"""Validation preprocessing: the one implementation every stage calls, under a decode budget.

EXIF-transpose, convert to RGB, resize the shorter side to ``resize_size``, center-crop
``crop_size``, scale to [0, 1], normalize with ``mean``/``std``, CHW float32. It matches
torchvision's ``Resize(resize_size) -> CenterCrop(crop_size) -> ToTensor() -> Normalize()``
on PIL images to float rounding (tests/test_preprocess.py holds it there).

Untrusted bytes are decoded under a :class:`DecodeBudget`, checked on the header before any
pixel exists: six formats only (Pillow's own guidance: ``Image.open(formats=...)``), a pixel
limit on the decoded canvas (a GIF's logical screen included), a limit on progressive JPEG
scans, at most 32 bits per pixel, the first frame only, and a time limit checked while the
decoder reads. Conversions to RGB run in strips, so a decode holds at most the decoded image
and its RGB copy; a resize that would blow up (a 1 x N image) works on the crop's box only.

A JPEG may be decoded in draft mode (libjpeg's reduced DCT: 1/2, 1/4 or 1/8 scale while
decoding) down to ``draft_factor x resize_size``, then resized as usual; the limits above
are checked on the full size in the header, before the draft is asked for.

numpy and Pillow only (plus the error types): the TorchServe .mar carries it in its
``serving/`` package.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps

from serving.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# A 12 MP phone photo is 4000x3000; 50 MP leaves room for big cameras and refuses bombs.
DEFAULT_MAX_PIXELS = 50_000_000
# NVIDIA DALI's default; a camera's progressive JPEG has about 10.
DEFAULT_MAX_JPEG_SCANS = 500
# A 50 MP photo decodes in well under a second; this is for images built to be slow.
DEFAULT_DECODE_TIMEOUT_S = 5.0
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_ALLOWED_TEXT = "JPEG, PNG, WebP, BMP, GIF or TIFF"
# Bytes the decoder reads between two looks at the clock.
_READ_CHUNK = 16 * 1024
# Rows converted to RGB at a time hold at most this many pixels.
_STRIP_PIXELS = 1 << 20
# JPEG draft decoding, as a multiple of resize_size that both decoded sides keep (None: off).
# Off by default: `python -m benchmarks.draft_decode` finds it 2-7x faster on phone photos
# but short of the 99.5 % top-1 agreement with full decoding that turning it on requires
# (its flips are near-ties, yet they happen); 2 is the factor to opt in with.
DEFAULT_DRAFT_FACTOR: int | None = None
# A short-side resize bigger than this (only thin images get there) resizes the crop's box.
_CROP_FIRST_PIXELS = 1 << 22

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# Modes Pillow converts to RGB faithfully. 16/32-bit grey ("I;16", "I") is rescaled first;
# float ("F") and anything unknown is refused rather than guessed.
_CONVERTIBLE_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                      "YCbCr", "LAB", "HSV"}
_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "LA", "RGBa", "La"}


@dataclass(frozen=True)
class PreprocessSpec:
    """The numbers that define validation preprocessing; stored in ``model_config.json``."""

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.crop_size < 1 or self.resize_size < self.crop_size:
            raise ValueError(
                f"preprocessing needs 1 <= crop_size <= resize_size, "
                f"got crop_size={self.crop_size}, resize_size={self.resize_size}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of "
                             f"{sorted(_INTERPOLATIONS)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {self.mean}, "
                             f"{self.std}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        """Build from the ``preprocessing`` section of ``model_config.json``."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


@dataclass(frozen=True)
class DecodeBudget:
    """What decoding one untrusted image may cost; every limit is checked before the pixels
    exist, except the time, which the decoder's reads check as they go (None: no limit)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS
    timeout_s: float | None = DEFAULT_DECODE_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.max_jpeg_scans < 1:
            raise ValueError(f"max_pixels and max_jpeg_scans must be >= 1, got "
                             f"{self.max_pixels}, {self.max_jpeg_scans}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"the decode timeout must be > 0 seconds, got {self.timeout_s}")


class _Deadline:
    """The clock of one decode: ``check()`` raises InputError (413) once it has run out."""

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self.end = None if timeout_s is None else time.monotonic() + timeout_s

    def check(self) -> None:
        if self.end is not None and time.monotonic() > self.end:
            raise InputError(f"decoding took longer than the limit of {self.timeout_s}s; "
                             f"send a smaller or simpler image", 413, "DecodeTimeout")


class _TimedReader(io.BytesIO):
    """The encoded bytes as a file whose reads stop the decoder once its time is up."""

    def __init__(self, data: bytes, deadline: _Deadline) -> None:
        super().__init__(data)
        self.deadline = deadline

    def read(self, size: int | None = -1) -> bytes:
        self.deadline.check()
        return super().read(size)


def _too_large(message: str) -> InputError:
    return InputError(message, 413, "ImageTooLarge")


def _other_format(data: bytes) -> str | None:
    """The Pillow format (outside the allowlist) whose signature ``data`` starts with, if any;
    Pillow's own ``_accept`` sniffers, which read the first bytes and decode nothing."""
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        if fmt in ALLOWED_FORMATS:
            continue
        accept = Image.OPEN[fmt][1]
        try:
            if accept is not None and accept(prefix):
                return fmt
        except Exception:  # noqa: BLE001, S112 - a sniffer that chokes is not a match
            continue
    return None


def check_header(img: Image.Image, data: bytes, budget: DecodeBudget) -> None:
    """Refuse, before decoding, an image whose header asks for more than ``budget``."""
    width, height = img.size
    if width < 1 or height < 1:
        raise InputError(f"image has no pixels ({width}x{height})", 400, "InvalidImage")
    if width * height > budget.max_pixels:
        raise _too_large(f"image is {width}x{height} = {width * height} pixels, over the "
                         f"limit of {budget.max_pixels}")
    if img.mode not in _CONVERTIBLE_MODES | _HIGH_BIT_MODES:
        raise InputError(f"unsupported image mode {img.mode!r}: expected 8-bit RGB, grey, "
                         f"palette, CMYK, or 16-bit grey", 415, "UnsupportedImageMode")
    if img.format == "JPEG":
        scans = data.count(b"\xff\xda")  # every scan starts with an SOS marker
        if scans > budget.max_jpeg_scans:
            raise _too_large(f"JPEG has {scans} scans, over the limit of "
                             f"{budget.max_jpeg_scans}")


def draft_target(spec: PreprocessSpec, draft_factor: int | None) -> int | None:
    """The side a JPEG draft decode must keep for ``spec``: ``draft_factor x resize_size``
    (None: draft off); ValueError for a factor that is not a positive integer."""
    if draft_factor is None:
        return None
    if isinstance(draft_factor, bool) or not isinstance(draft_factor, int) or draft_factor < 1:
        raise ValueError(f"draft_factor must be None (off) or an integer >= 1, "
                         f"got {draft_factor!r}")
    return draft_factor * spec.resize_size


def decode_image(data: bytes, max_pixels: int | None = None, draft_size: int | None = None,
                 *, budget: DecodeBudget | None = None) -> Image.Image:
    """Decode encoded image bytes into an upright RGB image, or raise :class:`InputError`.

    ``budget`` (default: ``DecodeBudget(max_pixels)``) bounds the work: 415 for a format or
    mode outside the allowlist, 413 for an image over a limit, judged on the full size the
    header declares. ``draft_size`` lets the JPEG decoder scale down by 1/2, 1/4 or 1/8
    while decoding, as long as both sides stay >= ``draft_size``; other formats, and JPEGs
    under twice that size, decode in full.
    """
    budget = budget or DecodeBudget(max_pixels or DEFAULT_MAX_PIXELS)
    deadline = _Deadline(budget.timeout_s)
    if not data:
        raise InputError("empty body: send the image bytes (curl -T image.jpg ...) "
                         "or a multipart field named 'data'", 400, "EmptyBody")
    try:
        img = Image.open(_TimedReader(data, deadline), formats=ALLOWED_FORMATS)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise _too_large(f"image too large: {e}") from e
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError...
        other = _other_format(data)
        if other is not None:
            raise InputError(f"{other} images are not accepted; send {_ALLOWED_TEXT}", 415,
                             "UnsupportedImageFormat") from e
        raise InputError(f"cannot identify an image in the {len(data)} bytes sent "
                         f"({_ALLOWED_TEXT} expected)", 400, "InvalidImage") from e
    check_header(img, data, budget)  # on the declared size: a draft does not admit a bomb
    if draft_size is not None and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))  # square: holds for either orientation
    img.decodermaxblock = _READ_CHUNK  # the first frame only: nothing here seeks further
    try:
        img.load()
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"image data is truncated or corrupt ({img.format}: {e})", 400,
                         "InvalidImage") from e
    deadline.check()
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001, S110 - a broken EXIF block must not cost the prediction
        pass
    return to_rgb(img, deadline)


def _grey_lut(img: Image.Image) -> list[int]:
    """16/32-bit grey to 8 bits: full scale is 65535 for 16-bit images and for 32-bit ones
    that use more than 8 bits, else 255; beyond it clips."""
    top = 65535 if img.mode.startswith("I;16") or img.getextrema()[1] > 255 else 255
    return [min(255, int(v * 255 / top + 0.5)) for v in range(65536)]


def _convert(img: Image.Image, grey_lut: list[int] | None) -> Image.Image:
    """One image (or strip) of a convertible mode as RGB; alpha composited over white."""
    mode = img.mode
    if mode in _HIGH_BIT_MODES:
        return (img if mode == "I" else img.convert("I")).point(grey_lut, "L").convert("RGB")
    if mode in {"P", "PA"}:  # a palette may carry transparency; go through RGBA
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def to_rgb(img: Image.Image, deadline: _Deadline | None = None) -> Image.Image:
    """Convert any sensible Pillow mode to RGB; alpha is composited over white.

    Big images convert in strips of rows, so the conversion holds the source and its RGB copy
    and nothing more; ``deadline`` is checked between strips.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode not in _CONVERTIBLE_MODES | _HIGH_BIT_MODES:
        raise InputError(f"unsupported image mode {mode!r}: expected 8-bit RGB, grey, "
                         f"palette, CMYK, or 16-bit grey", 415, "UnsupportedImageMode")
    grey_lut = _grey_lut(img) if mode in _HIGH_BIT_MODES else None
    width, height = img.size
    if width * height <= _STRIP_PIXELS:
        return _convert(img, grey_lut)
    out = Image.new("RGB", img.size)
    rows = max(1, _STRIP_PIXELS // width)
    for top in range(0, height, rows):
        if deadline is not None:
            deadline.check()
        strip = img.crop((0, top, width, min(height, top + rows)))
        out.paste(_convert(strip, grey_lut), (0, top))
    return out


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) after scaling the shorter side to ``size``; torchvision's exact formula."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_and_crop(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Resize the shorter side to ``resize_size`` then center-crop ``crop_size``.

    When the resized image would be huge (a thin image: 1 x N becomes resize_size x
    resize_size*N), only the crop's box of the source is resized, at the same scale: the
    same crop to within rounding, without the huge intermediate.
    """
    new_w, new_h = resized_size(img.width, img.height, spec.resize_size)
    c = spec.crop_size
    top = round((new_h - c) / 2.0)
    left = round((new_w - c) / 2.0)
    interpolation = _INTERPOLATIONS[spec.interpolation]
    if new_w * new_h > _CROP_FIRST_PIXELS:
        sx, sy = img.width / new_w, img.height / new_h
        box = (left * sx, top * sy, (left + c) * sx, (top + c) * sy)
        return img.resize((c, c), interpolation, box=box)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), interpolation)
    return img.crop((left, top, left + c, top + c))


def to_array(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """An RGB crop as a normalized CHW float32 array: ``(x / 255 - mean) / std``, computed as
    one multiply-add per channel straight from the uint8 pixels into the CHW output (10x
    faster than the three whole-array passes and the transpose copy it replaces; equal to
    within float32 rounding, 4e-7)."""
    pixels = np.asarray(img, dtype=np.uint8)
    scale = 1.0 / (255.0 * np.asarray(spec.std, np.float64))
    shift = -np.asarray(spec.mean, np.float64) / np.asarray(spec.std, np.float64)
    out = np.empty((3, *pixels.shape[:2]), np.float32)
    for c in range(3):
        np.multiply(pixels[:, :, c], np.float32(scale[c]), out=out[c], casting="unsafe")
        out[c] += np.float32(shift[c])
    return out


def preprocess(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """A decoded RGB image as the model's CHW float32 input."""
    return to_array(resize_and_crop(to_rgb(img), spec), spec)


def preprocess_bytes(data: bytes, spec: PreprocessSpec, max_pixels: int | None = None,
                     draft_factor: int | None = DEFAULT_DRAFT_FACTOR, *,
                     budget: DecodeBudget | None = None) -> np.ndarray:
    """Encoded image bytes as the model's CHW float32 input, or :class:`InputError`; decoded
    under ``budget`` (default: ``max_pixels`` and the default limits), a JPEG in draft mode
    down to ``draft_factor x resize_size`` when a factor is given."""
    img = decode_image(data, max_pixels, draft_target(spec, draft_factor), budget=budget)
    return preprocess(img, spec)
