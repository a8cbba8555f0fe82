"""`studio quantize`: turn a diffusion model's linears into 4-bit SVDQuant layers.

    studio quantize --model PATH_OR_TINY --out DIR [--rank 32] [--format int4|fp4]
        [--calib-prompts FILE|"p1|p2" --calib-steps 4 --calib-seed 0]

PATH is a diffusers pipeline folder (its ``transformer`` or ``unet`` is quantized) or a
model folder with a diffusers ``config.json``; ``tiny`` builds a small UNet from config
(no download), ``tiny-world`` is the tiny world's shipped pipeline.  By default calibration
runs the model on synthetic inputs shaped from its config (random latents, text states and
timesteps); with ``--calib-prompts`` (pipeline folders only) the pipeline samples those
prompts and the denoiser's real calls (every step, the CFG batch) calibrate instead.
``svdquant_config.json`` records which calibration was used under ``meta.calibration``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn


def tiny_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def model_path(model: str) -> Path:
    """``tiny-world`` -> the shipped tiny world pipeline folder; anything else as a path."""
    if model == "tiny-world":
        from studio.world.assets import DIFFUSION, asset_path

        return asset_path(DIFFUSION)
    return Path(model)


def load_denoiser(model: str) -> nn.Module:
    """The denoiser (UNet or transformer) of a pipeline folder, a model folder, or ``tiny``."""
    if model == "tiny":
        return tiny_unet()
    import diffusers

    path = model_path(model)
    if (path / "model_index.json").exists():
        index = json.loads((path / "model_index.json").read_text())
        for part in ("transformer", "unet"):
            if part in index:
                cls = getattr(diffusers, index[part][1])
                return cls.from_pretrained(path / part)
        raise ValueError(f"{model}: pipeline has no transformer or unet")
    if (path / "config.json").exists():
        name = json.loads((path / "config.json").read_text()).get("_class_name")
        if name and hasattr(diffusers, name):
            return getattr(diffusers, name).from_pretrained(path)
    raise ValueError(f"{model}: not 'tiny', a diffusers pipeline folder or a diffusers model folder")


def calibration_batches(model: nn.Module, batches: int, seed: int) -> list[dict[str, Any]]:
    """Synthetic inputs shaped from the model's config (UNet2DCondition and DiT-like models)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    out = []
    for _ in range(batches):
        batch: dict[str, Any] = {
            "sample": torch.randn(2, cfg.in_channels, size, size, generator=gen),
            "timestep": torch.randint(0, 1000, (2,), generator=gen),
        }
        if getattr(cfg, "cross_attention_dim", None):
            batch["encoder_hidden_states"] = torch.randn(2, 8, cfg.cross_attention_dim, generator=gen)
        if getattr(cfg, "num_embeds_ada_norm", None):
            batch = {"hidden_states": batch["sample"], "timestep": batch["timestep"]}
            batch["class_labels"] = torch.randint(0, cfg.num_embeds_ada_norm, (2,), generator=gen)
        out.append(batch)
    return out


def prompt_calibration(args: argparse.Namespace) -> tuple[nn.Module, list[dict[str, Any]], dict[str, Any]]:
    """(denoiser, its recorded calls on ``--calib-prompts``, the calibration record)."""
    from studio.calibration import (
        default_guidance,
        denoiser_of,
        parse_prompts,
        prompts_digest,
        record_denoiser_calls,
    )
    from studio.world.assets import load_diffusion

    prompts = parse_prompts(args.calib_prompts)
    if args.calib_steps < 1:
        raise ValueError(f"--calib-steps must be >= 1, got {args.calib_steps}")
    folder = model_path(args.model)
    if not (folder / "model_index.json").exists():
        raise ValueError(
            f"--calib-prompts needs a diffusers pipeline folder (or tiny-world), got {args.model!r}"
        )
    pipe = load_diffusion(folder)
    calls = record_denoiser_calls(pipe, prompts, args.calib_steps, args.calib_seed)
    record = {
        "kind": "prompts",
        "prompts": len(prompts),
        "prompts_sha256": prompts_digest(prompts),
        "steps": args.calib_steps,
        "seed": args.calib_seed,
        "guidance": default_guidance(pipe),
        "calls": len(calls),
    }
    return denoiser_of(pipe).eval(), calls, record


def describe(record: dict[str, Any]) -> str:
    if record["kind"] == "synthetic":
        return f"synthetic calibration, {record['batches']} batches, seed {record['seed']}"
    return (
        f"calibrated on {record['prompts']} prompts x {record['steps']} steps, seed {record['seed']}, "
        f"{record['calls']} denoiser calls"
    )


def run(args: argparse.Namespace) -> int:
    from adapters.svdquant import SVDQuantConfig, quantize_model, save_quantized

    if args.rank < 0:
        raise ValueError(f"--rank must be >= 0, got {args.rank}")
    alphas = tuple(None if a == "none" else float(a) for a in args.alphas.split(","))
    cfg = SVDQuantConfig(rank=args.rank, fmt=args.format, alphas=alphas, refine_iters=args.refine_iters)
    if args.calib_prompts is None:
        model = load_denoiser(args.model).eval()
        calib = calibration_batches(model, args.calib_batches, args.seed)
        record: dict[str, Any] = {"kind": "synthetic", "batches": args.calib_batches, "seed": args.seed}
    else:
        model, calib, record = prompt_calibration(args)
    errors = quantize_model(model, calib, cfg, targets=args.targets or None)
    meta = {
        "source": args.model,
        "config": {**cfg.__dict__, "alphas": list(cfg.alphas)},
        "seed": args.seed,
        "calibration": record,
    }
    out = save_quantized(model, args.out, meta)
    mean = sum(errors.values()) / max(len(errors), 1)
    print(
        f"quantized {len(errors)} linear layers to {args.format} + rank {args.rank}; mean calibration error "
        f"{mean:.4f} ({describe(record)})"
    )
    print(f"wrote {out / 'svdquant_model.safetensors'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a diffusion model's linears to 4-bit SVDQuant")
    p.add_argument(
        "--model", required=True, help="'tiny', 'tiny-world', a diffusers pipeline folder, or a model folder"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--rank", type=int, default=32, help="rank of the 16-bit low-rank branch")
    p.add_argument("--format", choices=["int4", "fp4"], default="int4", help="4-bit residual format")
    p.add_argument("--alphas", default="none,0.25,0.4,0.5,0.6,0.75", help="smoothing strengths searched")
    p.add_argument("--refine-iters", type=int, default=1, help="SVD refinements against the 4-bit residual")
    p.add_argument("--calib-batches", type=int, default=4, help="synthetic calibration batches")
    p.add_argument(
        "--calib-prompts",
        default=None,
        help="calibrate on real prompts: a text file (one per line) or prompts separated by '|'",
    )
    p.add_argument("--calib-steps", type=int, default=4, help="sampling steps per calibration prompt")
    p.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration images (prompt i: +i)")
    p.add_argument("--targets", nargs="*", help="module names/patterns to quantize (default: every Linear)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
