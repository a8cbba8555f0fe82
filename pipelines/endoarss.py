"""EndoARSS pipeline: one DINOv2-architecture backbone for activity classification + segmentation.

Backbone adapters by ``mode``:
- ``tesla`` (the method): LoRA on attention qkv, TESLA (shared + per-task low-rank) on
  the MLP linears; each task's forward pass runs with its own TESLA component active;
- ``shared``: one LoRA on qkv and the MLP linears, used by both tasks;
- ``single``: one LoRA for one task only (``tasks = ["cls"]`` or ``["seg"]``); the
  "single-task LoRA x2" baseline is two such runs.
Before the heads, an optional Spatially-Aware Multi-Scale Attention block (``sma``).

Task balancing (``balance``): ``pcgrad`` (default) projects each task's gradient on the
parameters both tasks share onto the normal plane of the other's when they conflict
(Yu et al. 2020).  PCGrad is the default because TESLA's purpose is to counter gradient
conflict, and PCGrad removes the conflicting component itself, while loss weighting
(``uncertainty``, Kendall et al. 2018, also available) only rescales whole losses.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from adapters import base
from adapters.lora import LoraSpec
from adapters.tesla import TeslaSpec, use_task
from pipelines import register_pipeline, vision_data
from pipelines.vision_common import (
    ConfusionMeter,
    SegDecoder,
    VisionTask,
    accuracy,
    build_backbone,
    normalize_for,
    patch_grid,
)
from studio.config import dataclass_from_dict

MODES = ("tesla", "shared", "single")
TASKS = ("cls", "seg")
BALANCES = ("pcgrad", "uncertainty", "sum")


@dataclass
class EndoArssConfig:
    #: tesla | shared | single
    mode: str = "tesla"
    #: Tasks trained (single mode: exactly one of cls, seg).
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    #: Spatially-Aware Multi-Scale Attention block before the heads.
    sma: bool = True
    #: Channel groups of the attention block.
    sma_groups: int = 4
    #: pcgrad | uncertainty | sum
    balance: str = "pcgrad"
    #: Backbone weights: auto (tiny world DINOv2 if installed) | world | random.
    backbone_source: str = "auto"
    #: Dataset with class labels and masks: scenes | digits.
    dataset: str = "scenes"
    #: Training images (0: all that remain after the test split) and held-out test images.
    n_train: int = 0
    n_test: int = 300
    #: Image size.
    image_size: int = 32
    #: LoRA rank (qkv in tesla mode; qkv + MLP in shared / single mode).
    lora_rank: int = 8
    #: TESLA ranks on the MLP linears: shared + one per task (4 + 2 x 2 = LoRA rank 8's parameters).
    shared_rank: int = 4
    task_rank: int = 2
    #: Images generated for the world scenes (digits always has 1797) and the data seed.
    n_total: int = 1500
    data_seed: int = 0
    #: Use a tiny random backbone (tests).
    tiny: bool = False


class SpatialMultiScaleAttention(nn.Module):
    """Spatially-aware multi-scale attention over a (B, C, H, W) map, channels in groups.

    Two branches per group: a 1x1 branch that pools along H and along W (keeping where
    along each axis a feature is) and gates the map with both, and a 3x3 branch for local
    context.  Cross-spatial learning: each branch's softmaxed global descriptor weighs
    the other branch's pixels; the summed (1, H, W) map gates the input through a sigmoid.
    """

    def __init__(self, channels: int, groups: int = 4) -> None:
        super().__init__()
        if channels % groups:
            raise ValueError(f"{channels} channels do not split into {groups} groups")
        c = channels // groups
        self.groups = groups
        self.conv1 = nn.Conv2d(c, c, 1)
        self.conv3 = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.GroupNorm(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, ch, h, w = x.shape
        g = x.reshape(b * self.groups, ch // self.groups, h, w)
        pooled_h = g.mean(3, keepdim=True)
        pooled_w = g.mean(2, keepdim=True).transpose(2, 3)
        gate_h, gate_w = self.conv1(torch.cat([pooled_h, pooled_w], 2)).split([h, w], 2)
        x1 = self.norm(g * gate_h.sigmoid() * gate_w.transpose(2, 3).sigmoid())
        x2 = self.conv3(g)
        d1 = x1.mean((2, 3)).softmax(-1).unsqueeze(1)
        d2 = x2.mean((2, 3)).softmax(-1).unsqueeze(1)
        weights = d1 @ x2.flatten(2) + d2 @ x1.flatten(2)
        return (g * weights.view(-1, 1, h, w).sigmoid()).reshape(b, ch, h, w)


class MultiTaskNet(nn.Module):
    """Backbone -> patch grid -> (attention block) -> classification head / segmentation head."""

    def __init__(self, backbone: nn.Module, num_classes: int, num_mask_classes: int, cfg: EndoArssConfig):
        super().__init__()
        dim = backbone.num_features
        self.backbone = backbone
        self.sma = SpatialMultiScaleAttention(dim, cfg.sma_groups) if cfg.sma else nn.Identity()
        self.heads = nn.ModuleDict()
        if "cls" in cfg.tasks:
            self.heads["cls"] = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
        if "seg" in cfg.tasks:
            self.heads["seg"] = SegDecoder(dim, num_mask_classes)
        self.tesla = cfg.mode == "tesla"

    def grid(self, images: torch.Tensor, task: str) -> torch.Tensor:
        ctx = use_task(self, "tesla", task) if self.tesla else nullcontext()
        with ctx:
            tokens = self.backbone.forward_features(normalize_for(self.backbone, images))
        return self.sma(patch_grid(self.backbone, tokens))

    def head(self, grid: torch.Tensor, task: str, size: tuple[int, int]) -> torch.Tensor:
        if task == "cls":
            return self.heads["cls"](grid.mean((2, 3)))
        return self.heads["seg"](grid, size)

    def forward(self, images: torch.Tensor, task: str = "cls", tasks: list[str] | None = None) -> Any:
        """Logits of ``task``; with ``tasks`` a dict of logits per task (one call, so DDP sees it).

        Without TESLA the tasks share one backbone pass; with TESLA each task runs its own.
        """
        if tasks is None:
            return self.head(self.grid(images, task), task, images.shape[-2:])
        shared = None if self.tesla else self.grid(images, tasks[0])
        size = images.shape[-2:]
        return {t: self.head(self.grid(images, t) if shared is None else shared, t, size) for t in tasks}


def pcgrad(grads: dict[str, list[torch.Tensor | None]]) -> list[torch.Tensor | None]:
    """Combine per-task gradients; on parameters every task reaches, project away conflicts.

    ``grads[task][i]`` is task's gradient of parameter i (None where it does not reach).
    Shared parameters are treated as one vector, as in PCGrad.
    """
    tasks = list(grads)
    n = len(grads[tasks[0]])
    shared = [i for i in range(n) if all(grads[t][i] is not None for t in tasks)]
    flat = {t: torch.cat([grads[t][i].flatten() for i in shared]) for t in tasks} if shared else {}
    projected = {}
    for t in tasks:
        g = flat[t].clone() if shared else None
        for o in tasks:
            if o != t and shared:
                dot = torch.dot(g, flat[o])
                if dot < 0:
                    g = g - dot / flat[o].pow(2).sum().clamp_min(1e-20) * flat[o]
        projected[t] = g
    out: list[torch.Tensor | None] = []
    offsets = {}
    pos = 0
    for i in shared:
        offsets[i] = pos
        pos += grads[tasks[0]][i].numel()
    for i in range(n):
        if i in offsets:
            ref = grads[tasks[0]][i]
            out.append(sum(projected[t][offsets[i] : offsets[i] + ref.numel()] for t in tasks).view_as(ref))
        else:
            parts = [grads[t][i] for t in tasks if grads[t][i] is not None]
            out.append(sum(parts) if parts else None)
    return out


def gradient_cosine(grads: dict[str, list[torch.Tensor | None]]) -> float:
    """Cosine between the two tasks' gradients on the parameters both reach (nan if none)."""
    a, b = (grads[t] for t in list(grads)[:2])
    idx = [i for i in range(len(a)) if a[i] is not None and b[i] is not None]
    if not idx:
        return float("nan")
    va, vb = torch.cat([a[i].flatten() for i in idx]), torch.cat([b[i].flatten() for i in idx])
    return F.cosine_similarity(va, vb, dim=0).item()


