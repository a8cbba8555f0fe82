"""SALT pipeline: a ViT segmenter adapted to a shifted segmentation domain from few samples.

The segmenter is a frozen backbone plus a light decoder (``SegDecoder``).  The decoder
is first trained on the source domain (flat, well-lit scenes); the adaptation stage then
trains the method's backbone adapter plus the decoder on ``n_train`` target-domain
images (dark, striped, noisy scenes) and scores Dice and HD95 on held-out target images.

Modes: ``salt`` (the method), ``lora``, ``svd`` (SVD-only: scale and shift of every
singular value, SALT with rank_ratio 1 and no LoRA), ``decoder`` (decoder only), ``full``.
Loss: cross-entropy + soft Dice (+ SALT's optional regulariser on ||W' - W||^2).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from adapters import base
from adapters.lora import LoraSpec
from adapters.salt import SaltSpec, salt_regularizer
from pipelines import register_pipeline, vision_data
from pipelines.vision_common import (
    SegDecoder,
    VisionTask,
    build_backbone,
    dice,
    fit,
    hd95,
    normalize_for,
    patch_grid,
)
from studio.config import dataclass_from_dict
from studio.stages import stage

MODES = ("salt", "lora", "svd", "decoder", "full")
ADAPTER = "salt"


@dataclass
class SaltConfig:
    #: salt | lora | svd | decoder | full
    mode: str = "salt"
    #: Backbone family: vit | dinov2.
    backbone: str = "vit"
    #: Backbone weights: auto (tiny world if installed) | world | random.
    backbone_source: str = "auto"
    #: Linear layers of every backbone block that the adapter targets.
    targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"])
    #: SALT: fraction of singular values with scale and shift.
    rank_ratio: float = 0.5
    #: SALT: rank of the LoRA on the remaining subspace.
    salt_lora_rank: int = 4
    #: SALT: weight of the ||W' - W||_F^2 regulariser.
    reg_weight: float = 0.0
    #: LoRA baseline rank (pick it to match SALT's parameter count).
    lora_rank: int = 4
    #: Target-domain training images (the few-shot budget, 20..1000).
    n_train: int = 100
    #: Held-out target-domain test images.
    n_test: int = 200
    #: Source-domain images and steps of the decoder's source training (0 steps: skip).
    n_source: int = 1000
    source_steps: int = 300
    #: Seed of the generated images (the target test set uses a disjoint seed).
    data_seed: int = 0
    #: Image size.
    image_size: int = 32
    #: Absolute learning rate of the backbone in mode full (the loop's lr drives the rest).
    backbone_lr: float = 1e-4
    #: Use a tiny random backbone (tests).
    tiny: bool = False


class Segmenter(nn.Module):
    """Backbone patch grid -> light decoder -> per-pixel logits at the image size."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = SegDecoder(backbone.num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(normalize_for(self.backbone, images))
        return self.decoder(patch_grid(self.backbone, tokens), images.shape[-2:])


