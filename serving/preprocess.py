"""Validation preprocessing: the one implementation every stage calls.

EXIF-transpose, convert to RGB, resize the shorter side to ``resize_size``, center-crop
``crop_size``, scale to [0, 1], normalize with ``mean``/``std``, CHW float32. It matches
torchvision's ``Resize(resize_size) -> CenterCrop(crop_size) -> ToTensor() -> Normalize()``
on PIL images to float rounding (tests/test_preprocess.py holds it there).

numpy and Pillow only (plus the error types): the TorchServe .mar carries it in its
``serving/`` package.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps

from serving.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# A 12 MP phone photo is 4000x3000; 50 MP leaves room for big cameras and refuses bombs.
DEFAULT_MAX_PIXELS = 50_000_000

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


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_size: int | None = None) -> Image.Image:
    """Decode encoded image bytes into an upright RGB image, or raise :class:`InputError`.

    ``draft_size`` lets the JPEG decoder scale down by 1/2, 1/4 or 1/8 while decoding, as long
    as both sides stay >= ``draft_size`` (the resize target). It is several times faster on
    phone photos but not bit-identical to a full decode, so it is off unless asked for.
    """
    if not data:
        raise InputError("empty body: send the image bytes (curl -T image.jpg ...) "
                         "or a multipart field named 'data'", 400, "EmptyBody")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise InputError(f"image too large: {e}", 413, "ImageTooLarge") from e
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError...
        raise InputError(f"cannot identify an image in the {len(data)} bytes sent "
                         f"(JPEG, PNG, WebP, BMP, GIF or TIFF expected)", 400,
                         "InvalidImage") from e
    width, height = img.size
    if width < 1 or height < 1:
        raise InputError(f"image has no pixels ({width}x{height})", 400, "InvalidImage")
    if width * height > max_pixels:
        raise InputError(f"image is {width}x{height} = {width * height} pixels, over the "
                         f"limit of {max_pixels}", 413, "ImageTooLarge")
    if draft_size is not None and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    try:
        img.load()
    except Exception as e:
        raise InputError(f"image data is truncated or corrupt ({img.format}: {e})", 400,
                         "InvalidImage") from e
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001, S110 - a broken EXIF block must not cost the prediction
        pass
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any sensible Pillow mode to RGB; alpha is composited over white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode not in _CONVERTIBLE_MODES:
        raise InputError(f"unsupported image mode {mode!r}: expected 8-bit RGB, grey, "
                         f"palette, CMYK, or 16-bit grey", 415, "UnsupportedImageMode")
    if mode in {"P", "PA"}:  # a palette may carry transparency; go through RGBA
        img = img.convert("RGBA")
    if img.mode in {"RGBA", "LA", "RGBa", "La"}:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) after scaling the shorter side to ``size``; torchvision's exact formula."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_and_crop(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Resize the shorter side to ``resize_size`` then center-crop ``crop_size``."""
    new_w, new_h = resized_size(img.width, img.height, spec.resize_size)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), _INTERPOLATIONS[spec.interpolation])
    c = spec.crop_size
    top = round((new_h - c) / 2.0)
    left = round((new_w - c) / 2.0)
    return img.crop((left, top, left + c, top + c))


def to_array(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """An RGB crop as a normalized CHW float32 array."""
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    arr = (arr - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """A decoded RGB image as the model's CHW float32 input."""
    return to_array(resize_and_crop(to_rgb(img), spec), spec)


def preprocess_bytes(data: bytes, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS,
                     draft: bool = False) -> np.ndarray:
    """Encoded image bytes as the model's CHW float32 input, or :class:`InputError`."""
    img = decode_image(data, max_pixels, spec.resize_size if draft else None)
    return preprocess(img, spec)

