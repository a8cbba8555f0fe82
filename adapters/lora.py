"""LoRA (Hu et al. 2021) with rsLoRA scaling and PiSSA-style SVD initialisation.

delta(x) = scale * B(A(dropout(x))), B zero-initialised so a fresh adapter is exact
identity; scale = alpha / rank, or alpha / sqrt(rank) with rsLoRA (Kalajdzievski 2023).

PiSSA (Meng et al. 2024) starts A, B at the top-r singular triplets of W and trains on
the residual W - B0 A0.  Instead of rewriting the frozen weight we keep (A0, B0) as
frozen buffers and compute scale * (B A - B0 A0) x: the same function, the base weight
stays untouched (so unload is bit-exact) and export to plain LoRA files is exact
(rank 2r: [B, -B0] @ [A; A0]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from adapters.base import AdapterError, AdapterLayer, AdapterSpec, register_method


@dataclass
class LoraSpec(AdapterSpec):
    method = "lora"
    #: Rank r of the update B @ A.
    rank: int = 8
    #: Scale numerator: scale = alpha / rank (or alpha / sqrt(rank) with use_rslora).
    alpha: float = 8.0
    #: rsLoRA: divide alpha by sqrt(rank) instead of rank, stable across ranks.
    use_rslora: bool = False
    #: Dropout on the LoRA input during training.
    dropout: float = 0.0
    #: "default": A Kaiming-uniform, B zeros.  "pissa": top-r SVD of W (see module doc).
    init: str = "default"
    #: For a fused timm ``qkv`` linear: which of q, k, v the update may touch.
    qkv_parts: str = "qkv"

    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def _check_spec(spec: LoraSpec) -> None:
    if spec.rank < 1:
        raise AdapterError(f"LoRA rank must be >= 1, got {spec.rank}")
    if spec.init not in ("default", "pissa"):
        raise AdapterError(f"LoRA init must be 'default' or 'pissa', got {spec.init!r}")
    if not spec.qkv_parts or set(spec.qkv_parts) - set("qkv"):
        raise AdapterError(f"qkv_parts must be a subset of 'qkv', got {spec.qkv_parts!r}")


class _LoraBase(AdapterLayer):
    """Shared state: A (down), B (up), optional PiSSA buffers, scale and dropout."""

    def __init__(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], spec: LoraSpec) -> None:
        super().__init__()
        _check_spec(spec)
        self.scale = spec.scale()
        self.lora_A = nn.Parameter(torch.empty(a_shape))
        self.lora_B = nn.Parameter(torch.zeros(b_shape))
        nn.init.kaiming_uniform_(self.lora_A.view(a_shape[0], -1), a=math.sqrt(5))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.pissa = spec.init == "pissa"

    def _pissa_init(self, weight_2d: torch.Tensor, rank: int) -> None:
        """A0 = sqrt(S) V^T / sqrt(scale), B0 = U sqrt(S) / sqrt(scale): scale*B0 A0 = W_r."""
        u, s, vh = torch.linalg.svd(weight_2d.detach().float(), full_matrices=False)
        root = (s[:rank] / self.scale).sqrt()
        a0 = (root[:, None] * vh[:rank]).reshape(self.lora_A.shape)
        b0 = (u[:, :rank] * root[None]).reshape(self.lora_B.shape)
        with torch.no_grad():
            self.lora_A.copy_(a0)
            self.lora_B.copy_(b0)
        # Same memory layout as the parameters, so B A - B0 A0 is exactly 0 at init.
        self.register_buffer("pissa_A0", torch.empty_like(self.lora_A).copy_(a0))
        self.register_buffer("pissa_B0", torch.empty_like(self.lora_B).copy_(b0))


class LoraLinear(_LoraBase):
    """LoRA on ``nn.Linear`` (also diffusers attention projections and timm ``qkv``)."""

    def __init__(self, base: nn.Linear, spec: LoraSpec, out_mask: torch.Tensor | None) -> None:
        super().__init__((spec.rank, base.in_features), (base.out_features, spec.rank), spec)
        # Rows of the fused qkv output that the update may change (None: all).
        self.register_buffer("out_mask", out_mask, persistent=False)
        if self.pissa:
            w = base.weight if out_mask is None else base.weight * out_mask[:, None]
            self._pissa_init(w, spec.rank)

    @classmethod
    def from_module(cls, base: nn.Module, spec: AdapterSpec, name: str) -> LoraLinear | None:
        if not isinstance(base, nn.Linear) or not isinstance(spec, LoraSpec):
            return None
        mask = None
        if name.endswith("qkv") and spec.qkv_parts != "qkv":
            if base.out_features % 3:
                raise AdapterError(
                    f"{name}: qkv linear with {base.out_features} outputs is not 3 equal parts"
                )
            part = base.out_features // 3
            mask = torch.zeros(base.out_features)
            for i, p in enumerate("qkv"):
                if p in spec.qkv_parts:
                    mask[i * part : (i + 1) * part] = 1.0
        return cls(base, spec, mask)

    def _masked(self, b: torch.Tensor) -> torch.Tensor:
        return b if self.out_mask is None else b * self.out_mask[:, None].to(b.dtype)

    def delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        out = F.linear(F.linear(x, self.lora_A), self._masked(self.lora_B))
        if self.pissa:
            out = out - F.linear(F.linear(x, self.pissa_A0), self._masked(self.pissa_B0))
        return (self.scale * out).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        w = self._masked(self.lora_B) @ self.lora_A
        if self.pissa:
            w = w - self._masked(self.pissa_B0) @ self.pissa_A0
        return self.scale * w

    def plain_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(down, up, scale) of an ordinary LoRA with the same delta, for export."""
        down, up = self.lora_A, self._masked(self.lora_B)
        if self.pissa:
            down = torch.cat([down, self.pissa_A0], 0)
            up = torch.cat([up, -self._masked(self.pissa_B0)], 1)
        return down.detach(), up.detach(), self.scale


