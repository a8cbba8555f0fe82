"""Adapter model operations: inject / remove / merge / strengths / state, on any model.

The types they work on (``AdapterSpec``, ``AdapterLayer``, the ``AdaptedModule`` host) and
the method registry are in ``adapters/core.py``, with the design; every name there is
re-exported here, so ``from adapters.base import AdapterSpec, inject`` works as before.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from adapters.core import AdaptedModule as AdaptedModule
from adapters.core import AdapterError as AdapterError
from adapters.core import AdapterLayer as AdapterLayer
from adapters.core import AdapterSpec as AdapterSpec
from adapters.core import MethodEntry as MethodEntry
from adapters.core import Strength as Strength
from adapters.core import add_layer_class as add_layer_class
from adapters.core import broadcast_strength as broadcast_strength
from adapters.core import get_method as get_method
from adapters.core import methods as methods
from adapters.core import name_matches as name_matches
from adapters.core import register_method as register_method

# --------------------------------------------------------------------------- model ops


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def iter_hosts(model: nn.Module) -> Iterator[tuple[str, AdaptedModule]]:
    """(base-model name, host) for every adapted module."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedModule):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, host in iter_hosts(model):
        names += [n for n in host.adapters if n not in names]
    return names


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules as the base model sees them (hosts stand for their base layer)."""
    skip: set[str] = set()
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, AdaptedModule):
            skip.add(name)
            yield name, module.base_layer
            for sub, m in module.base_layer.named_modules():
                if sub:
                    yield f"{name}.{sub}", m
            continue
        if name:
            yield name, module


def plan_injection(model: nn.Module, spec: AdapterSpec) -> list[tuple[str, AdapterLayer]]:
    """Build (module name, branch) for every target without touching the model.

    Raises AdapterError naming the target patterns that matched no module, or the
    matched modules that no layer class of the method supports.
    """
    entry = get_method(spec.method)
    if not spec.targets:
        raise AdapterError("the adapter spec lists no target modules")
    unmatched = list(spec.targets)
    planned: list[tuple[str, AdapterLayer]] = []
    unsupported: list[str] = []
    for name, module in _candidates(model):
        hits = [t for t in spec.targets if name_matches(name, t)]
        if not hits or any(name_matches(name, e) for e in spec.exclude):
            continue
        branch = None
        for layer_cls in entry.layers:
            branch = layer_cls.from_module(module, spec, name)
            if branch is not None:
                break
        if branch is None:
            # A pattern that also hits containers of supported modules is not an error
            # for those containers; it only counts as matched through supported modules.
            unsupported.append(f"{name} ({type(module).__name__})")
            continue
        planned.append((name, branch))
        unmatched = [t for t in unmatched if t not in hits]
    if unmatched:
        extra = f"; matched but unsupported: {', '.join(unsupported[:8])}" if unsupported else ""
        raise AdapterError(f"target pattern(s) matched no supported module: {', '.join(unmatched)}{extra}")
    return planned


def inject(model: nn.Module, spec: AdapterSpec, name: str = "default") -> list[str]:
    """Attach adapter ``name`` to every module that ``spec`` targets, atomically.

    Either every target gets its branch or the model is left untouched.  Returns the
    adapted module names.
    """
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise AdapterError(f"adapter name {name!r} must use letters, digits, '_' or '-'")
    if hasattr(nn.ModuleDict(), name):  # the hosts keep adapters in ModuleDicts
        raise AdapterError(f"adapter name {name!r} is reserved (an attribute of torch's ModuleDict)")
    if name in adapter_names(model):
        raise AdapterError(f"an adapter named {name!r} is already on the model")
    planned = plan_injection(model, spec)  # raises before any change
    hosts = dict(iter_hosts(model))
    for module_name, branch in planned:
        host = hosts.get(module_name)
        if host is None:
            base = model.get_submodule(module_name)
            host = AdaptedModule(base)
            _set_submodule(model, module_name, host)
            hosts[module_name] = host
        ref = next((p for p in host.base_layer.parameters()), None)
        if ref is not None:
            branch.to(device=ref.device)
        host.adapters[name] = branch
        host.strengths[name] = 1.0
        branch.on_attach(host.base_layer)
    model._studio_specs = {**getattr(model, "_studio_specs", {}), name: spec}  # type: ignore[attr-defined]
    return [m for m, _ in planned]


def get_spec(model: nn.Module, name: str) -> AdapterSpec:
    specs = getattr(model, "_studio_specs", {})
    if name not in specs:
        raise AdapterError(f"no adapter named {name!r} on the model")
    return specs[name]


def _hosts_with(model: nn.Module, name: str) -> list[tuple[str, AdaptedModule]]:
    found = [(n, h) for n, h in iter_hosts(model) if name in h.adapters]
    if not found:
        raise AdapterError(f"no adapter named {name!r} on the model; present: {adapter_names(model)}")
    return found


def remove(model: nn.Module, name: str) -> None:
    """Detach adapter ``name`` (unmerging it first); a host left empty is unwrapped."""
    for module_name, host in _hosts_with(model, name):
        host.unmerge(name)
        host.adapters[name].on_detach(host.base_layer)
        del host.adapters[name]
        host.strengths.pop(name, None)
        if not host.adapters:
            _set_submodule(model, module_name, host.base_layer)
    getattr(model, "_studio_specs", {}).pop(name, None)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter; base weights come back bit-exactly."""
    for name in adapter_names(model):
        remove(model, name)
    return model


