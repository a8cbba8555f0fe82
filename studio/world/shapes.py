"""Captioned shape images: one coloured shape on a (styled) background, with its caption.

Every image is a pure function of its :class:`SceneAttrs` (the noise of the "noisy" and
"dark" styles is seeded by ``attrs.seed``), and :func:`make_captioned` draws the attributes
from ``numpy.random.default_rng(seed)``: the same seed gives the same bytes.

>>> data = make_captioned(4, seed=0)
>>> data.images.shape, data.captions[0]  # doctest: +SKIP
((4, 64, 64, 3), 'a large purple star on a dotted grey background')

Shapes are drawn with PIL at twice the resolution and box-filtered down (anti-aliased
edges); backgrounds and styles are numpy array operations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
}
SIZES: tuple[str, ...] = ("small", "medium", "large")
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "black": (25, 25, 25),
    "grey": (125, 125, 125),
    "blue": (120, 165, 225),
    "green": (115, 170, 115),
}
# Styles change the background ("striped", "dotted"), the shape ("outlined") or the whole
# image ("pixelated", "noisy", "dark": low light, hue kept).
STYLES: tuple[str, ...] = ("flat", "striped", "dotted", "outlined", "pixelated", "noisy", "dark")

# Shape "radius" as a fraction of the canvas: small is ~18 px across at 64x64, large ~35 px.
SIZE_RADIUS: dict[str, float] = {"small": 0.14, "medium": 0.2, "large": 0.27}
MAX_ROTATION = 20.0  # degrees either way; small enough that a square never looks like a diamond
SUPERSAMPLE = 2  # shapes are drawn at this multiple of the output size, then box-filtered


@dataclass(frozen=True)
class SceneAttrs:
    """Everything that determines one captioned image."""

    shape: str  # one of SHAPES
    colour: str  # a key of COLOURS (the shape's colour)
    size: str  # one of SIZES
    x: float  # shape centre, fraction of the width (0 left .. 1 right)
    y: float  # shape centre, fraction of the height (0 top .. 1 bottom)
    background: str  # a key of BACKGROUND_COLOURS
    style: str  # one of STYLES
    rotation: float = 0.0  # degrees, counter-clockwise
    seed: int = 0  # seeds the pixel noise of the "noisy" and "dark" styles


def sample_attrs(
    rng: np.random.Generator,
    *,
    styles: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    colours: Sequence[str] | None = None,
) -> SceneAttrs:
    """Draw random attributes; the background never has the shape's colour name."""
    shape = _pick(rng, shapes or SHAPES)
    colour = _pick(rng, colours or tuple(COLOURS))
    size = _pick(rng, SIZES)
    backgrounds = [b for b in BACKGROUND_COLOURS if b != colour]
    background = _pick(rng, backgrounds)
    style = _pick(rng, styles or STYLES)
    margin = SIZE_RADIUS[size] * 1.15 + 0.02
    x, y = (float(v) for v in rng.uniform(margin, 1.0 - margin, size=2))
    rotation = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    seed = int(rng.integers(0, 2**31 - 1))
    return SceneAttrs(
        shape, colour, size, round(x, 4), round(y, 4), background, style, round(rotation, 2), seed
    )


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return str(options[int(rng.integers(len(options)))])


