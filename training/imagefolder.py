"""ImageFolder trees on disk (``root/<class>/**/<file>``): class directories, file counts and
which files are images. Torch-free, so config validation can check a data folder cheaply."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def class_dirs(root: Path) -> list[Path]:
    """The class directories of ``root``, sorted; hidden ones are not classes."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(class_dir: Path) -> list[Path]:
    return sorted(f for f in class_dir.rglob("*") if f.is_file() and not f.name.startswith("."))


def count_images_per_class(root: Path) -> dict[str, int]:
    """Files per class directory of an ImageFolder tree (cheap: no decoding)."""
    return {d.name: len(_files(d)) for d in class_dirs(root)}


def is_image(path: Path) -> bool:
    """True when Pillow can identify and verify the file as an image."""
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # noqa: BLE001 - Pillow raises many kinds; any of them means "not an image"
        return False


def scan_image_folder(root: Path) -> tuple[dict[str, list[str]], list[str]]:
    """``root/<class>/**/<file>`` -> files per class, plus the files that are not images."""
    per_class: dict[str, list[str]] = {}
    skipped: list[str] = []
    for d in class_dirs(root):
        good = []
        for f in _files(d):
            (good if is_image(f) else skipped).append(str(f))
        per_class[d.name] = good
    return per_class, skipped
