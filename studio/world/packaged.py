"""Real data that ships inside installed packages (no download, ever).

- scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), upsampled, with a
  stroke mask for joint classification + segmentation (:func:`digits_multitask`);
- scikit-learn's two sample photos (``china``, ``flower``);
- the scikit-image sample images bundled in its wheel (``SKIMAGE_IMAGES``; the others
  need pooch and a download, so they are left out), including a real stereo pair with
  disparity (:func:`stereo_motorcycle`);
- :func:`photo_crops`: deterministic random square crops of all those photos.

Every image comes back as uint8 RGB [H, W, 3] (grey images repeated, alpha dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image

# scikit-image sample images whose files are inside the scikit-image package.
SKIMAGE_IMAGES: tuple[str, ...] = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "checkerboard",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
SKLEARN_IMAGES: tuple[str, ...] = ("china", "flower")
# Photographs of natural scenes (for clips and style pairs); the rest are textures or graphics.
PHOTOS: tuple[str, ...] = (
    "china",
    "flower",
    "astronaut",
    "cat",
    "coffee",
    "rocket",
    "camera",
    "coins",
    "moon",
)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Any 2-D/3-D image (bool, grey, RGB, RGBA) -> uint8 [H, W, 3]."""
    x = np.asarray(image)
    if x.dtype == bool:
        x = x.astype(np.uint8) * 255
    elif x.dtype != np.uint8:
        x = np.clip(np.rint(x * (255.0 if x.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, -1)
    return np.ascontiguousarray(x[..., :3])


@lru_cache(maxsize=32)
def _load(name: str) -> np.ndarray:
    if name in SKLEARN_IMAGES:
        from sklearn.datasets import load_sample_image

        return to_rgb(load_sample_image(f"{name}.jpg"))
    if name in SKIMAGE_IMAGES:
        import skimage.data

        return to_rgb(getattr(skimage.data, name)())
    raise KeyError(f"{name!r} is not a bundled image; known: {SKLEARN_IMAGES + SKIMAGE_IMAGES}")


def load_image(name: str) -> np.ndarray:
    """One bundled image (``SKLEARN_IMAGES`` or ``SKIMAGE_IMAGES``) as uint8 [H, W, 3] (a copy)."""
    return _load(name).copy()


def sample_photos() -> dict[str, np.ndarray]:
    """scikit-learn's sample photos: ``{"china": ..., "flower": ...}`` (427 x 640 RGB)."""
    return {name: load_image(name) for name in SKLEARN_IMAGES}


def skimage_images(names: Sequence[str] = SKIMAGE_IMAGES) -> dict[str, np.ndarray]:
    """scikit-image's bundled sample images by name."""
    return {name: load_image(name) for name in names}


def stereo_motorcycle() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A real rectified stereo pair: left, right uint8 [500, 741, 3] and float32 disparity (left view)."""
    import skimage.data

    left, right, disparity = skimage.data.stereo_motorcycle()
    return to_rgb(left), to_rgb(right), disparity.astype(np.float32)


def resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [size, size, C] (PIL, area-averaging when shrinking)."""
    hw = (size, size) if isinstance(size, int) else size
    img = Image.fromarray(image)
    shrinking = hw[0] < image.shape[0]
    return np.asarray(
        img.resize((hw[1], hw[0]), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)
    )


def photo_crops(
    n: int, seed: int, size: int = 64, names: Sequence[str] = PHOTOS, min_frac: float = 0.3
) -> np.ndarray:
    """``n`` random square crops (side ``min_frac``..1 of the shorter edge) resized to ``size``."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        img = _load(names[int(rng.integers(len(names)))])
        h, w = img.shape[:2]
        side = int(rng.uniform(min_frac, 1.0) * min(h, w))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out[i] = resize(img[y : y + side, x : x + side], size)
    return out


def digits(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 [1797, size, size, 3] (white strokes on black, bilinear) and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    grey = data.images.astype(np.float32) / 16.0
    big = np.stack(
        [np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BILINEAR)) for g in grey]
    )
    images = np.clip(np.rint(big * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(images[..., None], 3, -1), data.target.astype(np.int64)


def digits_multitask(size: int = 32, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Digits for classification + segmentation: images uint8 [N, size, size, 3], labels int64 [N],
    masks uint8 [N, size, size] (1 on the stroke: upsampled intensity >= ``threshold``, else 0)."""
    images, labels = digits(size)
    masks = (images[..., 0] >= threshold * 255).astype(np.uint8)
    return images, labels, masks
