"""Tiny diffusers pipeline built from config (no hub) and helpers for the format tests."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import torch
from torch import nn


def tiny_tokenizer(folder: Path):
    """A character-level CLIPTokenizer from a vocab/merges pair written into ``folder``."""
    from transformers import CLIPTokenizer

    chars = sorted(set(string.ascii_lowercase))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def tiny_pipeline(tmp: Path, seed: int = 0):
    """StableDiffusionPipeline with a tiny UNet, CLIP text encoder and VAE; same weights per seed."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(tmp / "tokenizer")
    n = len(tokenizer.get_vocab())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
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
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(8,),
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
            norm_num_groups=8,
            sample_size=8,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=n,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=16,
                bos_token_id=n - 2,
                eos_token_id=n - 1,
                pad_token_id=n - 1,
                projection_dim=16,
            )
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe) -> np.ndarray:
    """Two DDIM steps at 8x8 with classifier-free guidance, fixed seed."""
    return pipe(
        "a red cat",
        num_inference_steps=2,
        guidance_scale=3.0,
        height=8,
        width=8,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


def randomize_lora(model: nn.Module, std: float = 0.3, seed: int = 0) -> None:
    """Give every LoRA up-projection random values so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=gen) * std)


def snapshot(model: nn.Module) -> tuple:
    """Everything that must stay identical when a load fails: structure, tensors, adapters."""
    from adapters.base import adapter_names

    structure = [(n, type(m).__name__) for n, m in model.named_modules()]
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return structure, tensors, adapter_names(model)


def same_snapshot(a: tuple, b: tuple) -> bool:
    return (
        a[0] == b[0]
        and a[2] == b[2]
        and a[1].keys() == b[1].keys()
        and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    )
