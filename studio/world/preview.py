"""A labelled PNG grid of samples from every world generator (docs/world_samples.png)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from studio.world import clips, multiview, packaged, segmentation, shapes

LABEL_WIDTH = 92  # pixels of row-label column


def _row(images: list[np.ndarray], size: int) -> np.ndarray:
    tiles = [np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.NEAREST)) for im in images]
    return np.concatenate(tiles, 1)


def _mask_rgb(mask: np.ndarray, n_classes: int) -> np.ndarray:
    palette = np.array(
        [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48]]
    )
    return palette[np.asarray(mask) % len(palette)].astype(np.uint8) if n_classes else mask


def sample_grid(seed: int = 0, columns: int = 8, tile: int = 64) -> np.ndarray:
    """uint8 [rows * tile, LABEL_WIDTH + columns * tile, 3]: one row per generator, labelled."""
    rows: list[tuple[str, list[np.ndarray]]] = []
    rows.append(("captioned", list(shapes.make_captioned(columns, seed).images)))
    seg = segmentation.make_segmentation(columns // 2, seed)
    shifted = segmentation.make_segmentation(columns // 2, seed, domain="shifted")
    rows.append(("segmentation", list(seg["images"]) + list(shifted["images"])))
    rows.append(("  masks", [_mask_rgb(m, 6) for m in list(seg["masks"]) + list(shifted["masks"])]))
    multi = segmentation.make_multitask(columns, seed + 1)
    rows.append(("multi-task", list(multi.images)))
    rows.append(("  masks", [_mask_rgb(m, 5) for m in multi.masks]))
    pairs = multiview.make_pairs(columns // 2, seed, size=64)
    rows.append(("view pairs", [im for pair in zip(pairs["img1"], pairs["img2"]) for im in pair]))
    depth = [pairs["depth1"], pairs["depth2"]]
    scale = max(d.max() for d in depth)
    grey = [np.repeat((255 * (1 - d / scale) * (d > 0)).astype(np.uint8)[..., None], 3, -1) for d in depth]
    rows.append(("  depth", [im for pair in zip(grey[0], grey[1]) for im in pair]))
    low = multiview.make_pairs(columns // 2, seed, size=64, condition="low_light")
    rows.append(("  low light", [im for pair in zip(low["img1"], low["img2"]) for im in pair]))
    clip = clips.make_clip_pairs(1, seed, style="halftone", n_frames=columns // 2)
    rows.append(("clip pair", list(clip["source"][0]) + list(clip["styled"][0])))
    photos = list(packaged.photo_crops(columns // 2, seed))
    digit_images, _, digit_masks = packaged.digits_multitask(size=32)
    photos += [digit_images[i] for i in range(columns // 4)] + [
        _mask_rgb(digit_masks[i], 2) for i in range(columns // 4)
    ]
    rows.append(("packaged", photos))
    body = np.concatenate([_row(images, tile) for _, images in rows], 0)
    canvas = Image.new("RGB", (LABEL_WIDTH + body.shape[1], body.shape[0]), (255, 255, 255))
    canvas.paste(Image.fromarray(body), (LABEL_WIDTH, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (label, _) in enumerate(rows):
        draw.text((4, i * tile + tile // 2 - 6), label, fill=(0, 0, 0))
    return np.asarray(canvas)


def save_grid(path: str, seed: int = 0) -> None:
    """Write :func:`sample_grid` as a PNG."""
    Image.fromarray(sample_grid(seed)).save(path, optimize=True)
