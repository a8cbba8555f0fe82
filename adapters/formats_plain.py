"""Plain LoRA factors: the common ground between the studio, diffusers/PEFT and kohya files.

A foreign file is read into a ``LoraSet`` (component -> module -> down, up, alpha), checked
against the model, and only then turned into one studio ``LoraSpec`` per component and
injected.  Exporting goes the other way through ``LoraLinear.plain_factors``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.base import AdaptedModule, AdapterError, _candidates, get_spec, iter_hosts
from adapters.formats_io import AdapterFileError
from adapters.lora import LoraSpec

#: Pipeline attributes that can carry adapters, in the order a bare-model file is tried.
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class PlainLora:
    """One module's update ``scale * up @ down`` as files store it."""

    #: (r, in) for linear layers, (r, in, kh, kw) for convolutions.
    down: torch.Tensor
    #: (out, r) for linear layers, (out, r, 1, 1) for convolutions.
    up: torch.Tensor
    #: Scale numerator as stored in the file.
    alpha: float
    #: rsLoRA convention: scale = alpha / sqrt(r) instead of alpha / r.
    rslora: bool = False
    #: The file's key of the down tensor, for error messages ("" when made in memory).
    key: str = ""

    def file_key(self, fallback: str, kind: str = "down") -> str:
        if not self.key:
            return fallback
        return (
            self.key.replace("lora_down", "lora_up").replace("lora_A", "lora_B") if kind == "up" else self.key
        )

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclass
class LoraSet:
    """Plain LoRA factors of one adapter, per model component ("" for a bare model)."""

    parts: dict[str, dict[str, PlainLora]]
    #: Training metadata (free-form, JSON-able).
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Base model the adapter was trained on ("" when unknown).
    base_model_id: str = ""


# --------------------------------------------------------------------------- model side


def model_components(model: Any) -> dict[str, nn.Module]:
    """{"": model} for a module, {"unet": ..., "text_encoder": ...} for a pipeline."""
    if isinstance(model, nn.Module):
        return {"": model}
    comps = {n: getattr(model, n) for n in COMPONENTS if isinstance(getattr(model, n, None), nn.Module)}
    if not comps:
        raise AdapterError(
            f"{type(model).__name__} is neither a torch module nor a pipeline with a unet/transformer"
        )
    return comps


def module_names(module: nn.Module) -> dict[str, nn.Module]:
    """Module names as the base model sees them (adapter hosts stand for their base layer)."""
    return dict(_candidates(module))


def assign_components(
    file_parts: list[str], comps: dict[str, nn.Module], modules: dict[str, set[str]], path: Path
) -> dict[str, str]:
    """File component -> model component.  ``modules`` lists each file component's module names."""
    out: dict[str, str] = {}
    for part in file_parts:
        if part in comps:
            out[part] = part
        elif list(comps) == [""]:
            if len(file_parts) > 1:
                others = ", ".join(p or "model" for p in file_parts)
                raise AdapterFileError(
                    f"{path}: the file holds LoRAs for {others} but the model is a single module; "
                    f"load it into the pipeline, or the {part or 'model'} part has nowhere to go"
                )
            out[part] = ""
        elif part == "":
            fits = [
                c
                for c in comps
                if all(real_name(m, (n := set(module_names(comps[c])))) in n for m in modules[part])
            ]
            if not fits:
                raise AdapterFileError(
                    f"{path}: no component of the pipeline ({', '.join(comps)}) has its modules"
                )
            out[part] = fits[0]
        else:
            raise AdapterFileError(
                f"{path}: the file has a LoRA for {part!r} but the model has no such component "
                f"(it has {', '.join(c or 'a single module' for c in comps)})"
            )
    return out


def real_name(name: str, names: dict[str, nn.Module] | set[str]) -> str:
    """``name`` as the model spells it: transformers 5 dropped CLIPTextModel's ``text_model.``
    level, which files written with transformers 4 (and kohya) still carry."""
    if name in names:
        return name
    alt = name.removeprefix("text_model.") if name.startswith("text_model.") else f"text_model.{name}"
    return alt if alt in names else name


