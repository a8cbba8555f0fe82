"""SALT (Elsayed et al. 2025): singular-value scale/shift plus LoRA on the remaining subspace.

For a frozen weight W = U diag(s) V^T (k = min(out, in) singular triplets) SALT trains

- for the top r singular values a scale a and a shift b:  s'_i = ReLU(a_i * s_i + b_i);
- for the remaining k - r directions a low-rank X @ Y in singular-vector coordinates:

    W' = U_r diag(ReLU(a * s_r + b)) V_r^T + U_rest (diag(s_rest) + c * X Y) V_rest^T

where c = lora_alpha / lora_rank.  The branch computes W' - W from the factors,

    delta = U_r diag(ReLU(a s_r + b) - s_r) V_r^T + c * U_rest X Y V_rest^T,

which is exactly zero at init (a = 1, b = 0, Y = 0) because ReLU(s) - s = 0 for s >= 0, so
a fresh adapter is bit-exact identity without relying on the SVD reconstructing W.
Trainable parameters per layer: 2 r + 2 (k - r) lora_rank.  ``lora_rank = 0`` with
``rank_ratio = 1`` is the SVD-only baseline (scale and shift every singular value).

The bases are not saved: they are recomputed from the frozen weight in float64 on the
CPU with a fixed sign convention, so the same weight gives the same bases everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from adapters.base import AdapterError, AdapterLayer, AdapterSpec, iter_hosts, register_method


@dataclass
class SaltSpec(AdapterSpec):
    method = "salt"
    #: Fraction of the k = min(out, in) singular values that get scale and shift (r = ceil(ratio * k)).
    rank_ratio: float = 0.5
    #: Explicit r (overrides rank_ratio when > 0, clipped to k).
    top_rank: int = 0
    #: Rank of the LoRA X @ Y on the remaining k - r directions; 0 disables it.
    lora_rank: int = 4
    #: LoRA scale numerator: c = lora_alpha / lora_rank.
    lora_alpha: float = 4.0
    #: Weight of the regulariser ||W' - W||_F^2 that ``salt_regularizer`` returns (pipelines add it).
    reg_weight: float = 0.0


def top_rank(spec: SaltSpec, k: int) -> int:
    """r for a weight with k singular values."""
    if spec.top_rank > 0:
        return min(spec.top_rank, k)
    if not 0.0 <= spec.rank_ratio <= 1.0:
        raise AdapterError(f"SALT rank_ratio must lie in [0, 1], got {spec.rank_ratio}")
    return min(k, math.ceil(spec.rank_ratio * k))


def parameter_count(out_features: int, in_features: int, spec: SaltSpec) -> int:
    """Trainable parameters SALT adds to one (out x in) weight: 2 r + 2 (k - r) lora_rank."""
    k = min(out_features, in_features)
    r = top_rank(spec, k)
    lora = spec.lora_rank if k > r else 0
    return 2 * r + 2 * (k - r) * lora


def _svd(weight_2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64 on the CPU; each left vector's largest entry is made positive."""
    u, s, vh = torch.linalg.svd(weight_2d.detach().to("cpu", torch.float64), full_matrices=False)
    idx = u.abs().argmax(0)
    sign = torch.sign(u[idx, torch.arange(u.shape[1])])
    sign[sign == 0] = 1
    return u * sign, s, vh.T * sign  # V as columns


