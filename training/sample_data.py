"""The embedded sample dataset: synthetic dish "photos" drawn from a seed, no network needed.

It exists to exercise the pipeline (train, export, archive, serve) in minutes on a CPU, not
to classify real food. Each image is a dish drawn with Pillow (pizza, salad, sushi, pancakes,
soup) on a varied table, with random position, scale, rotation, lighting, blur, noise, size
and JPEG quality. Colours are shared across classes on purpose (red soup and red pizza, green
salad and green soup, brown pancakes and brown crusts, the same tables and plates), so a
model has to look at shape and texture, not at the mean colour.

Every image has its own random stream, ``default_rng([seed, stream, class, index])``: the
training images use stream 0, the held-out ``examples/<class>.jpg`` stream 1, so the examples
are never copies of training images and the same seed always gives byte-identical files.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from serving.atomic import atomic_write, publish_dir, staging_dir

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("pancakes", "pizza", "salad", "soup", "sushi")

TRAIN_STREAM, EXAMPLE_STREAM = 0, 1
TRAIN_SHORT_SIDE = (140, 220)  # shorter side of a training image, pixels
EXAMPLE_SIZE = (500, 375)  # width, height of examples/<class>.jpg
SUPERSAMPLE = 2  # dishes are drawn this much larger, then downsampled (anti-aliasing)

RGB = tuple[int, int, int]

# Colours a dish part can take. Several of them appear in more than one class.
TABLES: list[RGB] = [(150, 100, 60), (190, 150, 105), (110, 70, 45), (220, 215, 205),
                     (90, 90, 95), (160, 40, 40), (40, 90, 60), (230, 200, 150),
                     (60, 70, 110), (200, 120, 60), (245, 240, 230), (120, 130, 90)]
PLATES: list[RGB] = [(245, 245, 240), (235, 230, 215), (200, 215, 230), (60, 60, 65),
                     (180, 70, 50), (230, 200, 120), (120, 160, 140), (30, 40, 80)]
REDS: list[RGB] = [(190, 40, 30), (210, 70, 30), (170, 30, 40), (225, 110, 40)]
GREENS: list[RGB] = [(70, 140, 50), (110, 170, 60), (40, 100, 40), (150, 190, 80)]
BROWNS: list[RGB] = [(205, 150, 80), (180, 115, 55), (225, 175, 100), (150, 90, 45)]
SOUPS: list[RGB] = REDS + GREENS[:2] + BROWNS[:2] + [(235, 215, 170), (230, 160, 50)]


def _jitter(rng: np.random.Generator, color: RGB, amount: int = 18) -> RGB:
    """``color`` moved by up to ``amount`` per channel, so no two dishes share exact colours."""
    c = np.asarray(color) + rng.integers(-amount, amount + 1, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _pick(rng: np.random.Generator, palette: list[RGB], amount: int = 18) -> RGB:
    return _jitter(rng, palette[int(rng.integers(len(palette)))], amount)


def _shade(color: RGB, factor: float) -> RGB:
    return tuple(int(min(255, max(0, v * factor))) for v in color)


def _blob(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float,
          angle: float = 0.0, wobble: float = 0.0, n: int = 18) -> list[tuple[float, float]]:
    """Polygon of a rotated ellipse whose radius wobbles by ``wobble`` (0 = a clean ellipse)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = 1 + wobble * rng.uniform(-1, 1, n) if wobble else np.ones(n)
    x, y = rx * r * np.cos(t), ry * r * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return list(zip((cx + ca * x - sa * y).tolist(), (cy + sa * x + ca * y).tolist()))


