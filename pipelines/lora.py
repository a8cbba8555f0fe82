"""Plain LoRA pipeline: a tiny timm ViT (built from config, no download) learns digit classes.

The base ViT is built from a fixed seed (or loaded from ``base_checkpoint``), frozen, and
LoRA on its attention, MLP and head linears learns scikit-learn's digits upsampled to
32x32.  It is the smallest end-to-end run of the shared loop: the loss falls visibly in
~50 CPU steps, and every loop feature (accumulation, precision, resume, data-parallel
runs) is tested on it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from adapters import base
from adapters.lora import LoraSpec
from pipelines import register_pipeline
from studio.config import dataclass_from_dict
from studio.loop import seeded_dataloader

ADAPTER = "lora"


@dataclass
class LoraPipelineConfig:
    #: Dataset from pipelines.vision_data: digits | shapes.
    dataset: str = "digits"
    #: Held-out images for evaluate (digits: 1797 - 261 = 1536 training images).
    n_test: int = 261
    #: Image side fed to the ViT.
    image_size: int = 32
    #: ViT patch side.
    patch_size: int = 16
    #: ViT width.
    embed_dim: int = 64
    #: ViT blocks.
    depth: int = 2
    #: Attention heads.
    num_heads: int = 2
    #: Seed of the random base ViT (fixed, so every run adapts the same base model).
    base_seed: int = 0
    #: Optional local safetensors file with the base ViT's state dict (replaces the random base).
    base_checkpoint: str = ""
    #: Modules that get LoRA (suffixes or regexes, see adapters.base.name_matches).
    targets: list[str] = field(
        default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "head"]
    )
    #: LoRA rank.
    rank: int = 4
    #: LoRA alpha (scale = alpha / rank).
    alpha: float = 8.0
    #: rsLoRA scaling alpha / sqrt(rank).
    use_rslora: bool = False
    #: Dropout on the LoRA input.
    dropout: float = 0.0
    #: LoRA init: default | pissa.
    init: str = "default"
    #: Seconds to sleep per loss call (lets tests and demos interrupt a run mid-way).
    step_delay_s: float = 0.0


class LoraTask:
    """Task for studio.loop: LoRA on a frozen tiny ViT, cross-entropy on digit labels."""

    adapter_name = ADAPTER

    def __init__(self, config: LoraPipelineConfig | None = None) -> None:
        from pipelines import vision_data

        self.cfg = config or LoraPipelineConfig()
        data = vision_data.load(self.cfg.dataset, size=self.cfg.image_size)
        self.train_data, self.test_data = data.split(self.cfg.n_test, seed=0)
        self.num_classes = data.num_classes

    @property
    def base_model_id(self) -> str:
        c = self.cfg
        if c.base_checkpoint:
            return c.base_checkpoint
        return f"timm-vit-config:{c.embed_dim}x{c.depth}h{c.num_heads}p{c.patch_size}i{c.image_size}s{c.base_seed}"

    def build_base(self) -> nn.Module:
        import timm

        c = self.cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.base_seed)
            model = timm.create_model(
                "vit_tiny_patch16_224",
                pretrained=False,
                img_size=c.image_size,
                patch_size=c.patch_size,
                embed_dim=c.embed_dim,
                depth=c.depth,
                num_heads=c.num_heads,
                num_classes=self.num_classes,
            )
        if c.base_checkpoint:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(c.base_checkpoint))
        return model

    def spec(self) -> LoraSpec:
        c = self.cfg
        return LoraSpec(
            targets=list(c.targets),
            rank=c.rank,
            alpha=c.alpha,
            use_rslora=c.use_rslora,
            dropout=c.dropout,
            init=c.init,
        )

    def build_model(self) -> nn.Module:
        model = self.build_base()
        base.inject(model, self.spec(), ADAPTER)
        base.mark_only_adapters_trainable(model, ADAPTER)
        return model

    def train_dataloader(self, batch_size: int, seed: int) -> DataLoader:
        dataset = TensorDataset(self.train_data.images, self.train_data.labels)
        return seeded_dataloader(dataset, batch_size, seed)

    def loss(self, model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        if self.cfg.step_delay_s:
            time.sleep(self.cfg.step_delay_s)
        images, labels = batch
        return F.cross_entropy(model(images), labels)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        logits = torch.cat([model(x.to(device)).float().cpu() for x in self.test_data.images.split(256)])
        labels = self.test_data.labels
        return {
            "accuracy": (logits.argmax(-1) == labels).float().mean().item(),
            "loss": F.cross_entropy(logits, labels).item(),
        }

    def save_adapter(self, model: nn.Module, folder: Path) -> None:
        from adapters.formats import save_adapter

        metadata = {"pipeline": "lora", "pipeline_options": asdict(self.cfg)}
        save_adapter(model, ADAPTER, folder, base_model_id=self.base_model_id, metadata=metadata)


def make_task(options: dict[str, Any]) -> LoraTask:
    return LoraTask(dataclass_from_dict(LoraPipelineConfig, options, "lora pipeline"))


register_pipeline("lora", make_task, "LoRA on a tiny timm ViT learning digit classes (no download)")