class LoraConv2d(_LoraBase):
    """LoRA on ``nn.Conv2d`` (1x1 and kxk): A is a kxk conv to r channels, B a 1x1 conv."""

    def __init__(self, base: nn.Conv2d, spec: LoraSpec) -> None:
        kh, kw = base.kernel_size
        super().__init__((spec.rank, base.in_channels, kh, kw), (base.out_channels, spec.rank, 1, 1), spec)
        self.stride, self.padding, self.dilation = base.stride, base.padding, base.dilation
        self.padding_mode = base.padding_mode
        if self.pissa:
            self._pissa_init(base.weight.reshape(base.out_channels, -1), spec.rank)

    @classmethod
    def from_module(cls, base: nn.Module, spec: AdapterSpec, name: str) -> LoraConv2d | None:
        if not isinstance(base, nn.Conv2d) or not isinstance(spec, LoraSpec):
            return None
        if base.groups != 1:
            raise AdapterError(
                f"{name}: LoRA on grouped convolutions (groups={base.groups}) is not supported"
            )
        return cls(base, spec)

    def _conv(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise AdapterError(
                f"LoRA on convolutions with padding_mode={self.padding_mode!r} is not supported"
            )
        h = F.conv2d(x, a, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, b)

    def delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        out = self._conv(x, self.lora_A, self.lora_B)
        if self.pissa:
            out = out - self._conv(x, self.pissa_A0, self.pissa_B0)
        return (self.scale * out).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        def full(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])

        w = full(self.lora_A, self.lora_B)
        if self.pissa:
            w = w - full(self.pissa_A0, self.pissa_B0)
        return self.scale * w

    def plain_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        down, up = self.lora_A, self.lora_B
        if self.pissa:
            down = torch.cat([down, self.pissa_A0], 0)
            up = torch.cat([up, -self.pissa_B0], 1)
        return down.detach(), up.detach(), self.scale


register_method(LoraSpec, [LoraLinear, LoraConv2d], doc="Low-rank update B@A on linear and conv layers")
