"""Training from the Train tab: the project's pipelines when they are installed, else a demo.

``trainers()`` lists what can be started.  The project's recipes run through
``studio.loop.train`` (the one training loop); until that module exists the list holds a
small built-in ``demo-lora`` run (a LoRA on the base UNet, denoising loss on flat
colour images) so the tab works end to end.  Every trainer reports
``on_progress(step, total, loss)``, stops when ``should_stop()`` is true, and returns the
adapter parts the service registers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

from adapters.base import (
    AdapterError,
    adapter_parameters,
    adapter_state_dict,
    get_spec,
    inject,
    mark_only_adapters_trainable,
    remove,
)
from adapters.lora import LoraSpec

OnProgress = Callable[[int, int, float], None]


def trainers() -> dict[str, str]:
    """name -> one-line description."""
    found = {"demo-lora": "LoRA on the base UNet, denoising flat colour images (built-in demo)"}
    try:
        from pipelines import pipelines

        found.update({f"pipeline:{k}": v for k, v in pipelines().items()})
    except (ImportError, AttributeError):
        pass
    return found


def demo_lora(
    pipe: Any, steps: int, on_progress: OnProgress, should_stop: Callable[[], bool], seed: int = 0
) -> dict:
    """A few hundred optimiser steps at most: the adapter learns to push towards flat colours."""
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    name = "_training"
    spec = LoraSpec(targets=["to_q", "to_k", "to_v", "to_out.0"], rank=4, alpha=4.0)
    inject(unet, spec, name)
    try:
        mark_only_adapters_trainable(unet, name)
        opt = torch.optim.AdamW(adapter_parameters(unet, name), lr=1e-3)
        gen = torch.Generator().manual_seed(seed)
        device = next(unet.parameters()).device
        size = pipe.vae.config.sample_size if isinstance(pipe.vae.config.sample_size, int) else 32
        with torch.no_grad():
            ids = pipe.tokenizer(
                [""], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
            ).input_ids.to(device)
            cond = pipe.text_encoder(ids)[0]
        for step in range(steps):
            if should_stop():
                break
            colour = torch.rand(4, 3, 1, 1, generator=gen).expand(4, 3, size, size) * 2 - 1
            with torch.no_grad():
                latents = vae.encode(colour.to(device)).latent_dist.mean * vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=gen).to(device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (4,), generator=gen).to(device)
            noisy = scheduler.add_noise(latents, noise, t)
            pred = unet(noisy, t, encoder_hidden_states=cond.expand(4, -1, -1)).sample
            loss = F.mse_loss(pred, noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
            on_progress(step + 1, steps, loss.item())
        state = {k: v.detach().cpu().clone() for k, v in adapter_state_dict(unet, name).items()}
        spec = get_spec(unet, name)
    finally:
        unet.requires_grad_(False)
        remove(unet, name)
    return {"unet": (spec, state)}


def run_trainer(
    service: Any,
    trainer: str,
    steps: int,
    on_progress: OnProgress,
    should_stop: Callable[[], bool],
    base_model: str = "tiny-sd",
) -> dict:
    """Run ``trainer`` under the service lock and return the adapter parts it produced."""
    if trainer == "demo-lora":
        with service.lock, torch.enable_grad():
            return demo_lora(service.pipeline(base_model), steps, on_progress, should_stop)
    if trainer.startswith("pipeline:"):
        raise AdapterError(
            f"{trainer[9:]}: start project pipelines with `accelerate launch studio/train.py --pipeline "
            f"{trainer[9:]}`; the Train tab runs them once studio.loop reports progress to it"
        )
    raise AdapterError(f"unknown trainer {trainer!r}; available: {', '.join(trainers())}")
