"""Shared pieces of the vision pipelines: backbones, heads, data and metrics.

Backbones come from the tiny world (``studio.world.assets``) when its weights are
installed, otherwise from timm configs with random weights (tests, and a clearly
labelled fallback in the reproductions).  Data comes from ``pipelines.vision_data``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# timm configs of the random-init fallbacks (same families as the world's backbones).
FALLBACK_BACKBONES = {
    "vit": dict(name="vit_tiny_patch16_224", embed_dim=64, depth=4, num_heads=4, patch_size=4),
    "dinov2": dict(name="vit_small_patch14_dinov2", embed_dim=64, depth=4, num_heads=4, patch_size=4),
}
TINY_BACKBONE = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8)


def build_backbone(kind: str = "vit", source: str = "auto", img_size: int = 32, tiny: bool = False) -> tuple:
    """(timm backbone without classifier, description).

    ``source``: "world" (the tiny world's pretrained weights, error if absent), "random"
    (timm config, random init), "auto" (world if installed, else random).  ``tiny``
    shrinks the random fallback for fast tests.
    """
    if kind not in FALLBACK_BACKBONES:
        raise ValueError(f"unknown backbone {kind!r}; use one of {', '.join(FALLBACK_BACKBONES)}")
    if source not in ("auto", "world", "random"):
        raise ValueError(f"backbone source must be auto, world or random, got {source!r}")
    if source != "random" and not tiny:
        try:
            from studio.world import assets

            loader = assets.load_vit if kind == "vit" else assets.load_dinov2
            model = loader()
            model.reset_classifier(0)
            return model, f"world:{kind} (pretrained on the tiny world)"
        except (ImportError, AttributeError, FileNotFoundError, OSError) as err:
            if source == "world":
                raise RuntimeError(f"the tiny world's {kind} backbone is not available: {err}") from err
    import timm

    cfg = dict(FALLBACK_BACKBONES[kind])
    if tiny:
        cfg.update(TINY_BACKBONE)
    name = cfg.pop("name")
    extra = {"init_values": 1e-5} if kind == "dinov2" else {}
    model = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0, **cfg, **extra)
    return model, f"random-init timm {name} ({cfg['embed_dim']}d x {cfg['depth']})"


def normalize_for(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Apply the backbone's pretrained mean/std to images in [0, 1] (identity if it has none)."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return images
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def patch_grid(backbone: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Patch tokens of ``forward_features`` as a (B, D, h, w) map."""
    h, w = backbone.patch_embed.grid_size
    patches = tokens[:, backbone.num_prefix_tokens :]
    return patches.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def pooled(backbone: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The backbone's own pooled pre-logits features (cls token or mean, after fc_norm)."""
    return backbone.forward_head(tokens, pre_logits=True)


class SegDecoder(nn.Module):
    """Light decoder: 3x3 conv on the patch grid, then two upsample+conv stages to the image size."""

    def __init__(self, dim: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(dim, width, 3, padding=1), nn.GroupNorm(4, width), nn.GELU())
        self.up = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(4, width),
            nn.GELU(),
            nn.Conv2d(width, num_classes, 1),
        )

    def forward(self, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h = self.stem(grid)
        h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
        return F.interpolate(self.up(h), size=size, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- metrics


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def dice(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> float:
    """Mean per-image Dice of binary foreground masks (B, H, W); two empty masks score 1."""
    p, t = pred.flatten(1).float(), target.flatten(1).float()
    inter = (p * t).sum(1)
    total = p.sum(1) + t.sum(1)
    scores = torch.where(total > 0, 2 * inter / (total + eps), torch.ones_like(total))
    return scores.mean().item()


def _boundary(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean per-image 95th-percentile symmetric Hausdorff distance (pixels) of binary masks.

    Per image: the larger of the two directed 95th percentiles of boundary-to-boundary
    distances (as MONAI computes it); both empty: 0; one empty: the image diagonal.
    """
    from scipy import ndimage

    out = []
    for p, t in zip(pred.bool().cpu().numpy(), target.bool().cpu().numpy()):
        if not p.any() and not t.any():
            out.append(0.0)
            continue
        if not p.any() or not t.any():
            out.append(float(np.hypot(*p.shape)))
            continue
        bp, bt = _boundary(p), _boundary(t)
        to_t = ndimage.distance_transform_edt(~bt)[bp]
        to_p = ndimage.distance_transform_edt(~bp)[bt]
        out.append(max(np.percentile(to_t, 95), np.percentile(to_p, 95)))
    return float(np.mean(out))


@dataclass
class ConfusionMeter:
    """Accumulates a confusion matrix over batches for mIoU."""

    num_classes: int

    def __post_init__(self) -> None:
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        idx = target.flatten().cpu() * self.num_classes + pred.flatten().cpu()
        self.matrix += torch.bincount(idx, minlength=self.num_classes**2).view(self.num_classes, -1)

    def miou(self) -> float:
        """Mean IoU over the classes present in the targets or the predictions."""
        m = self.matrix.double()
        inter = m.diag()
        union = m.sum(0) + m.sum(1) - inter
        present = union > 0
        return (inter[present] / union[present]).mean().item()


def trainable_share(model: nn.Module, total: int | None = None) -> tuple[int, float]:
    """(trainable parameter count, share of ``total`` or of all model parameters)."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    all_params = total if total is not None else sum(p.numel() for p in model.parameters())
    return n, n / max(all_params, 1)
