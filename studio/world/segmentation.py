"""Segmentation data: shape scenes with integer masks, and multi-task "surgical tool" scenes.

:func:`make_segmentation` draws 1-4 overlapping shapes of random colours on a textured
background; the mask holds the class index of the shape on top at each pixel (0 is
background, ``i`` is ``SEG_CLASSES[i]``), so the class is the shape, never the colour.
``domain="shifted"`` changes the look but not the labels (darker striped or blotchy
backgrounds, pastel object colours, lower contrast, sensor noise): train on "source",
adapt to "shifted". Layouts are drawn from their own stream, so the same seed gives the
same masks in both domains (paired domains).

:func:`make_multitask` draws instruments over a tissue-like background: each scene has an
image-level *activity* (which tool configuration is present, ``ACTIVITIES``) and a
per-pixel semantic mask of the tools (``TOOL_CLASSES``), for joint classification and
segmentation.

Everything is drawn from ``numpy.random.default_rng(seed)``: the same seed gives the same bytes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from studio.world import shapes

SEG_CLASSES: tuple[str, ...] = ("background", *shapes.SHAPES)
DOMAINS = ("source", "shifted")
# Mask classes of the multi-task scenes.
TOOL_CLASSES: tuple[str, ...] = ("background", "grasper", "scissors", "hook", "clipper")
# activity name -> the tools present (the image-level label is the index in this dict).
ACTIVITIES: dict[str, tuple[str, ...]] = {
    "idle": (),
    "grasping": ("grasper",),
    "cutting": ("scissors",),
    "cauterising": ("hook",),
    "dissecting": ("grasper", "scissors"),
    "clipping": ("grasper", "clipper"),
}
ACTIVITY_NAMES: tuple[str, ...] = tuple(ACTIVITIES)
# Shaft colour per tool (tips differ in shape too).
TOOL_COLOURS: dict[str, tuple[int, int, int]] = {
    "grasper": (80, 85, 90),
    "scissors": (205, 205, 210),
    "hook": (190, 150, 80),
    "clipper": (110, 150, 200),
}
PASTEL = np.array([[240, 170, 170], [170, 230, 170], [170, 190, 245], [240, 230, 150], [215, 170, 235]])


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 1) -> np.ndarray:
    """float32 [size, size, channels] in ~[-1, 1]: a random ``cells``-grid upsampled bilinearly."""
    grid = rng.uniform(-1.0, 1.0, (cells, cells, channels)).astype(np.float32)
    out = [
        np.asarray(Image.fromarray(grid[..., c]).resize((size, size), Image.Resampling.BILINEAR))
        for c in range(channels)
    ]
    return np.stack(out, -1)


def _segmentation_background(rng: np.random.Generator, size: int, domain: str) -> np.ndarray:
    if domain == "source":
        base = rng.uniform(170, 240, 3)
        return base + 18.0 * _smooth_noise(rng, size, 4, 3)
    base = rng.uniform(30, 110, 3)
    img = base + 35.0 * _smooth_noise(rng, size, 8, 3)
    if rng.random() < 0.5:
        img = np.where(shapes._pattern("striped", size)[..., None], img * 0.6, img)
    return img


def _object_colour(rng: np.random.Generator, domain: str) -> np.ndarray:
    if domain == "source":
        palette = np.array(list(shapes.COLOURS.values()), dtype=np.float32)
        return palette[rng.integers(len(palette))] + rng.normal(0, 10, 3)
    return PASTEL[rng.integers(len(PASTEL))].astype(np.float32) + rng.normal(0, 10, 3)


def _finish(img: np.ndarray, rng: np.random.Generator, domain: str) -> np.ndarray:
    if domain == "shifted":
        img = (img - 128.0) * 0.75 + 128.0 + rng.normal(0.0, 12.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_segmentation(n: int, seed: int, size: int = 64, domain: str = "source") -> dict[str, object]:
    """``n`` shape scenes with integer masks.

    Returns ``images`` uint8 [n, size, size, 3], ``masks`` uint8 [n, size, size] (index into
    ``class_names``), ``class_names`` (``SEG_CLASSES``) and ``domain``.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    # Layouts and looks come from separate streams: one seed gives the same masks in both domains.
    layout, look = np.random.default_rng((seed, 0)), np.random.default_rng((seed, 1))
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        img = _segmentation_background(look, size, domain)
        for _ in range(int(layout.integers(1, 5))):
            cls = int(layout.integers(1, len(SEG_CLASSES)))
            radius = float(layout.uniform(0.1, 0.2)) * size
            cx, cy = layout.uniform(radius, size - radius, 2)
            cover = shapes.shape_coverage(
                SEG_CLASSES[cls], cx, cy, radius, float(layout.uniform(-30, 30)), size
            )
            img = img * (1.0 - cover[..., None]) + _object_colour(look, domain) * cover[..., None]
            masks[i][cover >= 0.5] = cls
        images[i] = _finish(img, look, domain)
    return {"images": images, "masks": masks, "class_names": list(SEG_CLASSES), "domain": domain}