def merge(model: nn.Module, name: str) -> None:
    """Fold adapter ``name`` (at its current scalar strength) into the base weights."""
    hosts = _hosts_with(model, name)
    for _, host in hosts:  # check everything first so a refusal changes nothing
        host.check_mergeable(name)
    for _, host in hosts:
        host.merge(name)


def unmerge(model: nn.Module, name: str) -> None:
    for _, host in _hosts_with(model, name):
        host.unmerge(name)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter for good and return the plain base model."""
    for name in adapter_names(model):
        merge(model, name)
    for module_name, host in list(iter_hosts(model)):
        host._weight_backup = None
        host.merged.clear()
        _set_submodule(model, module_name, host.base_layer)
    model._studio_specs = {}  # type: ignore[attr-defined]
    return model


def set_strength(model: nn.Module, name: str, value: Strength, modules: str | None = None) -> int:
    """Set adapter ``name``'s strength, on every layer or on layers matching ``modules``.

    ``value`` is a float, or a 1-D tensor of per-sample strengths (row i of the batch
    uses ``value[i]``).  Returns how many layers changed.
    """
    count = 0
    for module_name, host in _hosts_with(model, name):
        if modules is None or name_matches(module_name, modules):
            host.set_strength(name, value)
            count += 1
    if count == 0:
        raise AdapterError(f"no layer of adapter {name!r} matches {modules!r}")
    return count


def get_strengths(model: nn.Module, name: str) -> dict[str, Strength]:
    return {m: h.strengths.get(name, 1.0) for m, h in _hosts_with(model, name)}


def adapter_parameters(model: nn.Module, name: str | None = None) -> Iterator[nn.Parameter]:
    for _, host in iter_hosts(model):
        for n, branch in host.adapters.items():
            if name is None or n == name:
                yield from branch.parameters()


def mark_only_adapters_trainable(model: nn.Module, name: str | None = None) -> int:
    """Freeze everything but the adapter branches; returns the trainable count."""
    model.requires_grad_(False)
    count = 0
    for p in adapter_parameters(model, name):
        p.requires_grad_(True)
        count += p.numel()
    return count


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors keyed ``<module path>.<tensor name>`` (base-model paths)."""
    out: dict[str, torch.Tensor] = {}
    for module_name, host in _hosts_with(model, name):
        for key, tensor in host.adapters[name].state_dict().items():
            out[f"{module_name}.{key}"] = tensor.detach()
    return out


def load_adapter_state_dict(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors into adapter ``name``; every key and shape is checked before any copy."""
    expected = {k: v for k, v in adapter_state_dict(model, name).items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterError(
            f"adapter tensors do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise AdapterError(
                f"tensor {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key].shape)}"
            )
    with torch.no_grad():
        for key, tensor in state.items():
            expected[key].copy_(tensor.to(expected[key].dtype))
    for _, host in _hosts_with(model, name):
        host.adapters[name].on_strength(host.base_layer, host.strengths.get(name, 1.0))