def _circle(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, **kw) -> None:
    d.ellipse((cx - r, cy - r, cx + r, cy + r), **kw)


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1], shape (h, w): a small random grid upscaled bicubically."""
    grid = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
    big = Image.fromarray(grid, "L").resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float32) / 127.5 - 1


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A table: plain, wood grain, checked cloth or stone, with a lighting gradient."""
    base = np.asarray(_pick(rng, TABLES, 25), dtype=np.float32)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:  # plain, slightly mottled
        tex = 12 * _smooth_noise(rng, w, h, 6)[..., None]
    elif kind == 1:  # wood grain along a random direction
        a = rng.uniform(0, np.pi)
        u = (x * math.cos(a) + y * math.sin(a)) / max(w, h)
        warp = 3 * _smooth_noise(rng, w, h, 5)
        tex = 15 * np.sin(u * rng.uniform(25, 60) + warp)[..., None]
    elif kind == 2:  # checked tablecloth
        cell = rng.uniform(0.08, 0.2) * min(w, h)
        other = (base + np.asarray(_pick(rng, TABLES, 25), dtype=np.float32)) / 2
        checks = ((x // cell + y // cell) % 2)[..., None]
        return _lit(rng, base * (1 - checks) + other * checks, x, y, w, h)
    else:  # stone / marble
        tex = 25 * _smooth_noise(rng, w, h, 12)[..., None] + 10 * _smooth_noise(rng, w, h, 30)[
            ..., None]
    return _lit(rng, base + tex, x, y, w, h)


def _lit(rng: np.random.Generator, img: np.ndarray, x: np.ndarray, y: np.ndarray,
         w: int, h: int) -> np.ndarray:
    """Light falling across the table from a random side."""
    a = rng.uniform(0, 2 * np.pi)
    g = ((x - w / 2) * math.cos(a) + (y - h / 2) * math.sin(a)) / max(w, h)
    return img * (1 + rng.uniform(0.1, 0.45) * g)[..., None]


# Dishes: each draws onto a transparent square canvas of side s, centred, radius about s/2.

def _plate(rng: np.random.Generator, d: ImageDraw.ImageDraw, s: int, r: float) -> None:
    c = _pick(rng, PLATES, 12)
    _circle(d, s / 2, s / 2, r, fill=c)
    _circle(d, s / 2, s / 2, r * rng.uniform(0.78, 0.88), fill=_shade(c, 0.93))


def _bowl(rng: np.random.Generator, d: ImageDraw.ImageDraw, s: int, r: float) -> float:
    """A bowl seen from above; returns the radius of its inside."""
    c = _pick(rng, PLATES, 12)
    _circle(d, s / 2, s / 2, r, fill=_shade(c, 0.85))
    _circle(d, s / 2, s / 2, r * 0.93, fill=c)
    inner = r * rng.uniform(0.72, 0.82)
    _circle(d, s / 2, s / 2, inner, fill=_shade(c, 0.7))
    return inner


def _pizza(rng: np.random.Generator, d: ImageDraw.ImageDraw, s: int) -> None:
    c, r = s / 2, s * 0.48
    if rng.random() < 0.5:
        _plate(rng, d, s, r)
        r *= 0.9
    crust = _pick(rng, BROWNS)
    _circle(d, c, c, r, fill=crust, outline=_shade(crust, 0.75), width=max(1, s // 120))
    sauce = _pick(rng, REDS + [(230, 150, 60)])
    d.polygon(_blob(rng, c, c, r * 0.84, r * 0.84, wobble=0.04, n=40), fill=sauce)
    cheese = _pick(rng, [(245, 220, 140), (250, 235, 180), (240, 200, 100)])
    for _ in range(int(rng.integers(10, 22))):
        rr, t = r * 0.72 * math.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        size = r * rng.uniform(0.1, 0.22)
        d.polygon(_blob(rng, c + rr * math.cos(t), c + rr * math.sin(t), size, size * 0.7,
                        rng.uniform(0, np.pi), 0.35), fill=_jitter(rng, cheese, 10))
    topping = _pick(rng, [(150, 30, 30), (120, 20, 25), (40, 40, 40), (70, 120, 40)])
    for _ in range(int(rng.integers(5, 11))):
        rr, t = r * 0.66 * math.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        tr = r * rng.uniform(0.09, 0.13)
        _circle(d, c + rr * math.cos(t), c + rr * math.sin(t), tr,
                fill=_jitter(rng, topping, 12), outline=_shade(topping, 0.7))
    if rng.random() < 0.5:  # cut into slices
        line = _shade(sauce, 0.6)
        a0 = rng.uniform(0, np.pi)
        for k in range(int(rng.choice([3, 4]))):
            a = a0 + k * np.pi / 4 * (2 if k >= 2 else 1)
            d.line((c - r * math.cos(a), c - r * math.sin(a), c + r * math.cos(a),
                    c + r * math.sin(a)), fill=line, width=max(1, s // 100))


def _soup(rng: np.random.Generator, d: ImageDraw.ImageDraw, s: int) -> None:
    c = s / 2
    inner = _bowl(rng, d, s, s * 0.48)
    liquid = _pick(rng, SOUPS)
    _circle(d, c, c, inner * 0.97, fill=liquid)
    _circle(d, c + inner * 0.1, c + inner * 0.1, inner * 0.75, fill=_shade(liquid, 0.92))
    if rng.random() < 0.6:  # a swirl of cream
        cream = _jitter(rng, (245, 240, 225), 8)
        r0 = inner * rng.uniform(0.25, 0.5)
        a0 = rng.uniform(0, 360)
        d.arc((c - r0, c - r0, c + r0, c + r0), a0, a0 + rng.uniform(200, 330), fill=cream,
              width=max(2, s // 40))
    garnish = _pick(rng, GREENS + [(240, 240, 230), (200, 160, 90)])
    for _ in range(int(rng.integers(0, 8))):
        rr, t = inner * 0.7 * math.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        g = inner * rng.uniform(0.03, 0.07)
        d.polygon(_blob(rng, c + rr * math.cos(t), c + rr * math.sin(t), g, g, 0, 0.3, 8),
                  fill=_jitter(rng, garnish, 10))
    a = rng.uniform(0, 2 * np.pi)  # glossy highlight
    hx, hy = c + inner * 0.5 * math.cos(a), c + inner * 0.5 * math.sin(a)
    d.polygon(_blob(rng, hx, hy, inner * 0.18, inner * 0.07, a + np.pi / 2),
              fill=_shade(liquid, 1.3))
    if rng.random() < 0.4:  # a spoon resting in the bowl
        sp = _jitter(rng, (200, 200, 205), 10)
        a = rng.uniform(0, 2 * np.pi)
        ex, ey = c + inner * 0.25 * math.cos(a), c + inner * 0.25 * math.sin(a)
        d.line((ex, ey, c + s * 0.5 * math.cos(a), c + s * 0.5 * math.sin(a)), fill=sp,
               width=max(2, s // 35))
        d.polygon(_blob(rng, ex, ey, inner * 0.2, inner * 0.13, a), fill=sp)


def _salad(rng: np.random.Generator, d: ImageDraw.ImageDraw, s: int) -> None:
    c = s / 2
    inner = _bowl(rng, d, s, s * 0.48) if rng.random() < 0.75 else s * 0.42
    extras = REDS + [(240, 200, 40), (120, 40, 110), (240, 240, 220), (230, 140, 40)]
    for k in range(int(rng.integers(40, 65))):
        rr, t = inner * 0.9 * math.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        x, y = c + rr * math.cos(t), c + rr * math.sin(t)
        if k % 4 == 3:  # tomato, pepper, onion, egg ... pieces
            g = inner * rng.uniform(0.06, 0.12)
            col = _pick(rng, extras, 12)
            d.polygon(_blob(rng, x, y, g, g * rng.uniform(0.6, 1), rng.uniform(0, np.pi),
                            0.15, 12), fill=col, outline=_shade(col, 0.7))
        else:  # a leaf
            g = inner * rng.uniform(0.15, 0.28)
            col = _pick(rng, GREENS, 25)
            ang = rng.uniform(0, np.pi)
            d.polygon(_blob(rng, x, y, g, g * rng.uniform(0.35, 0.6), ang, 0.25, 14),
                      fill=col, outline=_shade(col, 0.65))
            d.line((x - g * 0.8 * math.cos(ang), y - g * 0.8 * math.sin(ang),
                    x + g * 0.8 * math.cos(ang), y + g * 0.8 * math.sin(ang)),
                   fill=_shade(col, 1.25), width=1)


def _sushi(rng: np.random.Generator, d: ImageDraw.ImageDraw, s: int) -> None:
    c = s / 2
    if rng.random() < 0.6:  # a wooden or slate board
        board = _pick(rng, [(170, 120, 70), (200, 160, 110), (50, 50, 55), (30, 30, 30)], 15)
        bw, bh = s * 0.47, s * rng.uniform(0.28, 0.38)
        d.rounded_rectangle((c - bw, c - bh, c + bw, c + bh), radius=s * 0.03, fill=board)
        w, h = bw * 0.9, bh * 0.85
    else:
        _plate(rng, d, s, s * 0.48)
        w = h = s * 0.3
    rows = int(rng.integers(1, 3)) if h < w * 0.8 else 2
    cols = int(rng.integers(2, 4))
    r = min(w / cols, h / rows) * rng.uniform(0.85, 0.98)
    nori = _jitter(rng, (25, 35, 25), 10)
    rice = _jitter(rng, (240, 238, 228), 8)
    for i in range(rows):
        for j in range(cols):
            x = c - w + (2 * j + 1) * w / cols + rng.normal(0, r * 0.05)
            y = c - h + (2 * i + 1) * h / rows + rng.normal(0, r * 0.05)
            if rng.random() < 0.25:  # nigiri: a slice of fish on rice
                d.polygon(_blob(rng, x, y, r * 0.95, r * 0.55, 0.3, 0.05), fill=rice)
                fish = _pick(rng, REDS + [(240, 130, 80), (245, 170, 130)], 12)
                d.polygon(_blob(rng, x, y, r * 0.9, r * 0.45, 0.3, 0.04), fill=fish)
                for k in (-1, 0, 1):
                    d.line((x + k * r * 0.3 - r * 0.1, y - r * 0.35, x + k * r * 0.3 + r * 0.1,
                            y + r * 0.35), fill=_shade(fish, 1.2), width=max(1, s // 150))
            else:  # maki: nori ring, rice, filling
                _circle(d, x, y, r * 0.9, fill=nori)
                _circle(d, x, y, r * 0.75, fill=rice)
                filling = _pick(rng, REDS + GREENS + [(240, 200, 40), (240, 130, 80)], 12)
                d.polygon(_blob(rng, x, y, r * 0.3, r * 0.3, 0, 0.3, 9), fill=filling)
    if rng.random() < 0.6:  # wasabi and ginger
        d.polygon(_blob(rng, c + w * 0.8, c + h + r * 0.2, r * 0.35, r * 0.3, 0, 0.3, 10),
                  fill=_jitter(rng, (130, 170, 60), 10))
        d.polygon(_blob(rng, c - w * 0.8, c + h + r * 0.2, r * 0.45, r * 0.3, 0, 0.3, 10),
                  fill=_jitter(rng, (240, 180, 170), 10))


def _pancakes(rng: np.random.Generator, d: ImageDraw.ImageDraw, s: int) -> None:
    c = s / 2
    _plate(rng, d, s, s * 0.48)
    n = int(rng.integers(3, 6))
    rx = s * rng.uniform(0.3, 0.38)
    ry = rx * rng.uniform(0.45, 0.75)  # seen at an angle
    thick = s * rng.uniform(0.05, 0.07)
    cake = _pick(rng, BROWNS)
    top_y = c + (n - 1) * thick / 2
    for k in range(n):  # bottom up: edge band, then the top face
        y = c + (n - 1) * thick / 2 - k * thick
        _circle_e(d, c, y + thick * 0.5, rx, ry, fill=_shade(cake, 0.7))
        _circle_e(d, c, y, rx, ry, fill=_jitter(rng, cake, 8), outline=_shade(cake, 0.6),
                  width=max(1, s // 150))
        top_y = y
    inner = _shade(cake, 1.12)
    _circle_e(d, c, top_y, rx * 0.8, ry * 0.8, fill=inner)
    syrup = _pick(rng, [(120, 60, 15), (150, 80, 20), (90, 40, 10), (170, 40, 60)], 10)
    d.polygon(_blob(rng, c, top_y, rx * 0.6, ry * 0.6, 0, 0.12, 24), fill=syrup)
    for _ in range(int(rng.integers(1, 4))):  # drips down the side
        x = c + rng.uniform(-0.6, 0.6) * rx
        d.line((x, top_y + ry * 0.3, x, top_y + ry * 0.6 + rng.uniform(0.5, 1.5) * n * thick),
               fill=syrup, width=max(2, s // 45))
    if rng.random() < 0.7:  # a pat of butter
        b = rx * rng.uniform(0.12, 0.2)
        d.polygon(_blob(rng, c, top_y, b, b * 0.8, rng.uniform(0, np.pi), 0.0, 4),
                  fill=_jitter(rng, (250, 230, 130), 8))
    for _ in range(int(rng.integers(0, 6))):  # berries around the stack
        t = rng.uniform(0, 2 * np.pi)
        _circle(d, c + s * 0.42 * math.cos(t), c + s * 0.42 * math.sin(t), s * 0.025,
                fill=_pick(rng, [(60, 50, 120), (180, 30, 40)], 10))


def _circle_e(d: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float,
              **kw) -> None:
    d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), **kw)


DISHES = {"pancakes": _pancakes, "pizza": _pizza, "salad": _salad, "soup": _soup,
          "sushi": _sushi}


def _clutter(rng: np.random.Generator, img: Image.Image) -> None:
    """A napkin or cutlery at the edge of the table, in any class."""
    d = ImageDraw.Draw(img)
    w, h = img.size
    if rng.random() < 0.35:
        col = _pick(rng, TABLES + PLATES, 20)
        x, y = rng.uniform(-0.1, 0.9) * w, rng.choice([rng.uniform(-0.2, 0.05),
                                                       rng.uniform(0.8, 0.95)]) * h
        d.polygon(_blob(rng, x, y, w * 0.15, h * 0.12, rng.uniform(0, np.pi), 0.0, 4),
                  fill=col)
    if rng.random() < 0.35:
        x = rng.choice([rng.uniform(0.02, 0.12), rng.uniform(0.88, 0.98)]) * w
        d.line((x, h * 0.15, x + rng.uniform(-0.05, 0.05) * w, h * 0.85),
               fill=_jitter(rng, (190, 190, 195), 20), width=max(2, w // 60))


def draw(label: str, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """One synthetic photo of ``label`` as an RGB image of ``size`` (width, height)."""
    if label not in DISHES:
        raise ValueError(f"unknown sample class {label!r}; known: {', '.join(CLASSES)}")
    w, h = size
    img = Image.fromarray(np.clip(_background(rng, w, h), 0, 255).astype(np.uint8), "RGB")
    _clutter(rng, img)

    dish_px = int(min(w, h) * rng.uniform(0.6, 0.95))
    s = dish_px * SUPERSAMPLE
    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    DISHES[label](rng, ImageDraw.Draw(layer), s)
    layer = layer.rotate(float(rng.uniform(0, 360)), Image.Resampling.BICUBIC)
    layer = layer.resize((dish_px, dish_px), Image.Resampling.LANCZOS)

    slack_x, slack_y = (w - dish_px) / 2, (h - dish_px) / 2
    x = int(w / 2 - dish_px / 2 + rng.uniform(-0.7, 0.7) * max(slack_x, dish_px * 0.05))
    y = int(h / 2 - dish_px / 2 + rng.uniform(-0.7, 0.7) * max(slack_y, dish_px * 0.05))
    alpha = layer.getchannel("A")
    shadow = alpha.filter(ImageFilter.GaussianBlur(dish_px / 30)).point(lambda a: a * 0.45)
    off = max(1, dish_px // 30)
    img.paste((20, 15, 10), (x + off, y + off), shadow)
    img.paste(layer, (x, y), alpha)
    return _camera(rng, img)


def _camera(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    """Exposure, contrast, saturation, colour cast, focus blur and sensor noise."""
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.25))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.7, 1.3))
    blur = rng.uniform(0, 1.2) * min(img.size) / 200
    if blur > 0.3:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.88, 1.12, 3)
    arr += rng.normal(0, rng.uniform(0, 9), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _train_size(rng: np.random.Generator) -> tuple[int, int]:
    short = int(rng.integers(TRAIN_SHORT_SIDE[0], TRAIN_SHORT_SIDE[1] + 1))
    long = int(short * rng.uniform(1.0, 1.5))
    return (long, short) if rng.random() < 0.6 else (short, long)


def _is_complete(root: Path, per_class: int) -> bool:
    return all(len(list((root / c).glob("*.jpg"))) == per_class for c in CLASSES) and \
        sorted(p.name for p in root.iterdir()) == sorted(CLASSES)


def generate(root: str | os.PathLike, examples_dir: str | os.PathLike = "examples",
             per_class: int = 120, seed: int = 0) -> str:
    """Write ``root/<class>/<NNNN>.jpg`` and ``examples_dir/<class>.jpg``; return a summary.

    The tree is built in a hidden temp dir next to ``root`` and renamed into place, so an
    interrupted run never leaves a half dataset behind. If ``root`` already holds a complete
    set (every class with ``per_class`` images) nothing is written and the summary says so;
    any other existing ``root`` is refused with ``FileExistsError`` rather than mixed into.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    root, examples = Path(root), Path(examples_dir)
    if root.exists():
        if root.is_dir() and _is_complete(root, per_class):
            return f"{root} already holds {per_class} images for each of {len(CLASSES)} " \
                   f"classes; left unchanged (delete it to regenerate)"
        raise FileExistsError(f"{root} exists but is not a complete sample set of "
                              f"{per_class} images per class {list(CLASSES)}; delete it or "
                              f"choose another directory")
    with staging_dir(root.parent, root.name) as tmp:
        for ci, label in enumerate(CLASSES):
            (tmp / label).mkdir()
            for i in range(per_class):
                rng = np.random.default_rng([seed, TRAIN_STREAM, ci, i])
                img = draw(label, rng, _train_size(rng))
                img.save(tmp / label / f"{i:04d}.jpg", format="JPEG",
                         quality=int(rng.integers(60, 96)))
        publish_dir(tmp, root)
    examples.mkdir(parents=True, exist_ok=True)
    for ci, label in enumerate(CLASSES):
        rng = np.random.default_rng([seed, EXAMPLE_STREAM, ci, 0])
        img = draw(label, rng, EXAMPLE_SIZE)
        atomic_write(examples / f"{label}.jpg",
                     lambda tmp, img=img: img.save(tmp, format="JPEG", quality=85))
    log.info("sample data: %d images in %s, %d examples in %s", per_class * len(CLASSES),
             root, len(CLASSES), examples)
    return (f"wrote {per_class * len(CLASSES)} synthetic images ({per_class} per class: "
            f"{', '.join(CLASSES)}) to {root} and {len(CLASSES)} held-out examples to "
            f"{examples} (seed {seed})")
