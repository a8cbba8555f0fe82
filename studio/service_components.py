"""The pipeline components adapters live on, and what the service does to them.

Listing the adapters on a module, zeroing one, fusing a stack (all or none), and the
4-bit copy of a pipeline that ``StudioService.pipeline(name, "4bit")`` caches.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from adapters.base import AdapterError, merge, remove, unmerge

ADAPTER_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


def components(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline modules that adapters may live on."""
    return {n: getattr(pipe, n) for n in ADAPTER_COMPONENTS if isinstance(getattr(pipe, n, None), nn.Module)}


def _names(module: nn.Module) -> list[str]:
    from adapters.base import adapter_names

    return adapter_names(module)


def _zero(module: nn.Module, name: str) -> None:
    from adapters.base import set_strength

    set_strength(module, name, 0.0)


def _fuse(comps: dict[str, nn.Module], names: set[str]) -> list[str]:
    done: list[str] = []
    try:
        for name in sorted(names):
            for module in comps.values():
                if name in _names(module):
                    merge(module, name)
            done.append(name)
    except Exception:
        for name in done + [n for n in names if n not in done]:
            for module in comps.values():
                if name in _names(module):
                    unmerge(module, name)
        raise
    return done


def quantized_copy(pipe: Any) -> Any:
    """A copy whose UNet linears are SVDQuant 4-bit, calibrated on a short sampling run."""
    try:
        from adapters import svdquant
    except ImportError:
        raise AdapterError("the 4-bit path needs adapters.svdquant, which is not installed yet") from None
    q = copy.deepcopy(pipe)
    for module in components(q).values():
        for name in _names(module):
            remove(module, name)
    calib: list[dict[str, Any]] = []

    def grab(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        sample, t = args[:2] if len(args) >= 2 else (args[0], kwargs["timestep"])
        calib.append(
            {"sample": sample, "timestep": t, "encoder_hidden_states": kwargs["encoder_hidden_states"]}
        )

    handle = q.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        size = 8 * getattr(q, "vae_scale_factor", 8)
        q(
            prompt=["a red circle", "a blue square"],
            num_inference_steps=2,
            height=size,
            width=size,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="latent",
        )
    finally:
        handle.remove()
    svdquant.quantize_model(q.unet, calib, forward=lambda m, b: m(**b))
    return q
