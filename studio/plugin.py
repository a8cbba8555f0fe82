"""diffusers plug-in: Stable Diffusion with studio adapters, per-timestep strengths, 4-bit path.

``StudioStableDiffusionPipeline`` subclasses ``StableDiffusionPipeline`` and its LoRA
loader mixin and overrides neither: ``load_lora_weights`` / ``set_adapters`` /
``cross_attention_kwargs={"scale": s}`` / ``callback_on_step_end`` / the progress bar
all work as in diffusers.  It adds studio adapters next to them::

    pipe = DiffusionPipeline.from_pretrained(path, custom_pipeline="studio/custom_pipeline/pipeline.py",
                                             trust_remote_code=True)
    pipe = StudioStableDiffusionPipeline.from_pipe(pipe)       # or from an existing pipeline
    pipe.load_studio_adapter("my_lora/", strength=0.8)
    image = pipe("a red circle", studio_schedules={"my_lora": "0:1, 1:0"}).images[0]

``cross_attention_kwargs={"scale": s}`` scales studio adapters as well as PEFT LoRAs.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from torch import nn

from adapters.base import (
    AdapterError,
    AdapterSpec,
    adapter_names,
    get_strengths,
    inject,
    iter_hosts,
    load_adapter_state_dict,
    merge,
    set_strength,
    unmerge,
)
from studio.schedules import StrengthSchedule, step_end_callback

STUDIO_COMPONENTS = ("unet", "text_encoder")


class StudioStableDiffusionPipeline(StableDiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """StableDiffusionPipeline + studio adapters (see the module docstring)."""

    # ------------------------------------------------------------------ adapters
    def _studio_modules(self) -> dict[str, nn.Module]:
        return {
            n: getattr(self, n) for n in STUDIO_COMPONENTS if isinstance(getattr(self, n, None), nn.Module)
        }

    def studio_adapters(self) -> list[str]:
        names: list[str] = []
        for module in self._studio_modules().values():
            names += [n for n in adapter_names(module) if n not in names]
        return names

    def load_studio_adapter(self, path: str, name: str | None = None, strength: float = 1.0) -> str:
        """Load a studio folder, diffusers/PEFT or kohya file (through adapters.formats)."""
        from adapters import formats

        name = formats.load_adapter(self, str(path), name)
        self.set_studio_strength(name, strength)
        return name

    def add_studio_adapter(
        self, name: str, parts: dict[str, tuple[AdapterSpec, dict[str, torch.Tensor]]], strength: float = 1.0
    ) -> str:
        """Add an adapter from (spec, tensors) per component, e.g. {"unet": (LoraSpec(...), state)}."""
        modules = self._studio_modules()
        for comp, (spec, state) in parts.items():
            inject(modules[comp], spec, name)
            load_adapter_state_dict(modules[comp], name, state)
        self.set_studio_strength(name, strength)
        return name

    def set_studio_strength(self, name: str, value: float | torch.Tensor, modules: str | None = None) -> None:
        """Strength of a studio adapter: global, per block (``modules`` regex) or per sample ([B])."""
        count = 0
        for module in self._studio_modules().values():
            if name in adapter_names(module):
                try:
                    count += set_strength(module, name, value, modules)
                except AdapterError:
                    if modules is None:
                        raise
        if count == 0:
            raise AdapterError(f"no studio adapter {name!r} (or none of its layers match {modules!r})")

    def fuse_studio_adapters(self, names: list[str] | None = None) -> None:
        for name in names or self.studio_adapters():
            for module in self._studio_modules().values():
                if name in adapter_names(module):
                    merge(module, name)

    def unfuse_studio_adapters(self, names: list[str] | None = None) -> None:
        for name in names or self.studio_adapters():
            for module in self._studio_modules().values():
                if name in adapter_names(module):
                    unmerge(module, name)

    def quantize_studio(self, **options: Any) -> None:
        """Swap the UNet's linears for the fused 4-bit SVDQuant linear (adapters run inside it)."""
        try:
            from adapters import svdquant
        except ImportError:
            raise AdapterError("the 4-bit path needs adapters.svdquant, which is not installed") from None
        svdquant.quantize_model(self.unet, **options)

    # ------------------------------------------------------------------ sampling
    def __call__(
        self, *args: Any, studio_schedules: dict[str, str | StrengthSchedule] | None = None, **kwargs: Any
    ) -> Any:
        """``StableDiffusionPipeline.__call__`` plus ``studio_schedules`` {adapter: keyframes}."""
        scale = (kwargs.get("cross_attention_kwargs") or {}).get("scale", 1.0)
        schedules = {n: StrengthSchedule.parse(s) for n, s in (studio_schedules or {}).items()}
        unknown = set(schedules) - set(self.studio_adapters())
        if unknown:
            raise AdapterError(f"schedules name unknown studio adapters: {', '.join(sorted(unknown))}")
        if scale == 1.0 and not schedules:
            return super().__call__(*args, **kwargs)
        saved = self._saved_strengths()
        steps = int(kwargs.get("num_inference_steps") or 50)

        def apply(step: int) -> None:
            n = getattr(self, "_num_timesteps", None) or steps
            for (module, name), per_host in saved.items():
                sched = schedules.get(name)
                factor = scale * (sched.at(step, n) if sched is not None else 1.0)
                hosts = dict(iter_hosts(module))
                for host_name, value in per_host.items():
                    hosts[host_name].set_strength(name, value * factor)

        try:
            apply(0)
            if schedules:
                kwargs["callback_on_step_end"] = step_end_callback(
                    apply, steps, kwargs.get("callback_on_step_end")
                )
            return super().__call__(*args, **kwargs)
        finally:
            for (module, name), per_host in saved.items():
                hosts = dict(iter_hosts(module))
                for host_name, value in per_host.items():
                    hosts[host_name].set_strength(name, value)

    def _saved_strengths(self) -> dict[tuple[nn.Module, str], dict[str, Any]]:
        saved = {}
        for module in self._studio_modules().values():
            for name in adapter_names(module):
                strengths = get_strengths(module, name)
                if any(name in h.merged for _, h in iter_hosts(module) if name in h.adapters):
                    raise AdapterError(f"studio adapter {name!r} is fused; unfuse it to scale or schedule it")
                saved[(module, name)] = strengths
        return saved
