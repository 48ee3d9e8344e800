"""Phone-sized photographs for the benchmarks: real photos re-encoded as camera JPEGs.

The sources are the photographs installed packages ship (scikit-learn's ``china.jpg`` and
``flower.jpg``, matplotlib's ``grace_hopper.jpg`` and, when scikit-image is installed, its
``skimage/data`` photos), found through each package's ``__file__``. Each is center-cropped
to the target aspect, upscaled with Lanczos to 12 MP (4000x3000), 8 MP, 5 MP and 1080p
(1920x1080), given light sensor-like noise (so the JPEG carries real entropy, as a camera's
does) and saved at phone-like quality (85-92, 4:2:0). Every other image is a portrait shot
stored as a phone stores one: landscape pixels plus the EXIF tag that turns them upright.
Besides the center crop of each source (``phone_images``: what the serving benchmark sends),
``CROPS`` more framings per source and size (zoomed 50-100 %, placed at random, random
quality and orientation) give the draft-decoding agreement a few hundred images
(``agreement_images``). Built once into
``benchmarks/scratch/photos/`` (with a ``manifest.json``) and reused while the sources match.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.versions import SCRATCH
from serving.atomic import publish_dir, staging_dir

log = logging.getLogger(__name__)

# Label -> (width, height): a 12 MP phone camera, an 8 MP and a 5 MP one, a 1080p frame.
SIZES: dict[str, tuple[int, int]] = {"12mp": (4000, 3000), "8mp": (3264, 2448),
                                     "5mp": (2592, 1944), "1080p": (1920, 1080)}
QUALITIES = (85, 88, 92)
NOISE_SIGMA = 4.0  # grey levels of Gaussian noise added after the upscale
EXIF_ORIENTATION = 0x0112
ROTATE_90_CW = 6  # the tag a phone writes for a portrait shot held the usual way
CROPS = 8  # extra framings per source and size, for agreement figures


@dataclass(frozen=True)
class Source:
    """One photograph an installed package ships: ``package``'s directory / ``relpath``."""

    package: str
    relpath: str

    @property
    def name(self) -> str:
        return Path(self.relpath).stem


