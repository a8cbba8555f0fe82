"""A small two-view pointmap model in the DUSt3R style, its loss, metrics and save/load.

Image pair -> for every pixel of both views a 3D point in view 1's camera frame plus a
confidence (Wang et al., "DUSt3R: Geometric 3D Vision Made Easy", CVPR 2024):

- a shared ViT encoder embeds each view (4x4 patches, learned 2D position embedding);
- two decoders (one per view) alternate self-attention, cross-attention to the other view's
  current tokens, and an MLP;
- a linear head per view maps each token to its patch's (x, y, z, c); confidence = 1 + exp(c).

Loss (DUSt3R eq. 2-4): both the prediction and the ground truth are divided by their mean
distance to the origin over the valid pixels of both views (scale-normalised), the
per-pixel Euclidean error ``l`` is weighted by the confidence ``C`` and regularised:
``mean(C * l - alpha * log C)``.

Written by hand (not timm's ViT) because the model needs the two-view cross-attention
decoder; attention is ``F.scaled_dot_product_attention`` (flash kernels on GPU).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE = "studio.world.pointmap_model.PointmapNet"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class PointmapConfig:
    """Architecture of :class:`PointmapNet`."""

    image_size: int = 64  # square input size the position embedding is made for
    patch_size: int = 4  # pixels per token side
    dim: int = 96  # token width
    heads: int = 4  # attention heads
    enc_depth: int = 4  # shared encoder blocks
    dec_depth: int = 3  # decoder blocks per view
    mlp_ratio: float = 3.0  # MLP hidden width / dim

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": ARCHITECTURE, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PointmapConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float) -> None:
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Self-attention, cross-attention to the other view, MLP (pre-norm residuals)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.norm_ctx, self.cross_attn = (
            nn.LayerNorm(dim),
            nn.LayerNorm(dim),
            Attention(dim, heads),
        )
        self.norm3, self.mlp = nn.LayerNorm(dim), Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.norm2(x), self.norm_ctx(other))
        return x + self.mlp(self.norm3(x))


class PointmapNet(nn.Module):
    """(img1, img2) float [B, 3, H, W] in 0..1 -> pts1, pts2 [B, H, W, 3] (view 1 frame), conf1, conf2 [B, H, W]."""

    def __init__(self, config: PointmapConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or PointmapConfig()
        if c.image_size % c.patch_size:
            raise ValueError(f"image_size {c.image_size} is not a multiple of patch_size {c.patch_size}")
        self.grid = c.image_size // c.patch_size
        self.patch_embed = nn.Conv2d(3, c.dim, c.patch_size, c.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, c.dim, self.grid, self.grid) * 0.02)
        self.encoder = nn.ModuleList([EncoderBlock(c.dim, c.heads, c.mlp_ratio) for _ in range(c.enc_depth)])
        self.enc_norm = nn.LayerNorm(c.dim)
        self.dec1 = nn.ModuleList([DecoderBlock(c.dim, c.heads, c.mlp_ratio) for _ in range(c.dec_depth)])
        self.dec2 = nn.ModuleList([DecoderBlock(c.dim, c.heads, c.mlp_ratio) for _ in range(c.dec_depth)])
        self.head1 = nn.Sequential(nn.LayerNorm(c.dim), nn.Linear(c.dim, 4 * c.patch_size**2))
        self.head2 = nn.Sequential(nn.LayerNorm(c.dim), nn.Linear(c.dim, 4 * c.patch_size**2))
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.patch_embed((img - 0.5) / 0.5)
        gh, gw = x.shape[-2:]
        pos = self.pos_embed
        if (gh, gw) != (self.grid, self.grid):
            pos = F.interpolate(pos, size=(gh, gw), mode="bilinear", align_corners=False)
        x = (x + pos).flatten(2).transpose(1, 2)
        for block in self.encoder:
            x = block(x)
        return self.enc_norm(x), (gh, gw)

    def _head(
        self, head: nn.Module, x: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, p = x.shape[0], self.config.patch_size
        out = head(x).transpose(1, 2).reshape(b, 4 * p * p, *grid)
        out = F.pixel_shuffle(out, p).float()  # [B, 4, H, W]
        pts = out[:, :3].permute(0, 2, 3, 1)
        conf = 1.0 + out[:, 3].clamp(max=20.0).exp()
        return pts, conf

    def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> dict[str, torch.Tensor]:
        # Both views go through the shared encoder as one batch.
        tokens, grid = self.encode(torch.cat([img1, img2]))
        f1, f2 = tokens.chunk(2)
        for b1, b2 in zip(self.dec1, self.dec2):
            f1, f2 = b1(f1, f2), b2(f2, f1)
        pts1, conf1 = self._head(self.head1, f1, grid)
        pts2, conf2 = self._head(self.head2, f2, grid)
        return {"pts1": pts1, "pts2": pts2, "conf1": conf1, "conf2": conf2}

    @torch.no_grad()
    def predict(self, img1: np.ndarray, img2: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
        """uint8 [N, H, W, 3] pairs -> numpy ``pts1``, ``pts2`` [N, H, W, 3] and ``conf1``, ``conf2`` [N, H, W]."""
        self.eval()
        device = next(self.parameters()).device
        outs: dict[str, list[np.ndarray]] = {}
        for s in range(0, len(img1), batch):
            a, b = (to_input(torch.as_tensor(x[s : s + batch]), device) for x in (img1, img2))
            for key, value in self(a, b).items():
                outs.setdefault(key, []).append(value.float().cpu().numpy())
        return {k: np.concatenate(v) for k, v in outs.items()}


def to_input(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in 0..1 on ``device``."""
    return images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div(255.0)


