"""Shared pieces of the vision pipelines: backbones, heads, data and metrics.

Backbones come from the tiny world (``studio.world.assets``) when its weights are
installed, otherwise from timm configs with random weights (tests, and a clearly
labelled fallback in the reproductions).  Data comes from ``pipelines.vision_data``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from adapters.base import AdapterError, AdapterSpec, adapter_parameters, inject

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
            model = loader(num_classes=0, img_size=img_size)
            return model, f"world:{assets.VIT if kind == 'vit' else assets.DINOV2}@{img_size}"
        except (ImportError, AttributeError, FileNotFoundError, OSError) as err:
            if source == "world":
                raise RuntimeError(f"the tiny world's {kind} backbone is not available: {err}") from err
    import timm

    cfg = dict(FALLBACK_BACKBONES[kind])
    if tiny:
        cfg.update(TINY_BACKBONE)
    name = cfg.pop("name")
    # DINOv2 keeps its LayerScale; at 1.0 rather than 1e-5 so a random block is not a near no-op.
    extra = {"init_values": 1.0} if kind == "dinov2" else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the random "pretrained" backbone is the same in every run
        model = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0, **cfg, **extra)
    return model, f"random-init:{name}-{cfg['embed_dim']}x{cfg['depth']}-p{cfg['patch_size']}-i{img_size}-s0"


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
    """Light decoder: 1x1 conv on the patch grid, x2 upsample + 3x3 conv, then logits at the image size."""

    def __init__(self, dim: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(dim, width, 1), nn.GroupNorm(4, width), nn.GELU())
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


def _class_pairs(pred: torch.Tensor, target: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """Binary (pred, target) masks per image and foreground class present in the target.

    As MONAI's ``DiceMetric``/``HausdorffDistanceMetric`` with ``ignore_empty=True`` (the
    usual medical-segmentation protocol, and SALT's): a class absent from an image's ground
    truth is skipped for that image, so stray predicted pixels of it lower the Dice of the
    classes they overlap rather than adding a pair scored 0.
    """
    pairs = []
    for p, t in zip(pred.cpu().numpy(), target.cpu().numpy()):
        for c in sorted(set(np.unique(t)) - {0}):
            pairs.append((p == c, t == c))
    return pairs


def dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean Dice over (image, foreground class present in the ground truth) pairs.

    ``pred`` and ``target`` are (B, H, W) class maps, 0 = background.  With no foreground
    in any target the score is 1 if nothing is predicted, else 0.
    """
    pairs = _class_pairs(pred, target)
    if not pairs:
        return float(not (pred > 0).any())
    return float(np.mean([2 * (p & t).sum() / (p.sum() + t.sum()) for p, t in pairs]))


