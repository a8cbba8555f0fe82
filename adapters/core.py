"""Adapter core types: the spec, the branch and host modules, and the method registry.

``adapters.base`` holds the model-level operations (inject / remove / merge / strengths /
state) and re-exports every name here, so ``from adapters.base import AdapterSpec`` keeps
working; the two were one file until it outgrew the small-files rule.

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

    def check_mergeable(self, name: str) -> None:
        """Raise ``AdapterError`` unless branch ``name`` can be folded into the base weight now."""
        branch = self.adapters[name]
        if not branch.mergeable or not hasattr(self.base_layer, "weight"):
            raise AdapterError(f"adapter {name!r} ({type(branch).__name__}) cannot be merged")
        s = self.strengths.get(name, 1.0)
        if isinstance(s, torch.Tensor) and s.numel() != 1:
            raise AdapterError(f"adapter {name!r} has per-sample strengths; set a scalar to merge")

    def merge(self, name: str) -> None:
        self.check_mergeable(name)
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
