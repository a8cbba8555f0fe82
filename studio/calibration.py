"""Calibration data for 4-bit quantization: a pipeline's real denoiser calls on real prompts.

SVDQuant's smoothing factors come from the activations' outlier channels, which synthetic
inputs do not have; ``record_denoiser_calls`` runs the pipeline on prompts and keeps the
UNet's / transformer's inputs of every sampling step (the CFG batch, uncond + cond, as the
pipeline stacks it), ready for ``adapters.svdquant.quantize_model`` (``model(**call)``).
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Keyword arguments of a denoiser call that change only the output's packaging.
_DROPPED = ("return_dict",)


def parse_prompts(value: str) -> list[str]:
    """Prompts from a text file (one per line) or from ``"a red ball|a blue cube"``."""
    path = Path(value)
    if path.is_file():
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{value}: the calibration prompts file has no prompts (one per line)")
        return prompts
    if value.endswith(".txt") and "|" not in value:
        raise ValueError(f"{value}: no such calibration prompts file")
    prompts = [p.strip() for p in value.split("|") if p.strip()]
    if not prompts:
        raise ValueError("--calib-prompts: no prompts given (a file, or prompts separated by '|')")
    return prompts


def prompts_digest(prompts: list[str]) -> str:
    """Short fingerprint of a prompt list, recorded instead of the (possibly private) text."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def denoiser_of(pipe: Any) -> nn.Module:
    """The pipeline's ``transformer`` or ``unet``."""
    for part in ("transformer", "unet"):
        module = getattr(pipe, part, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"{type(pipe).__name__} has no transformer or unet")


def default_guidance(pipe: Any) -> float | None:
    """The pipeline's default ``guidance_scale`` (what a call without one uses), if it has one."""
    param = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    return None if param is None or param.default is inspect.Parameter.empty else float(param.default)


def _detach(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    return value


@torch.no_grad()
def record_denoiser_calls(
    pipe: Any,
    prompts: list[str],
    steps: int,
    seed: int,
    guidance: float | None = None,
    chunk: int | None = 4,
) -> list[dict[str, Any]]:
    """The denoiser's inputs at every sampling step of ``pipe(prompts)``, as keyword dicts.

    Prompt ``i`` samples from ``torch.Generator().manual_seed(seed + i)``; ``guidance=None``
    keeps the pipeline's default; the pipeline runs ``chunk`` prompts at a time (None: all),
    stopping at the latents (no VAE decode).  Positional arguments are named from the
    denoiser's signature, ``None`` and ``return_dict`` arguments are left out.
    """
    if not prompts:
        raise ValueError("no calibration prompts")
    if steps < 1:
        raise ValueError(f"calibration steps must be >= 1, got {steps}")
    model = denoiser_of(pipe)
    signature = inspect.signature(model.forward)
    device = getattr(pipe, "device", torch.device("cpu"))
    calls: list[dict[str, Any]] = []

    def grab(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = signature.bind_partial(*args, **kwargs).arguments
        calls.append({k: _detach(v) for k, v in bound.items() if v is not None and k not in _DROPPED})

    options: dict[str, Any] = {"num_inference_steps": steps, "output_type": "latent"}
    if guidance is not None:
        options["guidance_scale"] = guidance
    size = chunk or len(prompts)
    handle = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, len(prompts), size):
            part = prompts[start : start + size]
            gens = [torch.Generator(device=device).manual_seed(seed + start + i) for i in range(len(part))]
            pipe(part, generator=gens, **options)
    finally:
        handle.remove()
    return calls