def _boundary(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean 95th-percentile Hausdorff distance (pixels) over (image, foreground class) pairs.

    Per pair: the larger of the two directed 95th percentiles of boundary-to-boundary
    distances (as MONAI computes it); a class missed entirely scores the image diagonal.
    """
    from scipy import ndimage

    out = []
    for p, t in _class_pairs(pred, target):
        if not p.any() or not t.any():
            out.append(float(np.hypot(*p.shape)))
            continue
        bp, bt = _boundary(p), _boundary(t)
        to_t = ndimage.distance_transform_edt(~bt)[bp]
        to_p = ndimage.distance_transform_edt(~bp)[bt]
        out.append(max(np.percentile(to_t, 95), np.percentile(to_p, 95)))
    return float(np.mean(out)) if out else 0.0


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


# --------------------------------------------------------------------------- a quick fit for sweeps


def cosine_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def fit(
    task: Any,
    model: nn.Module,
    steps: int,
    lr: float,
    weight_decay: float = 0.05,
    warmup: int = 0,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``task.loss`` on ``task.train_dataloader()`` for ``steps`` steps: AdamW, cosine, clipping.

    ``on_step(step, loss)`` is called after each step (e.g. a ``studio.stages`` report).

    The benchmark sweeps run hundreds of short fits in one process, so they use this
    dozen-line loop instead of the full Accelerate loop (no checkpoints, no trackers);
    the optimiser, schedule and clipping are the same as the pipelines' defaults.
    """
    torch.manual_seed(seed)
    groups = task.param_groups(model) if hasattr(task, "param_groups") else None
    params = groups or [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_warmup(s, steps, warmup))
    losses: list[float] = []
    model.train()
    while len(losses) < steps:
        for batch in task.train_dataloader():
            loss = task.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            trainable = [p for g in opt.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(len(losses), losses[-1])
            if len(losses) >= steps:
                break
    model.eval()
    return losses


# --------------------------------------------------------------------------- the tasks' common part


class VisionTask:
    """Shared Task plumbing for the vision pipelines (see studio.loop.Task).

    A subclass sets ``pipeline`` and ``cfg`` and implements ``build_base`` (the model
    without adapters), ``adapter_specs`` (adapter name -> spec, the first is the main
    one), ``trained_modules`` (heads etc. trained besides the adapters), ``train_tensors``,
    ``loss`` and ``evaluate``.
    """

    pipeline = ""
    cfg: Any = None
    backbone_info = ""
    total_params = 0

    def build_base(self) -> nn.Module:
        raise NotImplementedError

    def adapter_specs(self) -> dict[str, AdapterSpec]:
        return {}

    def trained_modules(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def train_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def adapter_name(self) -> str | None:
        return next(iter(self.adapter_specs()), None)

    def prepare_base(self, model: nn.Module) -> None:
        """Hook between building the base and injecting adapters (e.g. source-domain training)."""

    def build_model(self) -> nn.Module:
        model = self.build_base()
        self.prepare_base(model)
        self.total_params = sum(p.numel() for p in model.parameters())
        model.requires_grad_(False)
        for name, spec in self.adapter_specs().items():
            inject(model, spec, name)
            for p in adapter_parameters(model, name):
                p.requires_grad_(True)
        for module in self.trained_modules(model):
            module.requires_grad_(True)
        return model

    def train_dataloader(self, batch_size: int, seed: int) -> DataLoader:
        from studio.loop import seeded_dataloader

        dataset = TensorDataset(*self.train_tensors())
        return seeded_dataloader(dataset, min(batch_size, len(dataset)), seed)

    def trainable_report(self, model: nn.Module) -> dict[str, float]:
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"trainable": n, "trainable_share": n / max(1, self.total_params)}

    def save_adapter(self, model: nn.Module, folder: Path) -> None:
        save_vision(self, model, Path(folder))


HEADS_FILE = "heads.safetensors"
TASK_FILE = "vision_task.json"


def save_vision(task: VisionTask, model: nn.Module, folder: Path) -> None:
    """Write a trained vision model as studio adapter folder(s) plus its trained heads.

    ``folder`` is the studio folder of the main adapter (``studio adapter inspect`` reads
    it); further adapters go to ``folder/<name>/``; the trained non-adapter tensors
    (heads, decoder, attention block; the backbone too under full fine-tuning) go to
    ``heads.safetensors`` and the pipeline options to ``vision_task.json``, so
    ``load_vision(folder)`` rebuilds the model.
    """
    from safetensors.torch import save_file

    from adapters.formats import save_adapter

    metadata = {
        "pipeline": task.pipeline,
        "pipeline_options": asdict(task.cfg),
        "backbone": task.backbone_info,
    }
    names = list(task.adapter_specs())
    for i, name in enumerate(names):
        save_adapter(
            model,
            name,
            folder if i == 0 else folder / name,
            base_model_id=task.backbone_info,
            metadata=metadata,
        )
    adapter_ids = {id(p) for name in names for p in adapter_parameters(model, name)}
    heads = {
        k: v.detach().cpu().contiguous()
        for k, v in model.named_parameters()
        if v.requires_grad and id(v) not in adapter_ids
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(heads, str(folder / HEADS_FILE))
    info = {**metadata, "adapters": {n: ("." if i == 0 else n) for i, n in enumerate(names)}}
    (folder / TASK_FILE).write_text(json.dumps(info, indent=1, default=str))


def load_vision(folder: str | Path, data_sizes: dict[str, int] | None = None) -> tuple[VisionTask, nn.Module]:
    """(task, model in eval mode) from a folder written by ``save_vision``.

    ``data_sizes`` replaces the saved data-set sizes (options the run set to non-zero values,
    e.g. ``n_train``) when only the model is wanted: building the task generates its data sets,
    which takes seconds at the training sizes and is not needed for inference.
    """
    from safetensors.torch import load_file

    from adapters.formats import load_adapter
    from pipelines import get_pipeline

    folder = Path(folder)
    if not (folder / TASK_FILE).is_file():
        raise AdapterError(f"{folder}: not a vision pipeline output (no {TASK_FILE})")
    info = json.loads((folder / TASK_FILE).read_text())
    options = dict(info["pipeline_options"])
    options.update({k: v for k, v in (data_sizes or {}).items() if options.get(k)})
    task = get_pipeline(info["pipeline"])(options)
    model = task.build_base()
    for name, sub in info["adapters"].items():
        load_adapter(model, folder / sub, name, base_model_id=task.backbone_info)
    heads = load_file(str(folder / HEADS_FILE))
    missing = sorted(set(heads) - set(dict(model.named_parameters())))
    if missing:
        raise AdapterError(f"{folder / HEADS_FILE}: tensors the model does not have: {missing[:3]}")
    model.load_state_dict(heads, strict=False)
    return task, model.requires_grad_(False).eval()


def train_once(pipeline: str, options: dict[str, Any], **train: Any) -> dict[str, float]:
    """Train one run of a registered pipeline through the shared loop; returns its final metrics.

    ``train`` holds TrainConfig fields (max_steps, lr, seed, ...); the run folder is temporary.
    The metrics also carry ``seconds`` and ``backbone`` (which backbone the run used).
    """
    import tempfile
    import time

    from pipelines import get_pipeline
    from studio.config import TrainConfig
    from studio.loop import train as run

    task = get_pipeline(pipeline)(options)
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(pipeline=pipeline, output_dir=tmp, progress=False, **train)
        start = time.time()
        result = run(task, config)
    return {**result.metrics, "seconds": time.time() - start, "backbone": task.backbone_info}