def _fit(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Linear factors stored as 1x1 conv kernels (and the reverse) are the same numbers."""
    if tuple(t.shape) != shape and t.numel() == math.prod(shape) and t.shape[:2] == shape[:2]:
        return t.reshape(shape)
    return t


def _checked_factors(
    lo: PlainLora, base: nn.Module, path: Path, fallback: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) shaped for ``base``; a mismatch is an error naming the file's key."""
    if isinstance(base, nn.Linear):
        a_shape, b_shape = (lo.rank, base.in_features), (base.out_features, lo.rank)
    else:
        a_shape = (lo.rank, base.in_channels, *base.kernel_size)
        b_shape = (base.out_channels, lo.rank, 1, 1)
    down, up = _fit(lo.down, a_shape), _fit(lo.up, b_shape)
    for t, want, kind in ((down, a_shape, "down"), (up, b_shape, "up")):
        if tuple(t.shape) != want:
            raise AdapterFileError(
                f"{path}: key {lo.file_key(fallback, kind)!r} has shape {tuple(t.shape)}, the model's "
                f"{type(base).__name__} needs {want}; is this LoRA for another base model?"
            )
    return down, up


def lora_to_studio(
    loras: dict[str, PlainLora], module: nn.Module | None, path: Path, prefix: str
) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """One LoraSpec + tensors that reproduce ``loras`` on ``module`` exactly, checked first.

    Ranks that differ are zero-padded to the largest (zero rows change nothing); a module
    whose scale differs from the spec's has the ratio folded into its up-projection.
    ``module`` None (converting without a model) skips the checks against the model.
    """
    names = module_names(module) if module is not None else {}
    loras = {real_name(m, names): lo for m, lo in loras.items()} if names else loras
    for m in loras if module is not None else ():
        if m not in names:
            raise AdapterFileError(
                f"{path}: key {loras[m].file_key(prefix + m)!r} names a module the model does not have; "
                "is this LoRA for another base model?"
            )
        if not isinstance(names[m], (nn.Linear, nn.Conv2d)):
            raise AdapterFileError(
                f"{path}: key {loras[m].file_key(prefix + m)!r} targets a {type(names[m]).__name__}, "
                "not a linear or conv"
            )
    rank = max(lo.rank for lo in loras.values())
    common = Counter((lo.alpha, lo.rslora) for lo in loras.values() if lo.rank == rank).most_common(1)[0][0]
    spec = LoraSpec(
        targets=[re.escape(m) for m in sorted(loras)], rank=rank, alpha=common[0], use_rslora=common[1]
    )
    state: dict[str, torch.Tensor] = {}
    for m, lo in loras.items():
        down, up = (lo.down, lo.up) if m not in names else _checked_factors(lo, names[m], path, prefix + m)
        if (lo.alpha, lo.rslora) != common or lo.rank != rank:
            up = up * (lo.scale / spec.scale())
        pad = rank - lo.rank
        if pad:
            down = torch.cat([down, down.new_zeros(pad, *down.shape[1:])], 0)
            up = torch.cat([up, up.new_zeros(up.shape[0], pad, *up.shape[2:])], 1)
        state[f"{m}.lora_A"], state[f"{m}.lora_B"] = down, up
    return spec, state


# --------------------------------------------------------------------------- export side


def plain_factors_from_state(spec: LoraSpec, state: dict[str, torch.Tensor]) -> dict[str, PlainLora]:
    """Plain factors of a studio LoRA from its saved tensors alone (no model needed).

    Mirrors ``LoraLinear.plain_factors``: PiSSA becomes rank 2r, a qkv_parts mask is
    applied to the up-projection (out_mask is not saved, it follows from the spec).
    """
    out: dict[str, PlainLora] = {}
    for key in sorted(k for k in state if k.endswith(".lora_A")):
        m = key[: -len(".lora_A")]
        down, up = state[key], state[f"{m}.lora_B"]
        if m.endswith("qkv") and spec.qkv_parts != "qkv" and up.dim() == 2:
            part = up.shape[0] // 3
            mask = torch.zeros(up.shape[0], 1, dtype=up.dtype)
            for i, p in enumerate("qkv"):
                if p in spec.qkv_parts:
                    mask[i * part : (i + 1) * part] = 1
            up = up * mask
        else:
            mask = None
        if spec.init == "pissa":
            b0 = state[f"{m}.pissa_B0"] if mask is None else state[f"{m}.pissa_B0"] * mask
            down, up = torch.cat([down, state[f"{m}.pissa_A0"]], 0), torch.cat([up, -b0], 1)
            out[m] = PlainLora(down, up, spec.scale() * down.shape[0])
        else:
            out[m] = PlainLora(down, up, spec.alpha, spec.use_rslora)
    return out


def model_lora_set(model: Any, name: str) -> LoraSet:
    """Plain factors of adapter ``name`` on a model or pipeline (LoRA-like methods only)."""
    parts: dict[str, dict[str, PlainLora]] = {}
    for comp, module in model_components(model).items():
        hosts: list[tuple[str, AdaptedModule]] = [(n, h) for n, h in iter_hosts(module) if name in h.adapters]
        if not hosts:
            continue
        spec = get_spec(module, name)
        loras: dict[str, PlainLora] = {}
        for mod_name, host in hosts:
            branch = host.adapters[name]
            if not hasattr(branch, "plain_factors"):
                raise AdapterError(
                    f"adapter {name!r} uses method {spec.method!r}, which has no plain LoRA form; "
                    "only LoRA exports to diffusers/kohya files (save it in the studio format instead)"
                )
            down, up, scale = branch.plain_factors()
            if isinstance(spec, LoraSpec) and down.shape[0] == spec.rank:
                loras[mod_name] = PlainLora(down.cpu(), up.cpu(), spec.alpha, spec.use_rslora)
            else:
                loras[mod_name] = PlainLora(down.cpu(), up.cpu(), scale * down.shape[0])
        parts[comp] = loras
    if not parts:
        raise AdapterError(f"no adapter named {name!r} on the model")
    return LoraSet(parts)
