"""LoRA on a 4-bit ``SVDQuantLinear``: fused into its low-rank branch, no re-quantization.

The branch keeps ordinary ``lora_A [r, K]`` / ``lora_B [N, r]`` parameters (same keys as
``LoraLinear``, so adapter files are interchangeable).  On attach the 4-bit layer
concatenates ``(A, scale * B)`` onto its SVD branch; a strength is written into that
layer's per-rank strength columns (scalar, or one row per sample); detaching rebuilds the
branch from the SVD part and the remaining LoRAs, giving back the exact previous tensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from adapters.base import AdapterError, AdapterLayer, AdapterSpec, Strength, add_layer_class
from adapters.lora import LoraSpec
from adapters.svdquant import SVDQuantLinear
from studio.kernels.reference import strength_rows


class SVDQuantLoraLayer(AdapterLayer):
    """A LoRA whose maths runs inside the fused 4-bit kernel (``fused_into_base``)."""

    mergeable = False
    fused_into_base = True

    def __init__(self, base: SVDQuantLinear, spec: LoraSpec) -> None:
        super().__init__()
        self.rank = spec.rank
        self.scale = spec.scale()
        self.lora_A = nn.Parameter(torch.empty(spec.rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, spec.rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.current_strength: Strength = 1.0
        self.columns = (0, 0)  # this branch's columns in the host layer's l1 / l2 / strength
        self.synced_version: tuple[int, ...] | None = None

    @classmethod
    def from_module(cls, base: nn.Module, spec: AdapterSpec, name: str) -> SVDQuantLoraLayer | None:
        if not isinstance(base, SVDQuantLinear) or not isinstance(spec, LoraSpec):
            return None
        if spec.rank < 1:
            raise AdapterError(f"LoRA rank must be >= 1, got {spec.rank}")
        if spec.init != "default" or spec.qkv_parts != "qkv":
            raise AdapterError(
                f"{name}: a 4-bit layer takes plain LoRAs only (init='default', qkv_parts='qkv')"
            )
        return cls(base, spec)

    # -- what the host layer reads
    def fused_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.detach(), self.lora_B.detach() * self.scale

    def param_version(self) -> tuple[int, ...]:
        a, b = self.lora_A, self.lora_B
        return (a._version, b._version, a.data_ptr(), b.data_ptr())

    def scalar_strength(self) -> bool:
        s = self.current_strength
        return not isinstance(s, torch.Tensor) or s.numel() == 1

    def requires_grad(self) -> bool:
        return self.lora_A.requires_grad or self.lora_B.requires_grad

    # -- hooks from the adapter core
    def on_attach(self, base: nn.Module) -> None:
        assert isinstance(base, SVDQuantLinear)
        self.to(base.svd_down.device)  # the 4-bit layer has buffers only, so inject cannot place us
        base.attach_branch(self)

    def on_detach(self, base: nn.Module) -> None:
        assert isinstance(base, SVDQuantLinear)
        base.detach_branch(self)

    def on_strength(self, base: nn.Module, strength: Strength) -> None:
        assert isinstance(base, SVDQuantLinear)
        self.current_strength = strength
        base.write_strength(self, strength)

    # -- unfused maths (training through autograd, and the tests' oracle)
    def delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.scale * F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)).to(
            y.dtype
        )

    def unfused_delta(self, x2: torch.Tensor, rows_per_sample: int) -> torch.Tensor:
        """Strength-scaled delta on flattened rows ``x2 [M, K]``."""
        d = self.delta(x2, x2)
        s = self.current_strength
        if isinstance(s, torch.Tensor) and s.numel() > 1:
            rows = strength_rows(x2.shape[0], rows_per_sample, s.numel()).to(x2.device)
            return d * s.to(d)[rows][:, None]
        return d * float(s)


add_layer_class("lora", SVDQuantLoraLayer, first=True)
