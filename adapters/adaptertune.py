"""AdapterTune (Khazem 2026): a zero-initialised residual bottleneck after transformer blocks.

For a block with input x and output y = block(x) the adapted block returns

    y + alpha * up(GELU(down(y)))

with ``down`` Xavier-initialised and ``up`` zero-initialised (weight and bias), so the
adapted network starts exactly at the pretrained function: at step 0 the gradient to
``down`` is exactly zero (it flows through ``up.weight`` = 0) and only ``up`` moves first.
The ``small`` init ablation draws ``up`` from N(0, small_std^2) instead.

The branch is not linear in the block input, so it cannot be merged into a weight.
Placement: every block a target matches, or every k-th / from block ``start`` on (the
block index is the last integer in the module name, e.g. ``blocks.7``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from adapters.base import AdapterError, AdapterLayer, AdapterSpec, register_method


@dataclass
class AdapterTuneSpec(AdapterSpec):
    method = "adaptertune"
    #: Bottleneck width r (paper default 16).
    rank: int = 16
    #: Residual scale alpha on the bottleneck output (paper default 1).
    alpha: float = 1.0
    #: "zero": up-projection zero-initialised (the method); "small": N(0, small_std^2) (ablation).
    init: str = "zero"
    #: Standard deviation of the up-projection under init="small".
    small_std: float = 1e-3
    #: Adapt every k-th matched block (counted from ``start``); 1 adapts all of them.
    every: int = 1
    #: Index of the first block to adapt (e.g. depth // 2 for "second half only").
    start: int = 0
    #: Feature width of the block output; 0 infers it from the block's first LayerNorm.
    dim: int = 0


PLACEMENTS = ("all", "every2", "every3", "first_half", "last_half", "last")


def block_targets(prefix: str, depth: int, placement: str = "all") -> list[str]:
    """Block names for a named placement, e.g. ``block_targets("blocks", 12, "every2")``."""
    picks = {
        "all": range(depth),
        "every2": range(0, depth, 2),
        "every3": range(0, depth, 3),
        "first_half": range(depth // 2),
        "last_half": range(depth // 2, depth),
        "last": range(depth - 1, depth),
    }
    if placement not in picks:
        raise AdapterError(f"unknown placement {placement!r}; use one of {', '.join(PLACEMENTS)}")
    return [f"{prefix}.{i}" for i in picks[placement]]


def _block_dim(block: nn.Module, spec: AdapterTuneSpec) -> int | None:
    if spec.dim:
        return spec.dim
    dim = getattr(block, "dim", None)
    if isinstance(dim, int):
        return dim
    for module in block.modules():
        if isinstance(module, nn.LayerNorm):
            return int(module.normalized_shape[-1])
    return None


def _is_block(block: nn.Module) -> bool:
    """A transformer block: it has attention and an MLP / feed-forward child."""
    names = {n.split(".")[-1] for n, _ in block.named_children()}
    return bool(names & {"attn", "attn1", "attention"}) and bool(names & {"mlp", "ff", "ffn"})


class AdapterTuneBlock(AdapterLayer):
    """The residual bottleneck on one transformer block's output."""

    mergeable = False

    def __init__(self, dim: int, spec: AdapterTuneSpec) -> None:
        super().__init__()
        if spec.rank < 1:
            raise AdapterError(f"AdapterTune rank must be >= 1, got {spec.rank}")
        if spec.init not in ("zero", "small"):
            raise AdapterError(f"AdapterTune init must be 'zero' or 'small', got {spec.init!r}")
        self.alpha = spec.alpha
        self.down = nn.Linear(dim, spec.rank)
        self.up = nn.Linear(spec.rank, dim)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)
        if spec.init == "zero":
            nn.init.zeros_(self.up.weight)
        else:
            nn.init.normal_(self.up.weight, std=spec.small_std)

    @classmethod
    def from_module(cls, base: nn.Module, spec: AdapterSpec, name: str) -> AdapterTuneBlock | None:
        if not isinstance(spec, AdapterTuneSpec) or not _is_block(base):
            return None
        if spec.every < 1 or spec.start < 0:
            raise AdapterError(f"AdapterTune needs every >= 1 and start >= 0, got {spec.every}, {spec.start}")
        index = re.findall(r"\d+", name)
        if index and (int(index[-1]) < spec.start or (int(index[-1]) - spec.start) % spec.every):
            return None
        dim = _block_dim(base, spec)
        if dim is None:
            raise AdapterError(f"{name}: cannot infer the block width; set dim in the AdapterTune spec")
        return cls(dim, spec)

    def delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = y.to(self.down.weight.dtype)
        return (self.alpha * self.up(F.gelu(self.down(h)))).to(y.dtype)


def matrix_spec(linear: list[str], conv: list[str], blocks: list[str]) -> AdapterTuneSpec | None:
    """Core test matrix: AdapterTune acts on transformer blocks (none in the plain MLP)."""
    return AdapterTuneSpec(targets=blocks, rank=4) if blocks else None


register_method(
    AdapterTuneSpec,
    [AdapterTuneBlock],
    doc="Zero-initialised residual bottleneck after transformer blocks (not mergeable)",
)