SOURCES = (
    Source("sklearn", "datasets/images/china.jpg"),
    Source("sklearn", "datasets/images/flower.jpg"),
    Source("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    Source("skimage", "data/coffee.png"),
    Source("skimage", "data/chelsea.png"),
    Source("skimage", "data/astronaut.png"),
    Source("skimage", "data/rocket.jpg"),
    Source("skimage", "data/motorcycle_left.png"),
    Source("skimage", "data/hubble_deep_field.jpg"),
)


def source_paths() -> dict[str, Path]:
    """``{name: file}`` of every source whose package is installed (scikit-image is
    optional; without it three photos remain)."""
    found = {}
    for src in SOURCES:
        try:
            module = importlib.import_module(src.package)
        except ImportError:
            log.info("%s is not installed: no %s", src.package, src.name)
            continue
        path = Path(module.__file__).parent / src.relpath
        if path.is_file():
            found[src.name] = path
        else:
            log.warning("%s ships no %s", src.package, path)
    return found


def phone_photo(source: Path, size: tuple[int, int], seed: int, zoom: float = 1.0,
                at: tuple[float, float] = (0.5, 0.5)) -> Image.Image:
    """A crop of ``source`` at ``size``'s aspect, Lanczos-upscaled to ``size``, with light
    Gaussian noise (seeded). The crop is ``zoom`` times the largest one that fits, its
    top-left corner at fractions ``at`` of the room left (default: the center crop)."""
    with Image.open(source) as img:
        img = img.convert("RGB")
    width, height = size
    fit_w, fit_h = min(img.width, img.height * width / height), min(img.height,
                                                                    img.width * height / width)
    crop_w, crop_h = fit_w * zoom, fit_h * zoom
    left, top = (img.width - crop_w) * at[0], (img.height - crop_h) * at[1]
    box = (left, top, left + crop_w, top + crop_h)
    big = np.asarray(img.resize(size, Image.Resampling.LANCZOS, box=box), dtype=np.float32)
    noise = np.random.default_rng(seed).standard_normal(big.shape, dtype=np.float32)
    big += noise * np.float32(NOISE_SIGMA)
    return Image.fromarray(np.clip(big, 0, 255).astype(np.uint8), "RGB")


def _save(img: Image.Image, path: Path, quality: int, portrait: bool) -> None:
    """A camera-like JPEG: baseline, 4:2:0; a ``portrait`` image is stored turned a quarter
    to landscape, with the EXIF tag that turns it upright again."""
    exif = Image.Exif()
    if portrait:
        img = img.transpose(Image.Transpose.ROTATE_90)  # tag 6 rotates it back clockwise
        exif[EXIF_ORIENTATION] = ROTATE_90_CW
    img.save(path, format="JPEG", quality=quality, subsampling="4:2:0", exif=exif.tobytes())


def _wanted(sources: dict[str, Path]) -> dict:
    return {"sources": sorted(sources), "sizes": {k: list(v) for k, v in SIZES.items()},
            "qualities": list(QUALITIES), "noise_sigma": NOISE_SIGMA, "crops": CROPS}


def _build_one(tmp: Path, name: str, path: Path, label: str, size: tuple[int, int],
               i: int, j: int, crop: int) -> dict:
    """One photo of the set: framing 0 is the center crop, quality and orientation
    alternating; the others are drawn from a seeded generator."""
    if crop == 0:
        quality = QUALITIES[(i + j) % len(QUALITIES)]
        portrait, zoom, at = (i + j) % 2 == 1, 1.0, (0.5, 0.5)
        file = f"{label}-{name}.jpg"
    else:
        rng = np.random.default_rng([i, j, crop])
        quality, portrait = int(rng.choice(QUALITIES)), bool(rng.random() < 0.5)
        zoom, at = float(rng.uniform(0.5, 1.0)), (float(rng.random()), float(rng.random()))
        file = f"{label}-{name}-crop{crop}.jpg"
    upright = (size[1], size[0]) if portrait else size
    _save(phone_photo(path, upright, seed=(i * 100 + j) * 100 + crop, zoom=zoom, at=at),
          tmp / file, quality, portrait)
    return {"file": file, "source": name, "size": label, "crop": crop, "width": size[0],
            "height": size[1], "quality": quality, "portrait": portrait,
            "zoom": round(zoom, 3), "bytes": (tmp / file).stat().st_size}


def build(scratch: Path = SCRATCH) -> list[dict]:
    """The photo set's manifest rows (file, source, size label, stored pixels, quality,
    bytes, portrait), built into ``scratch/photos`` unless a matching set is already there."""
    root = Path(scratch) / "photos"
    manifest = root / "manifest.json"
    sources = source_paths()
    if not sources:
        raise RuntimeError("no source photographs found: install scikit-learn, matplotlib "
                           "or scikit-image")
    wanted = _wanted(sources)
    if manifest.is_file():
        held = json.loads(manifest.read_text())
        if held.get("set") == wanted:
            return [{**row, "file": str(root / row["file"])} for row in held["photos"]]
        log.info("rebuilding %s: the sources or settings changed", root)
    rows = []
    with staging_dir(Path(scratch), "photos") as tmp:
        for i, (name, path) in enumerate(sorted(sources.items())):
            for j, (label, size) in enumerate(SIZES.items()):
                for crop in range(1 + CROPS):
                    rows.append(_build_one(tmp, name, path, label, size, i, j, crop))
        log.info("built %d photos in %s", len(rows), root)
        (tmp / "manifest.json").write_text(json.dumps({"set": wanted, "photos": rows},
                                                      indent=2) + "\n")
        shutil.rmtree(root, ignore_errors=True)
        publish_dir(tmp, root)
    return [{**row, "file": str(root / row["file"])} for row in rows]


def _by_size(rows: list[dict]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {label: [] for label in SIZES}
    for row in rows:
        out[row["size"]].append(Path(row["file"]))
    return {label: sorted(files) for label, files in out.items()}


def phone_images(scratch: Path = SCRATCH) -> dict[str, list[Path]]:
    """``{"12mp": [...], "8mp": [...], "5mp": [...], "1080p": [...]}``: one photo per source
    (its center crop) by size, sorted by name; built on first use."""
    return _by_size([row for row in build(scratch) if row["crop"] == 0])


def agreement_images(scratch: Path = SCRATCH) -> dict[str, list[Path]]:
    """Like :func:`phone_images` with every framing: ``1 + CROPS`` photos per source."""
    return _by_size(build(scratch))
