"""Tiny models built from config for the test matrix (no downloads)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class TinyConvMLP(nn.Module):
    """Conv 3x3 + conv 1x1 + linear layers: the plain-torch case."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_mix = nn.Conv2d(8, 8, 1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv_mix(torch.relu(self.conv_in(x))))
        h = nn.functional.adaptive_avg_pool2d(h, 4).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def tiny_vit() -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=5,
    )


def tiny_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def tiny_dit() -> nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )


@dataclass
class TinyCase:
    """A tiny model, how to call it on a batch, and module names of each layer kind."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], dict]
    #: Target patterns for linear-like layers, conv layers and transformer blocks.
    linear_targets: list[str]
    conv_targets: list[str]
    block_targets: list[str]

    def run(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        out = model(**inputs)
        return out.sample if hasattr(out, "sample") else out


def _image(b: int, g: torch.Generator, c: int = 3, s: int = 16) -> torch.Tensor:
    return torch.randn(b, c, s, s, generator=g)


CASES = [
    TinyCase(
        "mlp",
        TinyConvMLP,
        lambda b, g: {"x": _image(b, g)},
        linear_targets=["fc1", "fc2"],
        conv_targets=["conv_in", "conv_mix"],
        block_targets=[],
    ),
    TinyCase(
        "vit",
        tiny_vit,
        lambda b, g: {"x": _image(b, g)},
        linear_targets=["qkv", "proj", "fc1"],
        conv_targets=["patch_embed.proj"],
        block_targets=[r"blocks\.\d+"],
    ),
    TinyCase(
        "unet",
        tiny_unet,
        lambda b, g: {
            "sample": torch.randn(b, 4, 8, 8, generator=g),
            "timestep": torch.tensor(10),
            "encoder_hidden_states": torch.randn(b, 3, 16, generator=g),
        },
        linear_targets=["to_q", "to_k", "to_v", "to_out.0"],
        conv_targets=[r".*resnets\.\d+\.conv1"],
        block_targets=[r".*transformer_blocks\.\d+"],
    ),
    TinyCase(
        "dit",
        tiny_dit,
        lambda b, g: {
            "hidden_states": torch.randn(b, 4, 8, 8, generator=g),
            "timestep": torch.full((b,), 10),
            "class_labels": torch.arange(b) % 10,
        },
        linear_targets=["to_q", "to_k", "to_v", "ff.net.2"],
        conv_targets=["pos_embed.proj"],
        block_targets=[r"transformer_blocks\.\d+"],
    ),
]