class SaltLayer(AdapterLayer):
    """SALT on ``nn.Linear`` (timm ``qkv`` included) and ``nn.Conv2d`` (weight read as out x in*kh*kw)."""

    def __init__(self, base: nn.Module, spec: SaltSpec) -> None:
        super().__init__()
        if spec.lora_rank < 0:
            raise AdapterError(f"SALT lora_rank must be >= 0, got {spec.lora_rank}")
        weight = base.weight
        self.weight_shape = tuple(weight.shape)
        u, s, v = _svd(weight.reshape(weight.shape[0], -1))
        k = s.numel()
        r = top_rank(spec, k)
        rest = k - r
        self.lora_rank = spec.lora_rank if rest > 0 else 0
        self.lora_scale = spec.lora_alpha / spec.lora_rank if self.lora_rank else 0.0
        f32 = torch.float32
        self.register_buffer("u_top", u[:, :r].to(f32), persistent=False)
        self.register_buffer("v_top", v[:, :r].to(f32), persistent=False)
        self.register_buffer("s_top", s[:r].to(f32), persistent=False)
        self.register_buffer("u_rest", u[:, r:].to(f32), persistent=False)
        self.register_buffer("v_rest", v[:, r:].to(f32), persistent=False)
        self.scale = nn.Parameter(torch.ones(r))
        self.shift = nn.Parameter(torch.zeros(r))
        if self.lora_rank:
            self.lora_X = nn.Parameter(torch.empty(rest, self.lora_rank))
            self.lora_Y = nn.Parameter(torch.zeros(self.lora_rank, rest))
            nn.init.kaiming_uniform_(self.lora_X, a=math.sqrt(5))
        self.conv = (
            {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
            if isinstance(base, nn.Conv2d)
            else None
        )

    @classmethod
    def from_module(cls, base: nn.Module, spec: AdapterSpec, name: str) -> SaltLayer | None:
        if not isinstance(spec, SaltSpec) or not isinstance(base, nn.Linear | nn.Conv2d):
            return None
        if isinstance(base, nn.Conv2d) and (base.groups != 1 or base.padding_mode != "zeros"):
            raise AdapterError(f"{name}: SALT supports ungrouped zero-padded convolutions only")
        return cls(base, spec)

    def singular_values(self) -> torch.Tensor:
        """The adapted top-r singular values ReLU(a * s + b) (negative values clamp to 0)."""
        return F.relu(self.scale * self.s_top + self.shift)

    def _top_change(self) -> torch.Tensor:
        return self.singular_values() - self.s_top

    def delta_weight(self) -> torch.Tensor:
        w = (self.u_top * self._top_change()) @ self.v_top.T
        if self.lora_rank:
            w = w + self.lora_scale * (self.u_rest @ self.lora_X) @ (self.lora_Y @ self.v_rest.T)
        return w.reshape(self.weight_shape)

    def delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            out = F.conv2d(x.to(self.scale.dtype), self.delta_weight(), None, **self.conv)
            return out.to(y.dtype)
        h = x.to(self.scale.dtype)
        out = F.linear(F.linear(h, self.v_top.T) * self._top_change(), self.u_top)
        if self.lora_rank:
            z = F.linear(F.linear(h, self.v_rest.T), self.lora_Y)  # Y V_rest^T x
            out = out + self.lora_scale * F.linear(z, self.u_rest @ self.lora_X)
        return out.to(y.dtype)

    def change_norm2(self) -> torch.Tensor:
        """||W' - W||_F^2, exact: U and V have orthonormal columns."""
        total = self._top_change().pow(2).sum()
        if self.lora_rank:
            total = total + (self.lora_scale * self.lora_X @ self.lora_Y).pow(2).sum()
        return total


def salt_layers(model: nn.Module, name: str) -> Iterator[SaltLayer]:
    for _, host in iter_hosts(model):
        branch = host.adapters[name] if name in host.adapters else None
        if isinstance(branch, SaltLayer):
            yield branch


def salt_regularizer(model: nn.Module, name: str, weight: float | None = None) -> torch.Tensor:
    """reg_weight * sum over layers of ||W' - W||_F^2 (reg_weight from the spec unless given)."""
    from adapters.base import get_spec

    if weight is None:
        weight = get_spec(model, name).reg_weight  # type: ignore[attr-defined]
    layers = list(salt_layers(model, name))
    if not layers:
        raise AdapterError(f"no SALT adapter named {name!r} on the model")
    return weight * torch.stack([layer.change_norm2() for layer in layers]).sum()


def matrix_spec(linear: list[str], conv: list[str], blocks: list[str]) -> SaltSpec:
    """Core test matrix: SALT on every linear and conv target."""
    return SaltSpec(targets=linear + conv, rank_ratio=0.5, lora_rank=2, lora_alpha=2.0)


register_method(
    SaltSpec,
    [SaltLayer],
    doc="Scale/shift of top singular values + LoRA on the remaining subspace (mergeable)",
)
