"""The world's text-to-image model: a standard diffusers ``StableDiffusionPipeline`` folder.

Components: a small ``AutoencoderKL`` (64x64 RGB <-> 4x16x16 latents, trained here), a small
``UNet2DConditionModel`` on those latents, the small CLIP's text tower as transformers
``CLIPTextModel`` + ``CLIPTokenizer`` (frozen), and a DPM-Solver++ scheduler (trained with the
matching DDPM noise schedule, epsilon prediction, Stable Diffusion's ``scaled_linear`` betas).
``DiffusionPipeline.from_pretrained("assets/diffusion-tiny")`` loads it offline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from studio.world.recipes import clip as clip_recipe
from studio.world.recipes.common import (
    BuildContext,
    StepBudget,
    WorldData,
    folder_size_mb,
    table,
    to_float,
    write_card,
)

MODEL_NAME = "diffusion-tiny"
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
)
UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=128,
    attention_head_dim=4,
    norm_num_groups=16,
)
# Stable Diffusion's noise schedule; "trailing" spacing so that few-step sampling starts at t = T.
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    steps_offset=1,
    timestep_spacing="trailing",
)


@dataclass
class DiffusionConfig:
    """The VAE + UNet recipe."""

    vae_steps: int = 2500  # autoencoder optimizer steps
    vae_batch: int = 256  # images per autoencoder step
    vae_lr: float = 1e-3  # autoencoder AdamW learning rate (cosine)
    vae_kl_weight: float = 1e-6  # weight of the KL term (per-sample sum) against the per-pixel MSE
    vae_max_seconds: float = 30.0  # wall-clock cap for the autoencoder
    unet_steps: int = 10000  # UNet optimizer steps
    unet_batch: int = 256  # latents per UNet step
    unet_lr: float = 5e-4  # UNet AdamW peak learning rate (cosine)
    unet_warmup: int = 200  # linear warmup steps
    unet_max_seconds: float = 140.0  # wall-clock cap for the UNet
    p_full_caption: float = 0.6  # else a short prompt, as for the CLIP
    p_uncond: float = 0.1  # empty prompt (classifier-free guidance)
    snr_gamma: float = 5.0  # min-SNR loss weighting
    ema_power: float = 0.75  # EMA warmup power (diffusers EMAModel)
    eval_prompts: int = 96  # prompts scored for prompt following
    eval_steps: int = 20  # sampler steps at evaluation
    guidance_scales: tuple = (1.0, 3.0, 5.0, 7.5)  # CFG scales measured; the best is recommended


def train_vae(cfg: DiffusionConfig, images: torch.Tensor, ctx: BuildContext) -> tuple[Any, dict]:
    from diffusers import AutoencoderKL

    torch.manual_seed(ctx.seed)
    vae = AutoencoderKL(**VAE_CONFIG).to(ctx.device).train()
    opt = torch.optim.AdamW(
        vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, fused=ctx.device.startswith("cuda")
    )
    gen = ctx.generator(31)
    budget = StepBudget(cfg.vae_steps, cfg.vae_max_seconds)
    for step in budget:
        for group in opt.param_groups:
            group["lr"] = budget.lr(step, 50, cfg.vae_lr)
        x = to_float(
            images[torch.randint(0, len(images), (cfg.vae_batch,), generator=gen, device=ctx.device)]
        )
        with ctx.autocast():
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(rec.float(), x) + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0:
            ctx.say(f"vae step {step} loss {float(loss):.5f}")
    vae.eval()
    return vae, {"steps": budget.done, "train_seconds": budget.seconds, "stopped_early": budget.stopped_early}


@torch.no_grad()
def encode_all(vae: Any, images: torch.Tensor, ctx: BuildContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image (latents are sampled from them per step)."""
    means, stds = [], []
    for start in range(0, len(images), 1024):
        with ctx.autocast():
            dist = vae.encode(to_float(images[start : start + 1024])).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_psnr(vae: Any, images: np.ndarray, device: str) -> float:
    x = to_float(torch.from_numpy(images[:512]).to(device))
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    mse = F.mse_loss((rec + 1) / 2, (x + 1) / 2).item()
    return round(10 * np.log10(1.0 / max(mse, 1e-10)), 2)