def seg_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice averaged over the foreground classes."""
    prob = logits.softmax(1)[:, 1:]
    onehot = F.one_hot(masks, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    inter = (prob * onehot).sum((2, 3))
    soft_dice = (2 * inter + 1) / (prob.sum((2, 3)) + onehot.sum((2, 3)) + 1)
    return F.cross_entropy(logits, masks) + (1 - soft_dice).mean()


class _SourceStage:
    """Decoder training on the source domain (backbone frozen), cached per process.

    Under ``studio.loop.train`` it reports as stage "source" (progress, loss, cancel).
    """

    cache: dict[tuple, dict[str, torch.Tensor]] = {}

    def __init__(self, cfg: SaltConfig) -> None:
        self.cfg = cfg
        self.data: TensorDataset | None = None

    def train_dataloader(self) -> DataLoader:
        if self.data is None:  # rendered once; every epoch re-seeds the same order, as before
            data = vision_data.segmentation_domain(
                self.cfg.n_source, self.cfg.data_seed, self.cfg.image_size, "source"
            )
            self.data = TensorDataset(*data.tensors())
        g = torch.Generator().manual_seed(self.cfg.data_seed)
        return DataLoader(self.data, batch_size=32, shuffle=True, generator=g)

    def loss(self, model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        return seg_loss(model(batch[0]), batch[1])

    def run(self, model: Segmenter, key: tuple) -> None:
        if key not in self.cache:
            model.requires_grad_(False)
            model.decoder.requires_grad_(True)
            # fork_rng: the run's own RNG stream stays untouched.
            with torch.random.fork_rng(devices=[]), stage("source", self.cfg.source_steps) as report:
                fit(
                    self,
                    model,
                    self.cfg.source_steps,
                    lr=1e-3,
                    weight_decay=0.01,
                    warmup=20,
                    seed=self.cfg.data_seed,
                    on_step=report,
                )
            self.cache[key] = copy.deepcopy(model.decoder.state_dict())
        model.decoder.load_state_dict(self.cache[key])


class SaltTask(VisionTask):
    """Task for the shared loop: few-shot adaptation of the segmenter to the target domain."""

    pipeline = "salt"

    def __init__(self, config: SaltConfig | None = None) -> None:
        self.cfg = cfg = config or SaltConfig()
        if cfg.mode not in MODES:
            raise ValueError(f"unknown SALT pipeline mode {cfg.mode!r}; use one of {', '.join(MODES)}")
        self.train_data = vision_data.segmentation_domain(
            cfg.n_train, cfg.data_seed, cfg.image_size, "target"
        )
        # The test images come from a seed no training pool uses.
        self.test_data = vision_data.segmentation_domain(
            cfg.n_test, 10_007 + cfg.data_seed, cfg.image_size, "target"
        )

    def build_base(self) -> Segmenter:
        cfg = self.cfg
        backbone, self.backbone_info = build_backbone(
            cfg.backbone, cfg.backbone_source, cfg.image_size, cfg.tiny
        )
        return Segmenter(backbone, self.test_data.num_mask_classes)

    def prepare_base(self, model: nn.Module) -> None:
        cfg = self.cfg
        if cfg.source_steps > 0:
            key = (self.backbone_info, cfg.image_size, cfg.data_seed, cfg.n_source, cfg.source_steps)
            _SourceStage(cfg).run(model, key)

    def adapter_specs(self) -> dict[str, base.AdapterSpec]:
        cfg = self.cfg
        targets = [r"backbone\.blocks\.\d+\." + re.escape(t) for t in cfg.targets]
        if cfg.mode == "salt":
            spec = SaltSpec(
                targets=targets,
                rank_ratio=cfg.rank_ratio,
                lora_rank=cfg.salt_lora_rank,
                lora_alpha=float(cfg.salt_lora_rank),
                reg_weight=cfg.reg_weight,
            )
            return {ADAPTER: spec}
        if cfg.mode == "svd":
            return {"svd": SaltSpec(targets=targets, rank_ratio=1.0, lora_rank=0)}
        if cfg.mode == "lora":
            return {"lora": LoraSpec(targets=targets, rank=cfg.lora_rank, alpha=float(cfg.lora_rank))}
        return {}

    def trained_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.decoder, model.backbone] if self.cfg.mode == "full" else [model.decoder]

    def param_groups(self, model: nn.Module) -> list[dict]:
        if self.cfg.mode != "full":
            return [{"params": [p for p in model.parameters() if p.requires_grad]}]
        return [
            {"params": list(model.backbone.parameters()), "lr": self.cfg.backbone_lr},
            {"params": list(model.decoder.parameters())},
        ]

    def train_tensors(self) -> list[torch.Tensor]:
        return [self.train_data.images, self.train_data.masks]

    def loss(self, model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        images, masks = batch
        loss = seg_loss(model(images), masks)
        if self.cfg.mode == "salt" and self.cfg.reg_weight > 0:
            loss = loss + salt_regularizer(model, ADAPTER)
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        pred = torch.cat([model(x.to(device)).argmax(1).cpu() for x in self.test_data.images.split(128)])
        target = self.test_data.masks
        return {"dice": dice(pred, target), "hd95": hd95(pred, target), **self.trainable_report(model)}


def make_task(options: dict[str, Any]) -> SaltTask:
    return SaltTask(dataclass_from_dict(SaltConfig, options, "salt pipeline"))


register_pipeline(
    "salt",
    make_task,
    "SALT: singular-value scale/shift + LoRA, few-shot adaptation of a ViT segmenter to a shifted domain",
)