def backbone_specs(cfg: EndoArssConfig) -> dict[str, base.AdapterSpec]:
    """Adapters injected into the backbone, by adapter name (the first is the main one)."""
    qkv = [r"backbone\.blocks\.\d+\.attn\.qkv"]
    mlp = [r"backbone\.blocks\.\d+\.mlp\.fc1", r"backbone\.blocks\.\d+\.mlp\.fc2"]
    if cfg.mode == "tesla":
        tesla = TeslaSpec(
            targets=mlp,
            tasks=list(cfg.tasks),
            shared_rank=cfg.shared_rank,
            task_rank=cfg.task_rank,
            alpha=float(cfg.shared_rank),
        )
        return {"tesla": tesla, "lora": LoraSpec(targets=qkv, rank=cfg.lora_rank, alpha=float(cfg.lora_rank))}
    return {"lora": LoraSpec(targets=qkv + mlp, rank=cfg.lora_rank, alpha=float(cfg.lora_rank))}


class EndoArssTask(VisionTask):
    """Task for the shared loop: joint activity classification + segmentation."""

    pipeline = "endoarss"

    def __init__(self, config: EndoArssConfig | None = None) -> None:
        cfg = self.cfg = config or EndoArssConfig()
        if cfg.mode not in MODES:
            raise ValueError(f"unknown EndoARSS mode {cfg.mode!r}; use one of {', '.join(MODES)}")
        if cfg.balance not in BALANCES:
            raise ValueError(f"unknown balance {cfg.balance!r}; use one of {', '.join(BALANCES)}")
        if not cfg.tasks or set(cfg.tasks) - set(TASKS) or (cfg.mode == "single") != (len(cfg.tasks) == 1):
            raise ValueError(f"tasks {cfg.tasks} do not fit mode {cfg.mode!r} (single mode trains one task)")
        data = vision_data.load(cfg.dataset, n=cfg.n_total, seed=cfg.data_seed, size=cfg.image_size)
        self.train_data, self.test_data = data.split(cfg.n_test, seed=cfg.data_seed)
        if cfg.n_train:
            self.train_data = self.train_data.take(slice(0, cfg.n_train))

    def build_base(self) -> MultiTaskNet:
        cfg = self.cfg
        backbone, self.backbone_info = build_backbone("dinov2", cfg.backbone_source, cfg.image_size, cfg.tiny)
        model = MultiTaskNet(backbone, self.train_data.num_classes, self.train_data.num_mask_classes, cfg)
        if cfg.balance == "uncertainty" and len(cfg.tasks) > 1:
            model.log_vars = nn.Parameter(torch.zeros(len(cfg.tasks)))
        return model

    def adapter_specs(self) -> dict[str, base.AdapterSpec]:
        return backbone_specs(self.cfg)

    def trained_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.sma, model.heads]

    def build_model(self) -> MultiTaskNet:
        model = super().build_model()
        if hasattr(model, "log_vars"):
            model.log_vars.requires_grad_(True)
        return model

    def train_tensors(self) -> list[torch.Tensor]:
        return self.train_data.tensors()

    def task_losses(self, model: MultiTaskNet, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels, masks = batch
        out = model(images, tasks=list(self.cfg.tasks))
        targets = {"cls": labels, "seg": masks}
        return {t: F.cross_entropy(logits, targets[t]) for t, logits in out.items()}

    def task_gradients(self, model: nn.Module, losses: dict[str, torch.Tensor]) -> tuple[list, dict]:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return params, {t: [] for t in losses}
        grads = {
            t: list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
            for t, loss in losses.items()
        }
        return params, grads

    def loss(self, model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        losses = self.task_losses(model, batch)
        total = sum(losses.values())
        if len(losses) == 1 or self.cfg.balance == "sum":
            return total
        if self.cfg.balance == "uncertainty":
            s = getattr(model, "module", model).log_vars
            return sum(torch.exp(-s[i]) * loss + s[i] for i, loss in enumerate(losses.values()))
        params, grads = self.task_gradients(model, losses)
        combined = pcgrad(grads)
        # A surrogate whose gradient is the PCGrad combination, so any loop's backward() applies it.
        surrogate = sum((p * g.detach()).sum() for p, g in zip(params, combined) if g is not None)
        return surrogate - surrogate.detach() + total.detach()

    def gradient_cosine(self, model: nn.Module, n: int = 128) -> float:
        """Cosine between the task gradients on shared parameters, on the first n training images."""
        if len(self.cfg.tasks) < 2:
            return float("nan")
        batch = [t[:n] for t in self.train_data.tensors()]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        _, grads = self.task_gradients(model, self.task_losses(model, [t.to(device) for t in batch]))
        model.train(was_training)
        return gradient_cosine(grads)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        device = next(model.parameters()).device
        metrics: dict[str, float] = {}
        if "cls" in self.cfg.tasks:
            logits = torch.cat([model(x.to(device), "cls").cpu() for x in self.test_data.images.split(256)])
            metrics["accuracy"] = accuracy(logits, self.test_data.labels)
        if "seg" in self.cfg.tasks:
            meter = ConfusionMeter(self.test_data.num_mask_classes)
            for x, m in zip(self.test_data.images.split(128), self.test_data.masks.split(128)):
                meter.update(model(x.to(device), "seg").argmax(1).cpu(), m)
            metrics["miou"] = meter.miou()
        metrics.update(self.trainable_report(model))
        with torch.enable_grad():
            metrics["grad_cosine"] = self.gradient_cosine(model)
        return metrics


def make_task(options: dict[str, Any]) -> EndoArssTask:
    return EndoArssTask(dataclass_from_dict(EndoArssConfig, options, "endoarss pipeline"))


register_pipeline(
    "endoarss",
    make_task,
    "EndoARSS: DINOv2 + LoRA + TESLA multi-task adapters, activity classification + segmentation",
)
