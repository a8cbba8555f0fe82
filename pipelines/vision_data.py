"""Data for the vision pipelines: scikit-learn digits and tiny-world shape tasks.

Every loader returns a ``VisionData`` of images in [0, 1] at ``size`` x ``size`` with
class labels and/or integer masks, deterministic from its seed.  The shape tasks use the
tiny world's generators (``studio.world``) when they are installed; otherwise a small
renderer here draws the same kind of scenes (documented per loader), so the pipelines
and their tests run on a bare checkout.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F


@dataclass
class VisionData:
    images: torch.Tensor  # (N, 3, S, S) float in [0, 1]
    labels: torch.Tensor | None  # (N,) long class labels
    masks: torch.Tensor | None  # (N, S, S) long per-pixel classes
    num_classes: int  # number of image-level classes (0 when there are none)
    num_mask_classes: int  # number of mask classes incl. background (0 when there are none)
    source: str  # where the data came from, for result tables

    def __len__(self) -> int:
        return self.images.shape[0]

    def take(self, index: torch.Tensor | slice) -> VisionData:
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return VisionData(
            self.images[index],
            pick(self.labels),
            pick(self.masks),
            self.num_classes,
            self.num_mask_classes,
            self.source,
        )

    def split(self, n_test: int, seed: int = 0) -> tuple[VisionData, VisionData]:
        """(train, test) by a seeded permutation."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.take(perm[n_test:]), self.take(perm[:n_test])

    def tensors(self, with_labels: bool = True, with_masks: bool = True) -> list[torch.Tensor]:
        out = [self.images]
        if with_labels and self.labels is not None:
            out.append(self.labels)
        if with_masks and self.masks is not None:
            out.append(self.masks)
        return out


# --------------------------------------------------------------------------- digits


def digits(size: int = 32, stroke_threshold: float = 0.3) -> VisionData:
    """scikit-learn's 1797 8x8 digits, upsampled to ``size``: label = digit, mask = stroke pixels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    img = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    masks = (img[:, 0] > stroke_threshold).long()
    return VisionData(img.repeat(1, 3, 1, 1), torch.tensor(d.target), masks, 10, 2, "sklearn digits")


# --------------------------------------------------------------------------- shapes

SHAPES = ("circle", "square", "triangle", "cross", "ring")


def _shape_mask(kind: int, cx: float, cy: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if kind == 0:
        return dx**2 + dy**2 <= r**2
    if kind == 1:
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    if kind == 2:
        return (dy <= 0.7 * r) & (dy + r >= 2 * np.abs(dx))
    if kind == 3:
        arm, thick = r, r / 3
        return ((np.abs(dx) <= thick) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= thick) & (np.abs(dx) <= arm))
    d2 = dx**2 + dy**2
    return (d2 <= r**2) & (d2 >= (0.5 * r) ** 2)


def _background(rng: np.random.Generator, size: int, domain: str) -> np.ndarray:
    """A (size, size, 3) background: flat light colours (source) or dark striped noisy ones (target)."""
    yy, xx = np.mgrid[:size, :size]
    if domain == "source":
        return np.broadcast_to(rng.uniform(0.6, 0.95, 3), (size, size, 3)).copy()
    base = rng.uniform(0.05, 0.3, 3)
    period = rng.uniform(3, 7)
    angle = rng.uniform(0, np.pi)
    stripes = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    return base + 0.15 * stripes[..., None] * rng.uniform(0.5, 1.0, 3)


def _finish(rng: np.random.Generator, img: np.ndarray, domain: str) -> np.ndarray:
    if domain == "target":  # low light, colour cast and sensor noise
        img = 0.6 * img * rng.uniform(0.6, 1.0, 3) + rng.normal(0, 0.06, img.shape)
    else:
        img = img + rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0, 1)


def render_scene(
    rng: np.random.Generator, size: int, kinds: list[int], domain: str = "source"
) -> tuple[np.ndarray, np.ndarray]:
    """Draw shapes of ``kinds`` (non-overlapping where possible): (image HxWx3, mask HxW of kind+1)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    img = _background(rng, size, domain)
    mask = np.zeros((size, size), np.int64)
    for kind in kinds:
        for _ in range(20):
            r = rng.uniform(0.16, 0.28) * size / max(1, len(kinds)) ** 0.5
            cx, cy = rng.uniform(r, size - r, 2)
            m = _shape_mask(kind, cx, cy, r, yy, xx)
            if not (m & (mask > 0)).any():
                break
        colour = rng.uniform(0.0, 1.0, 3) if domain == "source" else rng.uniform(0.45, 1.0, 3)
        colour[rng.integers(3)] *= 0.25  # saturated colours keep some contrast to any background
        img[m] = colour
        mask[m] = kind + 1
    return _finish(rng, img, domain), mask


