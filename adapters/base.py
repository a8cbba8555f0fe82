"""Adapter core: specs, the method registry, and inject / remove / merge / strengths.

Shape of the design (PEFT-like, with one change): a targeted module is replaced by an
``AdaptedModule`` host that keeps the original module as ``base_layer`` and holds any
number of named ``AdapterLayer`` branches, one per adapter.  The host computes

    y = base(x) + sum_a strength_a * branch_a.delta(x, y)

so several adapters live on one model, each with its own strength, and a strength may
be a scalar or a per-sample vector (row i of the batch uses s[i]) without re-merging.
Branches whose maths is fused into the base module (the 4-bit SVDQuant linear) set
``fused_into_base`` and receive strength changes through ``on_strength``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

Strength = float | torch.Tensor


class AdapterError(ValueError):
    """A user-facing adapter problem (bad target, name clash, unmergeable, ...)."""


# --------------------------------------------------------------------------- specs


@dataclass
class AdapterSpec:
    """Base spec: what to target.  Each method subclasses it with its own options."""

    method: ClassVar[str] = "base"
    #: Module names to adapt.  A plain name matches a module whose dotted path equals it
    #: or ends with ``.name``; a string with regex characters must ``re.fullmatch``.
    targets: list[str] = field(default_factory=list)
    #: Module names (same rules) to leave alone even when a target matches them.
    exclude: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterSpec:
        data = dict(data)
        method = data.pop("method", cls.method)
        spec_cls = get_method(method).spec if cls is AdapterSpec else cls
        known = {f.name for f in dataclasses.fields(spec_cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterError(f"unknown option(s) for method {method!r}: {', '.join(unknown)}")
        return spec_cls(**data)


_REGEX_CHARS = set("*+?[](){}|^$\\")


def name_matches(name: str, pattern: str) -> bool:
    """Suffix match for plain names, ``re.fullmatch`` for patterns with regex characters."""
    if _REGEX_CHARS & set(pattern):
        return re.fullmatch(pattern, name) is not None
    return name == pattern or name.endswith("." + pattern)


# --------------------------------------------------------------------------- layers


class AdapterLayer(nn.Module):
    """One adapter's branch on one module.  Subclasses implement the method's maths.

    Contract: ``delta(x, y)`` is the change to the module output ``y = base(x)`` at
    strength 1, zero for a fresh adapter; ``delta_weight()`` is the same change as a
    weight update (shape of ``base.weight``) when the method is linear in ``x``.
    """

    #: True when ``delta_weight`` exists (the branch can be merged into the base weight).
    mergeable: ClassVar[bool] = True
    #: True when the base module itself computes this branch (fused kernels).
    fused_into_base: ClassVar[bool] = False

    @classmethod
    def from_module(cls, base: nn.Module, spec: AdapterSpec, name: str) -> AdapterLayer | None:
        """Build a branch for ``base`` or return None when this class does not apply."""
        raise NotImplementedError

    def delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        raise AdapterError(f"{type(self).__name__} cannot be merged into the base weight")

    def on_attach(self, base: nn.Module) -> None:
        """Called once the branch is attached (fused branches register with the base)."""

    def on_detach(self, base: nn.Module) -> None:
        """Called when the branch is removed."""

    def on_strength(self, base: nn.Module, strength: Strength) -> None:
        """Called when the strength changes (fused branches forward it to the base)."""


def broadcast_strength(strength: Strength, delta: torch.Tensor) -> Strength:
    """Shape a per-sample strength vector ``[B]`` to multiply ``delta`` of batch ``k*B``.

    Pipelines that stack the batch (classifier-free guidance stacks [uncond, cond]) call
    the model on ``k`` copies of the batch; the vector is tiled to match.
    """
    if not isinstance(strength, torch.Tensor) or strength.dim() == 0:
        return strength
    batch = delta.shape[0]
    if batch % strength.numel():
        raise AdapterError(
            f"per-sample strengths have {strength.numel()} entries but the batch has {batch} rows"
        )
    s = strength.to(device=delta.device, dtype=delta.dtype).repeat(batch // strength.numel())
    return s.view(batch, *([1] * (delta.dim() - 1)))


class AdaptedModule(nn.Module):
    """Host that wraps a base module and the named adapter branches placed on it."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.strengths: dict[str, Strength] = {}
        self.merged: list[str] = []
        self._weight_backup: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        # Models that read attributes of a wrapped block (diffusers' DiT reads
        # ``transformer_blocks[0].norm1``) see through the host to the base module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # -- the forward pass
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        y = self.base_layer(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        out = y
        for name, branch in self.adapters.items():
            if name in self.merged or branch.fused_into_base:
                continue
            s = self.strengths.get(name, 1.0)
            if not isinstance(s, torch.Tensor) and s == 0.0:
                continue
            d = branch.delta(x, y)
            out = out + broadcast_strength(s, d) * d
        return out

    # -- strengths
    def set_strength(self, name: str, value: Strength) -> None:
        if name in self.merged:
            raise AdapterError(f"adapter {name!r} is merged; unmerge it before changing its strength")
        self.strengths[name] = value
        self.adapters[name].on_strength(self.base_layer, value)

    # -- merge: the weight is always rebuilt from an exact backup, so unmerge is bit-exact
    def _rebuild_weight(self) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            if not self.merged:
                if self._weight_backup is not None:
                    weight.copy_(self._weight_backup)
                    self._weight_backup = None
                return
            if self._weight_backup is None:
                self._weight_backup = weight.detach().clone()
            total = self._weight_backup.float()
            for name in self.merged:
                s = self.strengths.get(name, 1.0)
                total = total + float(s) * self.adapters[name].delta_weight().float()
            weight.copy_(total.to(weight.dtype))

    def merge(self, name: str) -> None:
        branch = self.adapters[name]
        if not branch.mergeable or not hasattr(self.base_layer, "weight"):
            raise AdapterError(f"adapter {name!r} ({type(branch).__name__}) cannot be merged")
        s = self.strengths.get(name, 1.0)
        if isinstance(s, torch.Tensor) and s.numel() != 1:
            raise AdapterError(f"adapter {name!r} has per-sample strengths; set a scalar to merge")
        if name not in self.merged:
            self.merged.append(name)
            self._rebuild_weight()

    def unmerge(self, name: str) -> None:
        if name in self.merged:
            self.merged.remove(name)
            self._rebuild_weight()


# --------------------------------------------------------------------------- registry


@dataclass
class MethodEntry:
    name: str
    spec: type[AdapterSpec]
    layers: list[type[AdapterLayer]]
    doc: str = ""


_METHODS: dict[str, MethodEntry] = {}


def register_method(spec: type[AdapterSpec], layers: list[type[AdapterLayer]], doc: str = "") -> None:
    """Register a method: its spec class and its layer classes, asked in order."""
    _METHODS[spec.method] = MethodEntry(spec.method, spec, list(layers), doc)


def add_layer_class(method: str, layer: type[AdapterLayer], first: bool = True) -> None:
    """Let another module (e.g. the 4-bit linear) teach a method a new layer type."""
    layers = get_method(method).layers
    if layer not in layers:
        layers.insert(0 if first else len(layers), layer)


def get_method(method: str) -> MethodEntry:
    import adapters  # noqa: F401  (registers the built-in methods)

    if method not in _METHODS:
        raise AdapterError(f"unknown adapter method {method!r}; known: {', '.join(sorted(_METHODS))}")
    return _METHODS[method]


def methods() -> dict[str, MethodEntry]:
    import adapters  # noqa: F401

    return dict(_METHODS)


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
        branch = host.adapters[name]
        if not branch.mergeable or not hasattr(host.base_layer, "weight"):
            raise AdapterError(f"adapter {name!r} ({type(branch).__name__}) cannot be merged")
        s = host.strengths.get(name, 1.0)
        if isinstance(s, torch.Tensor) and s.numel() != 1:
            raise AdapterError(f"adapter {name!r} has per-sample strengths; set a scalar to merge")
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