def shape_polygon(shape: str, radius: float, rotation: float = 0.0) -> np.ndarray | None:
    """Vertices [K, 2] (x, y in pixels, centred on 0) of a shape; None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.8 * radius
        pts = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    elif shape == "triangle":
        # Equilateral, pointing up; centred on its centroid.
        ang = np.deg2rad([-90.0, 30.0, 150.0])
        pts = 1.15 * radius * np.stack([np.cos(ang), np.sin(ang)], 1) + [0.0, 0.15 * radius]
    elif shape == "star":
        ang = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        rad = 1.15 * radius * np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
    elif shape == "cross":
        a, w = radius, 0.34 * radius
        pts = np.array(
            [
                [-w, -a],
                [w, -a],
                [w, -w],
                [a, -w],
                [a, w],
                [w, w],
                [w, a],
                [-w, a],
                [-w, w],
                [-a, w],
                [-a, -w],
                [-w, -w],
            ]
        )
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    t = np.deg2rad(rotation)
    # Image y points down, so a counter-clockwise turn on screen is clockwise in array maths.
    rot = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    return pts @ rot.T


def shape_coverage(
    shape: str, cx: float, cy: float, radius: float, rotation: float, size: int, outline: float = 0.0
) -> np.ndarray:
    """Anti-aliased coverage float32 [size, size] in 0..1 of a shape centred at pixel (cx, cy).

    ``outline`` > 0 keeps only a stroke of that many pixels inside the silhouette.
    """
    s = SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    poly = shape_polygon(shape, radius * s, rotation)
    # Pixel centres sit at integer + 0.5 in PIL's continuous coordinates.
    ox, oy = (cx + 0.5) * s, (cy + 0.5) * s
    if poly is None:
        r = radius * s
        draw.ellipse([ox - r, oy - r, ox + r, oy + r], fill=255)
    else:
        draw.polygon([(float(px + ox), float(py + oy)) for px, py in poly], fill=255)
    if outline > 0:
        big = np.asarray(canvas, dtype=np.uint8)
        canvas = Image.fromarray(big - _erode(big, int(round(outline * s))))
    # Box filter down to the output size (anti-aliasing).
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) * (1.0 / 255.0)


def _erode(img: np.ndarray, r: int) -> np.ndarray:
    """Min over a (2r+1)-square window (separable; numpy because PIL's rank filter is O(k^2))."""
    from numpy.lib.stride_tricks import sliding_window_view

    padded = np.pad(img, r, mode="constant")
    rows = sliding_window_view(padded, 2 * r + 1, axis=0).min(-1)
    return sliding_window_view(rows, 2 * r + 1, axis=1).min(-1)


def _coverage(attrs: SceneAttrs, size: int) -> np.ndarray:
    outline = max(2.0, size / 24) if attrs.style == "outlined" else 0.0
    return shape_coverage(
        attrs.shape,
        attrs.x * size,
        attrs.y * size,
        SIZE_RADIUS[attrs.size] * size,
        attrs.rotation,
        size,
        outline,
    )


def pattern_colour(rgb: Sequence[int]) -> np.ndarray:
    """The second colour of a striped/dotted background: a lighter or darker tint of ``rgb``."""
    c = np.asarray(rgb, dtype=np.float32)
    lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    return c * 0.62 if lum > 110 else c * 0.55 + 255 * 0.45


@lru_cache(maxsize=64)
def _pattern(style: str, size: int) -> np.ndarray | None:
    """bool [size, size]: where a striped/dotted background takes its second colour."""
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(4, size // 8)
    if style == "striped":
        return ((xx + yy) // (period // 2)) % 2 == 1
    if style == "dotted":
        dx, dy = (xx % period) - period / 2 + 0.5, (yy % period) - period / 2 + 0.5
        return dx * dx + dy * dy <= (period / 4) ** 2
    return None


def background(name_or_rgb: str | Sequence[int], style: str, size: int) -> np.ndarray:
    """float32 [size, size, 3] background of a colour (name or RGB) in a style's pattern."""
    rgb = BACKGROUND_COLOURS[name_or_rgb] if isinstance(name_or_rgb, str) else name_or_rgb
    base = np.asarray(rgb, dtype=np.float32)
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = base
    on = _pattern(style, size)
    if on is not None:
        img[on] = pattern_colour(base)
    return img


def apply_style_filter(img: np.ndarray, style: str, seed: int) -> np.ndarray:
    """Whole-image part of a style on float32 [H, W, 3] (pixelated, noisy, dark); others unchanged."""
    size = img.shape[0]
    if style == "pixelated":
        b = max(2, size // 16)
        h, w = img.shape[0] // b * b, img.shape[1] // b * b
        blocks = img[:h, :w].reshape(h // b, b, w // b, b, 3).mean(axis=(1, 3))
        out = img.copy()
        out[:h, :w] = blocks.repeat(b, 0).repeat(b, 1)
        return out
    if style == "noisy":
        return img + np.random.default_rng(seed).normal(0.0, 38.0, img.shape).astype(np.float32)
    if style == "dark":
        noise = np.random.default_rng(seed).normal(0.0, 3.0, img.shape).astype(np.float32)
        return img * 0.35 + noise
    return img


def render(attrs: SceneAttrs, size: int = 64) -> np.ndarray:
    """The image of ``attrs``: uint8 [size, size, 3]."""
    img = background(attrs.background, attrs.style, size)
    alpha = _coverage(attrs, size)[..., None]
    img = img * (1.0 - alpha) + np.asarray(COLOURS[attrs.colour], dtype=np.float32) * alpha
    img = apply_style_filter(img, attrs.style, attrs.seed)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_mask(attrs: SceneAttrs, size: int = 64) -> np.ndarray:
    """bool [size, size]: the pixels painted in the shape's colour (the stroke when "outlined")."""
    return _coverage(attrs, size) >= 0.5


def caption(attrs: SceneAttrs) -> str:
    """A natural caption naming size, colour, shape, background and style."""
    thing = f"{attrs.size} {attrs.colour} {attrs.shape}"
    bg = f"{attrs.background} background"
    style = attrs.style
    if style in ("striped", "dotted"):
        return f"a {thing} on a {style} {bg}"
    if style == "outlined":
        return f"a {thing} outline on a {bg}"
    if style in ("pixelated", "noisy", "dark"):
        return f"a {style} image of a {thing} on a {bg}"
    return f"a {thing} on a {bg}"


@dataclass
class CaptionedSet:
    """Rendered captioned images with their attributes."""

    images: np.ndarray  # uint8 [n, H, W, 3]
    captions: list[str]  # caption(attrs[i]) for each image
    attrs: list[SceneAttrs]  # the attributes each image was rendered from

    def __len__(self) -> int:
        return len(self.captions)


def make_captioned(n: int, seed: int, size: int = 64, **sample_kwargs: Sequence[str] | None) -> CaptionedSet:
    """``n`` captioned images drawn from ``default_rng(seed)``; kwargs go to :func:`sample_attrs`."""
    rng = np.random.default_rng(seed)
    attrs = [sample_attrs(rng, **sample_kwargs) for _ in range(n)]
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, a in enumerate(attrs):
        images[i] = render(a, size)
    return CaptionedSet(images, [caption(a) for a in attrs], attrs)