def normalise(pts1: torch.Tensor, pts2: torch.Tensor, valid1: torch.Tensor, valid2: torch.Tensor):
    """Divide both pointmaps by their mean distance to the origin over valid pixels (per sample)."""
    dist = (pts1.norm(dim=-1) * valid1).flatten(1).sum(1) + (pts2.norm(dim=-1) * valid2).flatten(1).sum(1)
    count = valid1.flatten(1).sum(1) + valid2.flatten(1).sum(1)
    scale = (dist / count.clamp(min=1)).clamp(min=1e-8).view(-1, 1, 1, 1)
    return pts1 / scale, pts2 / scale


def pointmap_loss(
    out: dict[str, torch.Tensor],
    gt1: torch.Tensor,
    gt2: torch.Tensor,
    valid1: torch.Tensor,
    valid2: torch.Tensor,
    alpha: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DUSt3R's confidence-weighted, scale-normalised regression loss; returns (loss, logs)."""
    v1, v2 = valid1.float(), valid2.float()
    p1, p2 = normalise(out["pts1"].float(), out["pts2"].float(), v1, v2)
    g1, g2 = normalise(gt1.float(), gt2.float(), v1, v2)
    l1, l2 = (p1 - g1).norm(dim=-1), (p2 - g2).norm(dim=-1)
    c1, c2 = out["conf1"], out["conf2"]
    n = (v1.sum() + v2.sum()).clamp(min=1)
    conf_term = ((c1 * l1 - alpha * c1.log()) * v1).sum() + ((c2 * l2 - alpha * c2.log()) * v2).sum()
    regr = ((l1 * v1).sum() + (l2 * v2).sum()) / n
    return conf_term / n, {
        "regr": float(regr.detach()),
        "conf": float(((c1 * v1).sum() / v1.sum().clamp(min=1)).detach()),
    }


def relative_errors(pred1, pred2, gt1, gt2, valid1, valid2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per valid pixel ``|p - g| / |g|`` after normalising both: flat tensors for view 1 and view 2."""
    v1, v2 = valid1.float(), valid2.float()
    p1, p2 = normalise(pred1.float(), pred2.float(), v1, v2)
    g1, g2 = normalise(gt1.float(), gt2.float(), v1, v2)
    e1 = ((p1 - g1).norm(dim=-1) / g1.norm(dim=-1).clamp(min=1e-6))[valid1.bool()]
    e2 = ((p2 - g2).norm(dim=-1) / g2.norm(dim=-1).clamp(min=1e-6))[valid2.bool()]
    return e1, e2


def summarise(errors: torch.Tensor) -> dict[str, float]:
    """Median relative error and the share of points within 10% / 25%."""
    e = errors.float().cpu()
    return {
        "median_rel_err": round(float(e.median()), 4),
        "within_10pct": round(float((e < 0.10).float().mean()), 4),
        "within_25pct": round(float((e < 0.25).float().mean()), 4),
    }


@torch.no_grad()
def evaluate(
    model: PointmapNet, pairs: dict[str, np.ndarray], device: str = "cpu", batch: int = 64
) -> dict[str, float]:
    """Quality on ``multiview.make_pairs`` output (scale-normalised, both views pooled; plus view 2 alone)."""
    model.eval()
    errors, view2 = [], []
    for s in range(0, len(pairs["img1"]), batch):
        part = {k: torch.as_tensor(v[s : s + batch]) for k, v in pairs.items()}
        out = model(to_input(part["img1"], device), to_input(part["img2"], device))
        gt = [part[k].to(device) for k in ("pts1_in_cam1", "pts2_in_cam1", "valid1", "valid2")]
        e1, e2 = relative_errors(out["pts1"], out["pts2"], *gt)
        errors += [e1.cpu(), e2.cpu()]
        view2.append(e2.cpu())
    result = summarise(torch.cat(errors))
    result["view2_median_rel_err"] = summarise(torch.cat(view2))["median_rel_err"]
    return result


def save_pointmap(model: PointmapNet, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (weights in ``dtype``) into the folder ``path``."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {**model.config.to_dict(), "weights_dtype": str(dtype).removeprefix("torch.")}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_pointmap(path: str | os.PathLike, device: str = "cpu") -> PointmapNet:
    """A :class:`PointmapNet` from a folder written by :func:`save_pointmap` (float32, eval mode)."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}: not a pointmap model folder")
    config = json.loads((folder / CONFIG_NAME).read_text())
    if config.get("architecture") != ARCHITECTURE:
        raise ValueError(
            f"{folder / CONFIG_NAME} describes {config.get('architecture')!r}, not {ARCHITECTURE}"
        )
    model = PointmapNet(PointmapConfig.from_dict(config))
    state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS_NAME)).items()}
    model.load_state_dict(state)
    return model.to(device).eval()


def train_pointmap(
    out_dir: str | os.PathLike,
    seed: int = 0,
    device: str = "cuda",
    minutes_budget: float = 3.0,
    **kwargs: Any,
) -> dict[str, Any]:
    """The training recipe (see :mod:`studio.world.pointmap_train`)."""
    from studio.world.pointmap_train import train_pointmap as train

    return train(out_dir, seed=seed, device=device, minutes_budget=minutes_budget, **kwargs)
