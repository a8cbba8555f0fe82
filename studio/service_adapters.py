"""Adapter records kept by the service: snapshot, re-inject, inspect, compress.

A record holds each component's spec and tensors as captured the first time the adapter
was loaded, so the service can place the same adapter on any base pipeline it caches
(and on the 4-bit copy) without reading the file again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapters.base import (
    AdapterError,
    AdapterSpec,
    adapter_names,
    adapter_state_dict,
    get_spec,
    inject,
    iter_hosts,
    load_adapter_state_dict,
)
from studio.service_types import AdapterInfo


@dataclass
class AdapterRecord:
    """A loaded adapter, independent of any pipeline."""

    name: str
    #: component name ("unet", "text_encoder", ...) -> (spec, tensors)
    parts: dict[str, tuple[AdapterSpec, dict[str, torch.Tensor]]]
    #: File or folder it came from ("" when made in memory).
    path: str = ""
    base_model: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def capture(cls, components: dict[str, nn.Module], name: str, **kw: Any) -> AdapterRecord:
        parts = {}
        for comp, module in components.items():
            if name in adapter_names(module):
                state = {k: v.detach().cpu().clone() for k, v in adapter_state_dict(module, name).items()}
                parts[comp] = (get_spec(module, name), state)
        if not parts:
            raise AdapterError(f"adapter {name!r} is on no component of the pipeline")
        return cls(name, parts, **kw)

    def place(self, components: dict[str, nn.Module]) -> None:
        """Inject this adapter into the matching components (atomically over components)."""
        done: list[nn.Module] = []
        try:
            for comp, (spec, state) in self.parts.items():
                if comp not in components:
                    raise AdapterError(f"adapter {self.name!r} needs a {comp} the base model does not have")
                module = components[comp]
                if self.name in adapter_names(module):
                    continue
                inject(module, spec, self.name)
                done.append(module)
                load_adapter_state_dict(module, self.name, state)
                for _, host in iter_hosts(module):
                    if self.name in host.adapters:
                        host.set_strength(self.name, 0.0)
        except Exception:
            from adapters.base import remove

            for module in done:
                remove(module, self.name)
            raise

    def info(self, loaded: bool = True) -> AdapterInfo:
        specs = [spec for spec, _ in self.parts.values()]
        size = sum(t.numel() * t.element_size() for _, st in self.parts.values() for t in st.values())
        modules = sorted({k.rsplit(".", 1)[0] for _, st in self.parts.values() for k in st})
        return AdapterInfo(
            name=self.name,
            method=specs[0].method,
            rank=getattr(specs[0], "rank", None),
            targets=sorted({t for s in specs for t in s.targets}),
            size_bytes=size,
            base_model=self.base_model,
            path=self.path,
            loaded=loaded,
            metadata={**self.metadata, "modules": len(modules), "components": sorted(self.parts)},
        )


def compress_record(
    record: AdapterRecord, rank: int, new_name: str
) -> tuple[AdapterRecord, dict[str, float]]:
    """Truncated SVD of every layer's update to ``rank`` (LoRA-Squeeze style).

    Returns the new LoRA record and the relative Frobenius error per layer plus "mean"
    and "max".  Works on any mergeable method (the update is read back as a weight).
    """
    from adapters.lora import LoraSpec

    if rank < 1:
        raise AdapterError(f"rank must be >= 1, got {rank}")
    errors: dict[str, float] = {}
    parts: dict[str, tuple[AdapterSpec, dict[str, torch.Tensor]]] = {}
    for comp, (spec, state) in record.parts.items():
        inject_on = _rebuild(spec, state)
        new_state: dict[str, torch.Tensor] = {}
        old = spec.to_dict()
        old.pop("method")
        keep = {f.name for f in dataclasses.fields(LoraSpec)}
        new_spec = LoraSpec(
            **{k: v for k, v in old.items() if k in keep and k not in ("rank", "alpha", "init")}
        )
        new_spec.rank, new_spec.alpha, new_spec.init, new_spec.use_rslora = (
            rank,
            float(rank),
            "default",
            False,
        )
        for module_name, branch in inject_on:
            dw = branch.delta_weight().detach().float()
            flat = dw.reshape(dw.shape[0], -1)
            u, s, vh = torch.linalg.svd(flat, full_matrices=False)
            r = min(rank, s.numel())
            root = s[:r].sqrt()
            up = torch.zeros(flat.shape[0], rank)
            down = torch.zeros(rank, flat.shape[1])
            up[:, :r] = u[:, :r] * root
            down[:r] = root[:, None] * vh[:r]
            approx = up @ down
            norm = flat.norm().item()
            errors[f"{comp}.{module_name}"] = (flat - approx).norm().item() / norm if norm > 0 else 0.0
            if dw.dim() == 4:  # conv: A is k x k to r channels, B is 1x1
                down = down.reshape(rank, *dw.shape[1:])
                up = up.reshape(dw.shape[0], rank, 1, 1)
            new_state[f"{module_name}.lora_A"] = down.contiguous()
            new_state[f"{module_name}.lora_B"] = up.contiguous()
        parts[comp] = (new_spec, new_state)
    values = list(errors.values()) or [0.0]
    summary = {"mean": sum(values) / len(values), "max": max(values), **errors}
    meta = {**record.metadata, "compressed_from": record.name, "compressed_rank": rank}
    return AdapterRecord(new_name, parts, path="", base_model=record.base_model, metadata=meta), summary


def _rebuild(spec: AdapterSpec, state: dict[str, torch.Tensor]) -> list:
    """Recreate each branch from its tensors only (the update does not depend on W for plain LoRA)."""
    from adapters.base import get_method

    modules = sorted({k.rsplit(".", 1)[0] for k in state})
    out = []
    for module_name in modules:
        a = state.get(f"{module_name}.lora_A")
        b = state.get(f"{module_name}.lora_B")
        if a is None or b is None or "pissa" in " ".join(k for k in state if k.startswith(module_name + ".")):
            raise AdapterError(f"compression supports plain LoRA layers; {module_name} is not one")
        base: nn.Module
        if a.dim() == 4:
            base = nn.Conv2d(a.shape[1], b.shape[0], tuple(a.shape[2:]), bias=False)
        else:
            base = nn.Linear(a.shape[1], b.shape[0], bias=False)
        branch = None
        for layer_cls in get_method(spec.method).layers:
            branch = layer_cls.from_module(base, spec, module_name)
            if branch is not None:
                break
        if branch is None:
            raise AdapterError(f"cannot rebuild {module_name} for compression")
        sub = {k[len(module_name) + 1 :]: v for k, v in state.items() if k.startswith(module_name + ".")}
        branch.load_state_dict(sub, strict=False)
        out.append((module_name, branch))
    return out
