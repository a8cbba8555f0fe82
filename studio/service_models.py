"""Base models the studio can generate with: a pluggable list of named loaders.

Built in: ``tiny-sd`` (a Stable Diffusion pipeline built from config with seeded random
weights, for tests and for machines without the world assets), ``tiny-world`` (the
tiny world's trained pipeline from ``assets/`` once it is there), and every diffusers
folder (one with ``model_index.json``) inside the configured model folders.
"""

from __future__ import annotations

import json
import string
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class BaseModel:
    """One entry of the base-model list."""

    #: Name shown in the UI and used in requests.
    name: str
    #: "diffusion" (text to image) for now.
    kind: str
    #: Where it comes from, for display (a path or "built from config").
    source: str
    #: Builds the pipeline; called once, the service caches the result.
    load: Callable[[], object]


_EXTRA: dict[str, BaseModel] = {}


def register_base_model(model: BaseModel) -> None:
    """Add a base model to every service's list (e.g. a checkpoint shipped by a plug-in)."""
    _EXTRA[model.name] = model


# --------------------------------------------------------------------------- tiny SD from config


def _write_tiny_tokenizer(folder: Path) -> None:
    """A character-level CLIP BPE vocabulary: no merges, one token per character."""
    chars = sorted(set(string.ascii_lowercase + string.digits + ".,!?-'"))
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def build_tiny_pipeline(seed: int = 0, sample_size: int = 32) -> object:
    """A StableDiffusionPipeline with tiny random components, identical for a given seed."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size // 2,
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
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            norm_num_groups=8,
            sample_size=sample_size,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=90,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=32,
                bos_token_id=88,
                eos_token_id=89,
                pad_token_id=89,
                projection_dim=16,
            )
        )
    tok_dir = Path(tempfile.mkdtemp(prefix="studio-tok-"))
    _write_tiny_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=32)
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


def load_diffusers_folder(path: str | Path) -> object:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _world_model() -> BaseModel | None:
    """The tiny world's diffusion pipeline, when studio.world.assets and its files exist."""
    try:
        from studio.world import assets
    except ImportError:
        return None
    loader = getattr(assets, "load_diffusion", None)
    if loader is None or not any((ROOT / "assets").rglob("model_index.json")):
        return None

    def load() -> object:
        pipe = loader()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return BaseModel("tiny-world", "diffusion", "assets/ (tiny world)", load)


def list_base_models(model_dirs: Iterable[str | Path] = ()) -> list[BaseModel]:
    """Every base model available now: the world model first, then tiny-sd, extras, folders."""
    found: list[BaseModel] = []
    world = _world_model()
    if world is not None:
        found.append(world)
    found.append(BaseModel("tiny-sd", "diffusion", "built from config", build_tiny_pipeline))
    found += list(_EXTRA.values())
    for folder in model_dirs:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for index in sorted(folder.rglob("model_index.json")):
            path = index.parent
            name = str(path.relative_to(folder)) if path != folder else path.name
            found.append(BaseModel(name, "diffusion", str(path), lambda p=path: load_diffusers_folder(p)))
    return found


# --------------------------------------------------------------------------- example adapters

#: name -> (targets, rank, seed, scale of the random up-projection)
EXAMPLE_LORAS = {
    "example-attn": (["to_q", "to_k", "to_v", "to_out.0"], 4, 1, 0.6),
    "example-conv": ([r".*resnets\.\d+\.conv1"], 2, 2, 0.3),
}


def example_lora_parts(unet: object, name: str) -> dict:
    """A deterministic random LoRA for the from-config pipeline (demo and tests).

    Its up-projection is random instead of zero, so it visibly changes the images.
    """
    from adapters.base import adapter_state_dict, inject, remove
    from adapters.lora import LoraSpec

    targets, rank, seed, scale = EXAMPLE_LORAS[name]
    spec = LoraSpec(targets=list(targets), rank=rank, alpha=float(rank))
    inject(unet, spec, "_example")
    try:
        shapes = {k: v.shape for k, v in adapter_state_dict(unet, "_example").items()}
    finally:
        remove(unet, "_example")
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=gen) * scale for k, shape in sorted(shapes.items())}
    return {"unet": (spec, state)}
