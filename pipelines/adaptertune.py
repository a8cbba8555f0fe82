"""AdapterTune pipeline: a frozen ViT / DINOv2 backbone transferred to an image classification task.

Modes (the reproduction compares them): ``adaptertune`` (residual bottlenecks + head),
``head`` (head only), ``full`` (everything), ``lora`` (LoRA on attention qkv/proj + head).
Paper defaults (set them in the loop config): rank 16, alpha 1, AdamW lr 1e-3, weight
decay 0.05, cosine schedule with warm-up, gradient clipping at 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from adapters import base
from adapters.adaptertune import AdapterTuneSpec, block_targets
from adapters.lora import LoraSpec
from pipelines import register_pipeline, vision_data
from pipelines.vision_common import VisionTask, accuracy, build_backbone, normalize_for, pooled
from studio.config import dataclass_from_dict

MODES = ("adaptertune", "head", "full", "lora")
ADAPTER = "adaptertune"


@dataclass
class AdapterTuneConfig:
    #: adaptertune | head | full | lora
    mode: str = "adaptertune"
    #: Backbone family: vit | dinov2.
    backbone: str = "vit"
    #: Backbone weights: auto (tiny world if installed) | world | random.
    backbone_source: str = "auto"
    #: Downstream dataset: digits | scenes (activity labels) | shapes (see pipelines.vision_data).
    dataset: str = "digits"
    #: Training images (0: all that remain after the test split).
    n_train: int = 0
    #: Held-out test images.
    n_test: int = 400
    #: Images generated for the world datasets (digits always has 1797).
    n_total: int = 1500
    #: Seed of the data split / generated images.
    data_seed: int = 0
    #: Image size fed to the backbone.
    image_size: int = 32
    #: AdapterTune bottleneck rank (or the LoRA rank in mode lora).
    rank: int = 16
    #: AdapterTune residual scale alpha.
    alpha: float = 1.0
    #: AdapterTune up-projection init: zero | small.
    init: str = "zero"
    #: Which blocks get an adapter: all | every2 | every3 | first_half | last_half | last.
    placement: str = "all"
    #: Absolute learning rate of the backbone in mode full (the loop's lr drives the head).
    backbone_lr: float = 1e-4
    #: Use a tiny random backbone (tests).
    tiny: bool = False


class Classifier(nn.Module):
    """Backbone features pooled as the backbone pools them, then a linear head."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return pooled(self.backbone, self.backbone.forward_features(normalize_for(self.backbone, images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class AdapterTuneTask(VisionTask):
    """Task for the shared loop: transfer a frozen backbone to a classification task."""

    pipeline = "adaptertune"

    def __init__(self, config: AdapterTuneConfig | None = None) -> None:
        self.cfg = cfg = config or AdapterTuneConfig()
        if cfg.mode not in MODES:
            raise ValueError(f"unknown AdapterTune mode {cfg.mode!r}; use one of {', '.join(MODES)}")
        data = vision_data.load(cfg.dataset, n=cfg.n_total, seed=cfg.data_seed, size=cfg.image_size)
        self.train_data, self.test_data = data.split(cfg.n_test, seed=cfg.data_seed)
        if cfg.n_train:
            self.train_data = self.train_data.take(slice(0, cfg.n_train))

    def build_base(self) -> Classifier:
        cfg = self.cfg
        backbone, self.backbone_info = build_backbone(
            cfg.backbone, cfg.backbone_source, cfg.image_size, cfg.tiny
        )
        self.depth = len(backbone.blocks)
        return Classifier(backbone, self.train_data.num_classes)

    def adapter_specs(self) -> dict[str, base.AdapterSpec]:
        cfg = self.cfg
        if cfg.mode == "adaptertune":
            targets = block_targets("backbone.blocks", self.depth, cfg.placement)
            return {ADAPTER: AdapterTuneSpec(targets=targets, rank=cfg.rank, alpha=cfg.alpha, init=cfg.init)}
        if cfg.mode == "lora":
            return {"lora": LoraSpec(targets=["attn.qkv", "attn.proj"], rank=cfg.rank, alpha=float(cfg.rank))}
        return {}

    def trained_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.head, model.backbone] if self.cfg.mode == "full" else [model.head]

    def param_groups(self, model: nn.Module) -> list[dict]:
        head = [p for p in model.head.parameters()]
        rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
        if self.cfg.mode == "full":
            return [{"params": rest, "lr": self.cfg.backbone_lr}, {"params": head}]
        return [{"params": rest + head}] if rest else [{"params": head}]

    def train_tensors(self) -> list[torch.Tensor]:
        return [self.train_data.images, self.train_data.labels]

    def loss(self, model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        logits = torch.cat([model(x.to(device)).float().cpu() for x in self.test_data.images.split(256)])
        return {"accuracy": accuracy(logits, self.test_data.labels), **self.trainable_report(model)}


def make_task(options: dict[str, Any]) -> AdapterTuneTask:
    return AdapterTuneTask(dataclass_from_dict(AdapterTuneConfig, options, "adaptertune pipeline"))


register_pipeline(
    "adaptertune",
    make_task,
    "AdapterTune: zero-init residual bottlenecks on a frozen ViT/DINOv2, transferred to a classification task",
)