def train_unet(
    cfg: DiffusionConfig,
    means: torch.Tensor,
    stds: torch.Tensor,
    scale: float,
    data: WorldData,
    text_encoder: Any,
    ctx: BuildContext,
) -> tuple[Any, dict]:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel, compute_snr
    from open_clip.tokenizer import SimpleTokenizer

    torch.manual_seed(ctx.seed)
    dev = ctx.device
    unet = UNet2DConditionModel(**UNET_CONFIG).to(dev).train()
    ema = EMAModel(unet.parameters(), use_ema_warmup=True, power=cfg.ema_power, foreach=True)
    opt = torch.optim.AdamW(
        unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01, fused=dev.startswith("cuda")
    )
    sched = DDPMScheduler(**SCHEDULE, prediction_type="epsilon")
    tokens, _ = clip_recipe.tokenize_variants(data)
    empty = SimpleTokenizer(context_length=clip_recipe.CONTEXT_LENGTH)([""])[0].to(dev)
    tokens = tokens.to(dev)
    text_encoder = text_encoder.to(dev).eval().requires_grad_(False)
    gen = ctx.generator(41)
    budget = StepBudget(cfg.unet_steps, cfg.unet_max_seconds)
    n, b, n_var = len(means), cfg.unet_batch, tokens.shape[1]
    for step in budget:
        for group in opt.param_groups:
            group["lr"] = budget.lr(step, cfg.unet_warmup, cfg.unet_lr)
        idx = torch.randint(0, n, (b,), generator=gen, device=dev)
        var = torch.randint(1, n_var, (b,), generator=gen, device=dev)
        var = torch.where(torch.rand(b, generator=gen, device=dev) < cfg.p_full_caption, 0, var)
        ids = tokens[idx, var]
        ids = torch.where((torch.rand(b, generator=gen, device=dev) < cfg.p_uncond)[:, None], empty, ids)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen, device=dev)) * scale
        noise = torch.randn(latents.shape, generator=gen, device=dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen, device=dev)
        noisy = sched.add_noise(latents, noise, t)
        with ctx.autocast():
            with torch.no_grad():
                cond = text_encoder(ids).last_hidden_state
            pred = unet(noisy, t, encoder_hidden_states=cond).sample
        snr = compute_snr(sched, t)
        weight = torch.clamp(snr, max=cfg.snr_gamma) / snr
        loss = (F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.step(unet.parameters())
        if step % 500 == 0:
            ctx.say(f"unet step {step} loss {float(loss):.4f}")
    ema.copy_to(unet.parameters())
    unet.eval()
    facts = {"steps": budget.done, "train_seconds": budget.seconds, "stopped_early": budget.stopped_early}
    facts["final_loss"] = round(float(loss.detach()), 4)
    return unet, facts


def assemble(vae: Any, unet: Any, text_encoder: Any, tokenizer: Any) -> Any:
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(
        DDPMScheduler(**SCHEDULE, prediction_type="epsilon").config
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save(pipe: Any, folder: Path) -> None:
    """save_pretrained in fp16 (weights); configs say float32 so a plain load runs on CPU."""
    import json

    pipe.to(torch.float16)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    pipe.to(torch.float32)
    te_config = folder / "text_encoder" / "config.json"
    cfg = json.loads(te_config.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    te_config.write_text(json.dumps(cfg, indent=2) + "\n")


def generate(
    pipe: Any, prompts: list[str], guidance: float, steps: int, seed: int, device: str
) -> np.ndarray:
    """uint8 [N, 64, 64, 3] images, one fixed seed per prompt."""
    gens = [torch.Generator(device=device).manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np")
    return (np.asarray(out.images) * 255).round().clip(0, 255).astype(np.uint8)


def prompt_following(
    pipe: Any, scorer: Any, test: WorldData, cfg: DiffusionConfig, ctx: BuildContext
) -> dict[str, Any]:
    """CLIP-judged accuracy of shape, colour and background in generated images, per CFG scale."""
    attrs = ("shape", "colour", "background")
    n = min(cfg.eval_prompts, len(test))
    prompts, labels = test.captions[:n], {a: test.labels[a][:n] for a in attrs}
    reference = scorer.classify(test.images[:n], attrs)
    out: dict[str, Any] = {
        "prompts": n,
        "steps": cfg.eval_steps,
        "clip_on_real_images": {a: round(float((reference[a] == labels[a]).mean()), 4) for a in attrs},
        "by_guidance": {},
    }
    for g in cfg.guidance_scales:
        images = generate(pipe, prompts, g, cfg.eval_steps, ctx.seed, ctx.device)
        pred = scorer.classify(images, attrs)
        acc = {a: round(float((pred[a] == labels[a]).mean()), 4) for a in attrs}
        acc["all_three"] = round(
            float(np.mean([all(pred[a][i] == labels[a][i] for a in attrs) for i in range(n)])), 4
        )
        out["by_guidance"][str(g)] = acc
    best = max(out["by_guidance"], key=lambda k: out["by_guidance"][k]["all_three"])
    out["recommended_guidance"] = float(best)
    return out


def cpu_seconds_per_image(folder: Path, steps: int, guidance: float, threads: int = 2) -> float:
    """Median wall time of one 64x64 image on ``threads`` CPU threads (pipeline loaded from disk)."""
    from diffusers import DiffusionPipeline

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        times = []
        for i in range(4):
            start = time.perf_counter()
            generate(pipe, ["a small red circle on a blue background"], guidance, steps, i, "cpu")
            times.append(time.perf_counter() - start)
        return round(float(np.median(times[1:])), 3)
    finally:
        torch.set_num_threads(old)


def build(
    data: WorldData, test: WorldData, clip_model: Any, ctx: BuildContext, cfg: DiffusionConfig | None = None
) -> dict:
    """Train the VAE and UNet, assemble and save the pipeline, reload it, measure, write the card."""
    from diffusers import DiffusionPipeline
    from open_clip.tokenizer import SimpleTokenizer

    from studio.world.clip_score import WorldClipScorer

    cfg = cfg or DiffusionConfig()
    if ctx.smoke:
        cfg = replace(
            cfg,
            vae_steps=2,
            vae_batch=8,
            unet_steps=2,
            unet_batch=8,
            eval_prompts=4,
            eval_steps=2,
            guidance_scales=(1.0, 5.0),
        )
    vae_steps, vae_cap = ctx.step_plan(f"{MODEL_NAME}/vae", cfg.vae_steps, cfg.vae_max_seconds)
    unet_steps, unet_cap = ctx.step_plan(f"{MODEL_NAME}/unet", cfg.unet_steps, cfg.unet_max_seconds)
    cfg = replace(
        cfg, vae_steps=vae_steps, vae_max_seconds=vae_cap, unet_steps=unet_steps, unet_max_seconds=unet_cap
    )
    images = torch.from_numpy(data.images).to(ctx.device)
    vae, vae_facts = train_vae(cfg, images, ctx)
    means, stds = encode_all(vae, images, ctx)
    scale = float(1.0 / means[:4096].std())
    vae.register_to_config(scaling_factor=scale)
    vae_facts.update(psnr_db=vae_psnr(vae, test.images, ctx.device), scaling_factor=round(scale, 5))
    ctx.say(f"vae: {vae_facts}")
    text_encoder = clip_recipe.to_transformers(clip_model)
    unet, unet_facts = train_unet(cfg, means, stds, scale, data, text_encoder, ctx)
    folder = ctx.out / MODEL_NAME
    save(assemble(vae, unet, text_encoder, clip_recipe.hf_tokenizer()), folder)
    clip_recipe.save_tokenizer(clip_recipe.hf_tokenizer(), folder / "tokenizer")
    del images, means, stds
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32).to(ctx.device)
    pipe.set_progress_bar_config(disable=True)
    scorer = WorldClipScorer(
        clip_model, SimpleTokenizer(context_length=clip_recipe.CONTEXT_LENGTH), ctx.device, seed=ctx.seed
    )
    follow = prompt_following(pipe, scorer, test, cfg, ctx)
    metrics: dict[str, Any] = {"vae": vae_facts, "unet": unet_facts, "prompt_following": follow}
    metrics["cpu_seconds_per_image"] = cpu_seconds_per_image(folder, 20, follow["recommended_guidance"])
    metrics["params_m"] = {
        "unet": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 3),
        "vae": round(sum(p.numel() for p in pipe.vae.parameters()) / 1e6, 3),
        "text_encoder": round(sum(p.numel() for p in pipe.text_encoder.parameters()) / 1e6, 3),
    }
    metrics["size_mb"] = folder_size_mb(folder)
    write_diffusion_card(folder, cfg, metrics, len(data), ctx)
    ctx.say(f"diffusion: {follow['by_guidance']}")
    return metrics


def write_diffusion_card(
    folder: Path, cfg: DiffusionConfig, m: dict, n_train: int, ctx: BuildContext
) -> None:
    f = m["prompt_following"]
    rows = [
        [g, *(f"{v[a]:.3f}" for a in ("shape", "colour", "background", "all_three"))]
        for g, v in f["by_guidance"].items()
    ]
    ref = f["clip_on_real_images"]
    rows.append(
        [
            "real renders (CLIP's own accuracy)",
            *(f"{ref[a]:.3f}" for a in ("shape", "colour", "background")),
            "-",
        ]
    )
    g = f["recommended_guidance"]
    sections = {
        "Load": "```python\nfrom diffusers import DiffusionPipeline\n"
        f'pipe = DiffusionPipeline.from_pretrained("assets/{MODEL_NAME}")  # StableDiffusionPipeline\n'
        f'image = pipe("a small red circle on a blue background", num_inference_steps=20, guidance_scale={g}).images[0]\n'
        "# or: from studio.world.assets import load_diffusion; pipe = load_diffusion()\n```\n"
        "Output 64x64. Weights are stored in fp16; the pipeline loads in fp32 unless `torch_dtype` says otherwise.",
        "Recipe": f"AutoencoderKL `{VAE_CONFIG['block_out_channels']}` channels, 4x16x16 latents, "
        f"{m['params_m']['vae']}M parameters: MSE + {cfg.vae_kl_weight} x KL, {m['vae']['steps']} steps of "
        f"{cfg.vae_batch} ({m['vae']['train_seconds']} s); reconstruction PSNR {m['vae']['psnr_db']} dB on held-out "
        f"images; latents scaled by {m['vae']['scaling_factor']} (1/std).\n\n"
        f"UNet2DConditionModel `{UNET_CONFIG['block_out_channels']}`, cross-attention to the 128-wide CLIP text "
        f"tokens, {m['params_m']['unet']}M parameters: epsilon prediction, DDPM `scaled_linear` betas "
        f"(0.00085-0.012, 1000 steps), min-SNR-{cfg.snr_gamma} weighting, EMA (warmup power {cfg.ema_power}), AdamW lr "
        f"{cfg.unet_lr} cosine, batch {cfg.unet_batch}, {m['unet']['steps']} steps ({m['unet']['train_seconds']} s, "
        f"bf16 autocast), seed {ctx.seed}. Prompts: full caption with probability {cfg.p_full_caption}, else a short "
        f"form; empty prompt with probability {cfg.p_uncond} (for classifier-free guidance).\n\n"
        f"Text encoder: the small CLIP's (`assets/clip-tiny-world`) text tower, frozen, converted to transformers "
        f"`CLIPTextModel` ({m['params_m']['text_encoder']}M parameters) with open_clip's bundled BPE as "
        '`CLIPTokenizer` (pad token "!" = id 0 like open_clip; identical token ids and hidden states). '
        f"Scheduler: DPMSolverMultistepScheduler.\n\nRebuild: `studio world build --only {MODEL_NAME}` "
        "(needs the CLIP asset; `--only clip-tiny-world,diffusion-tiny` rebuilds both).",
        "Data": f"{n_train} captioned world images (64x64) with their captions.",
        "Measured quality": f"{f['prompts']} held-out captions, one image each (seed i for prompt i), "
        f"{f['steps']} DPM-Solver++ steps; the small CLIP classifies shape, colour and background of each image "
        "zero-shot; accuracy = fraction matching the prompt (chance about "
        "1/#shapes, 1/#colours, 1/#backgrounds).\n\n"
        + table(rows, ["guidance scale", "shape", "colour", "background", "all three"])
        + f"\n\nCPU speed: {m['cpu_seconds_per_image']} s per 64x64 image (20 steps, guidance {g}, 2 threads, "
        "measured on the build machine's CPU).",
    }
    sections["Limits"] = diffusion_limits(cfg, m)
    write_card(
        folder,
        MODEL_NAME,
        "A small text-to-image latent diffusion model trained from scratch on the studio's tiny world.",
        sections,
        m,
    )


def diffusion_limits(cfg: DiffusionConfig, m: dict) -> str:
    lines = []
    for part, steps, cap in (
        ("vae", cfg.vae_steps, cfg.vae_max_seconds),
        ("unet", cfg.unet_steps, cfg.unet_max_seconds),
    ):
        if m[part].get("stopped_early"):
            lines.append(
                f"- The {'VAE' if part == 'vae' else 'UNet'} stopped at its {cap:.0f} s cap after {m[part]['steps']} of {steps} steps."
            )
    best = m["prompt_following"]["by_guidance"][str(m["prompt_following"]["recommended_guidance"])]
    worst = min(("shape", "colour", "background"), key=lambda a: best[a])
    lines.append(f"- Weakest attribute: {worst} ({best[worst]:.3f} at the recommended guidance).")
    lines.append(
        f"- The small VAE ({m['vae']['psnr_db']} dB PSNR) smooths fine textures: the noisy and pixelated styles "
        "come out softer than the renders."
    )
    return "\n".join(lines)