class MultitaskSet(NamedTuple):
    """Scenes with an image-level activity label and a per-pixel tool mask."""

    images: np.ndarray  # uint8 [n, H, W, 3]
    activities: np.ndarray  # int64 [n], index into ACTIVITY_NAMES
    masks: np.ndarray  # uint8 [n, H, W], index into class_names
    class_names: list[str]  # mask classes (TOOL_CLASSES)


def _tool_strokes(
    tool: str, entry: np.ndarray, tip: np.ndarray, width: float
) -> list[tuple[str, list, float]]:
    """Drawing commands (kind, points, width) of one instrument: shaft plus a tool-specific tip."""
    d = (tip - entry) / (np.linalg.norm(tip - entry) + 1e-6)
    p = np.array([-d[1], d[0]])
    jaw = 2.6 * width
    cmds: list[tuple[str, list, float]] = [("line", [entry, tip], width)]
    if tool == "grasper":
        cmds += [("line", [tip, tip + d * jaw + p * jaw * 0.55], width * 0.6)]
        cmds += [("line", [tip, tip + d * jaw - p * jaw * 0.55], width * 0.6)]
    elif tool == "scissors":
        cmds += [("line", [tip - p * jaw * 0.4, tip + d * jaw * 1.1 + p * jaw * 0.4], width * 0.5)]
        cmds += [("line", [tip + p * jaw * 0.4, tip + d * jaw * 1.1 - p * jaw * 0.4], width * 0.5)]
    elif tool == "hook":
        bend = tip + d * jaw * 0.8
        cmds += [("line", [tip, bend, bend + p * jaw * 0.6], width * 0.55)]
    elif tool == "clipper":
        h = width * 1.1
        head = [tip + p * h, tip + d * jaw + p * h, tip + d * jaw - p * h, tip - p * h]
        cmds += [("polygon", head, 0.0)]
    return cmds


def _tool_coverage(cmds: list[tuple[str, list, float]], size: int) -> np.ndarray:
    s = shapes.SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    for kind, pts, width in cmds:
        xy = [(float(x * s), float(y * s)) for x, y in pts]
        if kind == "line":
            draw.line(xy, fill=255, width=max(1, int(round(width * s))), joint="curve")
        else:
            draw.polygon(xy, fill=255)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _tissue(rng: np.random.Generator, size: int, domain: str) -> np.ndarray:
    if domain == "source":
        base = np.array([185.0, 85.0, 80.0]) + rng.normal(0, 8, 3)
    else:
        base = np.array([150.0, 110.0, 70.0]) + rng.normal(0, 8, 3)
    img = base + 30.0 * _smooth_noise(rng, size, 6, 1) + 10.0 * _smooth_noise(rng, size, 16, 3)
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size - 0.5
    vignette = 1.0 - 0.9 * (xx * xx + yy * yy)
    return img * vignette[..., None]


def make_multitask(n: int, seed: int, size: int = 64, domain: str = "source") -> MultitaskSet:
    """``n`` instrument scenes: image, activity index (``ACTIVITY_NAMES``) and tool mask (``TOOL_CLASSES``).

    Activities are balanced in expectation; each present tool enters from its own image edge.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    activities = rng.integers(0, len(ACTIVITY_NAMES), n).astype(np.int64)
    for i in range(n):
        img = _tissue(rng, size, domain)
        tools = ACTIVITIES[ACTIVITY_NAMES[activities[i]]]
        edges = rng.permutation(4)
        for tool, edge in zip(tools, edges):
            t = float(rng.uniform(0.2, 0.8)) * size
            entry = np.array([[t, -2.0], [size + 2.0, t], [t, size + 2.0], [-2.0, t]][edge])
            tip = rng.uniform(0.3, 0.7, 2) * size
            width = float(rng.uniform(0.07, 0.09)) * size
            cover = _tool_coverage(_tool_strokes(tool, entry, tip, width), size)[..., None]
            colour = np.array(TOOL_COLOURS[tool], dtype=np.float32) * rng.uniform(0.9, 1.1)
            img = img * (1.0 - cover) + colour * cover
            masks[i][cover[..., 0] >= 0.5] = TOOL_CLASSES.index(tool)
        images[i] = _finish(img, rng, domain)
    return MultitaskSet(images, activities, masks, list(TOOL_CLASSES))
