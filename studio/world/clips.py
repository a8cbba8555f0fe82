"""Paired (source, styled) images and short clips made from stills by camera-motion augmentation.

A *style* is either one of ``shapes.STYLES`` (the same scene re-rendered in that style: the
source is its "flat" rendering) or an image-level transform in ``IMAGE_STYLES`` that works on
any RGB image, e.g. a packaged photo.

A clip is a still warped by a :class:`CameraMotion` (pan, zoom and a small rotation about the
image centre, growing linearly from frame 0, the still itself, to the last frame);
:func:`make_clip_pairs` applies the *same* motion to a source and its styled version, so that
a video style-transfer model sees aligned (source, styled) clips. Deterministic from the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from studio.world import shapes

IMAGE_STYLES: tuple[str, ...] = ("sepia", "inverted", "posterized", "halftone")
ALL_STYLES: tuple[str, ...] = tuple(s for s in shapes.STYLES if s != "flat") + IMAGE_STYLES


@dataclass(frozen=True)
class CameraMotion:
    """A camera move over one clip; every value is reached at the last frame."""

    pan_x: float = 0.0  # content shift to the right, fraction of the width
    pan_y: float = 0.0  # content shift downwards, fraction of the height
    zoom: float = 1.0  # content scale (>1 zooms in)
    rotation: float = 0.0  # content rotation, degrees counter-clockwise


def sample_motion(
    rng: np.random.Generator, max_pan: float = 0.15, max_zoom: float = 0.25, max_rot: float = 8.0
) -> CameraMotion:
    """A random mix of pan, zoom and small rotation."""
    pan_x, pan_y = rng.uniform(-max_pan, max_pan, 2)
    zoom = 1.0 + rng.uniform(0.0, max_zoom)
    rotation = rng.uniform(-max_rot, max_rot)
    return CameraMotion(
        round(float(pan_x), 4), round(float(pan_y), 4), round(float(zoom), 4), round(float(rotation), 3)
    )


def apply_image_style(image: np.ndarray, style: str) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [H, W, 3] in an ``IMAGE_STYLES`` style (per-pixel or fixed-pattern)."""
    x = image.astype(np.float32)
    if style == "sepia":
        m = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], dtype=np.float32)
        out = x @ m.T
    elif style == "inverted":
        out = 255.0 - x
    elif style == "posterized":
        out = np.floor(x / 64.0) * 85.0
    elif style == "halftone":
        h, w = image.shape[:2]
        period = max(4, h // 10)
        yy, xx = np.mgrid[0:h, 0:w]
        dist = np.hypot((xx % period) - period / 2 + 0.5, (yy % period) - period / 2 + 0.5) / (period / 2)
        # Dots in the pixel's colour on white paper, larger where the image is darker.
        ink = dist[..., None] < 0.55 + 0.75 * (1.0 - x.mean(-1, keepdims=True) / 255.0)
        out = np.where(ink, x, np.full_like(x, 245.0))
    else:
        raise ValueError(f"unknown image style {style!r}; known: {IMAGE_STYLES}")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_style_pairs(n: int, seed: int, style: str = "striped", size: int = 64) -> dict[str, object]:
    """``n`` (source, styled) pairs of captioned shape scenes.

    Returns ``source`` and ``styled`` uint8 [n, H, W, 3], ``captions`` (of the styled image) and
    ``attrs`` (the flat scene). For a ``shapes.STYLES`` style, the styled image is the scene
    re-rendered in that style; for an ``IMAGE_STYLES`` one, the transform of the source.
    """
    if style not in ALL_STYLES:
        raise ValueError(f"unknown style {style!r}; known: {ALL_STYLES}")
    base = shapes.make_captioned(n, seed, size=size, styles=["flat"])
    if style in IMAGE_STYLES:
        styled = np.stack([apply_image_style(img, style) for img in base.images]) if n else base.images.copy()
        article = "an" if style[0] in "aeiou" else "a"
        captions = [f"{article} {style} picture of {c}" for c in base.captions]
    else:
        restyled = [replace(a, style=style) for a in base.attrs]
        styled = np.stack([shapes.render(a, size) for a in restyled]) if n else base.images.copy()
        captions = [shapes.caption(a) for a in restyled]
    return {
        "source": base.images,
        "styled": styled,
        "captions": captions,
        "attrs": base.attrs,
        "style": style,
    }


def motion_grid(
    motion: CameraMotion, n_frames: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Source pixel coordinates (x, y), each float32 [n_frames, H, W], that each frame samples."""
    t = (
        np.linspace(0.0, 1.0, n_frames, dtype=np.float32)[:, None, None]
        if n_frames > 1
        else np.zeros((1, 1, 1))
    )
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    scale = 1.0 + (motion.zoom - 1.0) * t
    angle = np.deg2rad(motion.rotation) * t
    # Frame pixel p shows source point c + R(-angle) (p - c - pan) / scale (y points down).
    px = xx - cx - motion.pan_x * width * t
    py = yy - cy - motion.pan_y * height * t
    cos, sin = np.cos(angle), np.sin(angle)
    sx = cx + (cos * px - sin * py) / scale
    sy = cy + (sin * px + cos * py) / scale
    return sx.astype(np.float32), sy.astype(np.float32)


def _bilinear(image: np.ndarray, sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """Sample float [H, W, C] at float coordinates (edge pixels repeat outside)."""
    h, w = image.shape[:2]
    sx, sy = np.clip(sx, 0, w - 1), np.clip(sy, 0, h - 1)
    x0, y0 = (
        np.minimum(np.floor(sx).astype(np.int64), w - 2),
        np.minimum(np.floor(sy).astype(np.int64), h - 2),
    )
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    top = image[y0, x0] * (1 - fx) + image[y0, x0 + 1] * fx
    bottom = image[y0 + 1, x0] * (1 - fx) + image[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def make_clip(image: np.ndarray, motion: CameraMotion, n_frames: int = 8) -> np.ndarray:
    """uint8 [H, W, C] still -> uint8 [n_frames, H, W, C] clip (frame 0 is the still)."""
    sx, sy = motion_grid(motion, n_frames, image.shape[0], image.shape[1])
    frames = _bilinear(image.astype(np.float32), sx, sy)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def make_clip_pairs(
    n: int, seed: int, style: str = "striped", n_frames: int = 8, size: int = 64
) -> dict[str, object]:
    """``n`` aligned (source, styled) clips: one random motion per pair, applied to both.

    Returns ``source`` and ``styled`` uint8 [n, n_frames, H, W, 3], ``motions`` (one
    :class:`CameraMotion` per pair), ``captions`` and ``style``.
    """
    pairs = make_style_pairs(n, seed, style=style, size=size)
    rng = np.random.default_rng((seed, 1))
    motions = [sample_motion(rng) for _ in range(n)]
    shape = (n, n_frames, size, size, 3)
    source, styled = np.empty(shape, np.uint8), np.empty(shape, np.uint8)
    for i, motion in enumerate(motions):
        source[i] = make_clip(pairs["source"][i], motion, n_frames)
        styled[i] = make_clip(pairs["styled"][i], motion, n_frames)
    return {
        "source": source,
        "styled": styled,
        "motions": motions,
        "captions": pairs["captions"],
        "style": style,
    }