def _world(module: str, *names: str):
    """A tiny-world generator module having ``names``, or None on a checkout without it."""
    try:
        mod = importlib.import_module(f"studio.world.{module}")
    except ImportError:
        return None
    return mod if all(hasattr(mod, n) for n in names) else None


def _from_uint8(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def _pack(images: list[np.ndarray], masks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.tensor(np.stack(images), dtype=torch.float32).permute(0, 3, 1, 2).contiguous()
    return img, torch.tensor(np.stack(masks))


def shapes_classification(n: int = 1500, seed: int = 0, size: int = 32) -> VisionData:
    """Captioned world shapes; label = the shape (5 kinds)."""
    world = _world("shapes", "make_captioned", "SHAPES")
    if world is not None:
        data = world.make_captioned(n, seed, size)
        labels = torch.tensor([world.SHAPES.index(a.shape) for a in data.attrs])
        return VisionData(_from_uint8(data.images), labels, None, len(world.SHAPES), 0, "world shapes")
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(SHAPES), size=n)
    scenes = [render_scene(rng, size, [int(k)]) for k in labels]
    img, _ = _pack([s[0] for s in scenes], [s[1] for s in scenes])
    return VisionData(img, torch.tensor(labels), None, len(SHAPES), 0, "shapes (fallback renderer)")


def segmentation_domain(n: int, seed: int = 0, size: int = 32, domain: str = "source") -> VisionData:
    """Shape scenes with a per-pixel shape-class mask; ``domain`` "source" or "target" (shifted).

    World data: ``studio.world.segmentation.make_segmentation`` (target = its "shifted"
    domain: darker textured backgrounds, pastel objects, lower contrast, noise).  Fallback:
    the renderer here (target = dark striped backgrounds, colour cast, noise).
    """
    if domain not in ("source", "target"):
        raise ValueError(f"domain must be 'source' or 'target', got {domain!r}")
    world = _world("segmentation", "make_segmentation")
    if world is not None:
        d = world.make_segmentation(n, seed, size, "source" if domain == "source" else "shifted")
        masks = torch.from_numpy(d["masks"].astype(np.int64))
        return VisionData(
            _from_uint8(d["images"]), None, masks, 0, len(d["class_names"]), f"world segmentation ({domain})"
        )
    rng = np.random.default_rng(seed + (0 if domain == "source" else 10_000))
    kinds = [list(rng.integers(len(SHAPES), size=rng.integers(1, 3))) for _ in range(n)]
    scenes = [render_scene(rng, size, k, domain) for k in kinds]
    img, masks = _pack([s[0] for s in scenes], [s[1] for s in scenes])
    return VisionData(
        img, None, masks, 0, len(SHAPES) + 1, f"shapes segmentation ({domain}, fallback renderer)"
    )


# Activities of the fallback multi-task scenes: which "tools" (shape kinds) are present together.
ACTIVITIES = ((0,), (1,), (2,), (0, 1), (0, 2), (1, 2))


def multitask_scenes(n: int, seed: int = 0, size: int = 32) -> VisionData:
    """Scenes with an activity label and a tool mask (world: 6 activities, 5 mask classes)."""
    world = _world("segmentation", "make_multitask", "ACTIVITY_NAMES")
    if world is not None:
        d = world.make_multitask(n, seed, size)
        masks = torch.from_numpy(d.masks.astype(np.int64))
        labels = torch.from_numpy(d.activities)
        return VisionData(
            _from_uint8(d.images),
            labels,
            masks,
            len(world.ACTIVITY_NAMES),
            len(d.class_names),
            "world tool scenes",
        )
    rng = np.random.default_rng(seed + 20_000)
    labels = rng.integers(len(ACTIVITIES), size=n)
    scenes = [render_scene(rng, size, list(ACTIVITIES[int(a)])) for a in labels]
    img, masks = _pack([s[0] for s in scenes], [s[1] for s in scenes])
    return VisionData(img, torch.tensor(labels), masks, len(ACTIVITIES), 4, "tool scenes (fallback renderer)")


def load(name: str, n: int = 0, seed: int = 0, size: int = 32) -> VisionData:
    """Load a dataset by name: digits | shapes | seg-source | seg-target | scenes."""
    if name == "digits":
        return digits(size)
    if name == "shapes":
        return shapes_classification(n or 1500, seed, size)
    if name in ("seg-source", "seg-target"):
        return segmentation_domain(n or 1000, seed, size, name.split("-")[1])
    if name == "scenes":
        return multitask_scenes(n or 1500, seed, size)
    raise ValueError(f"unknown dataset {name!r}; use digits, shapes, seg-source, seg-target or scenes")
