"""The int4 weight-only baseline a Hopper user would pick: torchao, else torch's own tinygemm op.

torchao's ``Int4WeightOnlyConfig`` with the ``tile_packed_to_4d`` packing runs PyTorch's
tinygemm kernel (``aten._weight_int4pack_mm``: bf16 activations, int4 weights, one bf16
scale and zero point per group).  The device image has no torchao, so the GPU runs carry
its wheel (docs/results.md says which ran).  If torchao does not import or its config API
differs, the same kernel is called through the aten ops directly, so the column still
measures what a torchao user gets.  Weight values do not change the timing: the codes are
random.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: Group size along K, as our 4-bit layer uses.
GROUP = 64
#: tinygemm's inner K tiles (torchao's default on CUDA).
INNER_K_TILES = 8


def error_line(err: Exception, width: int = 120) -> str:
    """``Type: first line of the message`` (cut to ``width``), for a skipped baseline's reason."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0][:width] if lines else ''}"


def _torchao_linear(w: torch.Tensor, bias: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    lin = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(bias)
    quantize_(lin, Int4WeightOnlyConfig(group_size=GROUP, int4_packing_format="tile_packed_to_4d"))
    return lin


def _aten_tinygemm(w: torch.Tensor, bias: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    n, k = w.shape
    codes = torch.randint(0, 16, (n, k), device=w.device, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack(
        (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous(), INNER_K_TILES
    )
    scale_zero = torch.stack(
        [
            torch.rand(k // GROUP, n, device=w.device) * 1e-3,
            torch.randn(k // GROUP, n, device=w.device) * 1e-3,
        ],
        dim=-1,
    ).to(torch.bfloat16)
    bias16 = bias.to(torch.bfloat16)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, scale_zero) + bias16

    return run


def int4_weight_only(w: torch.Tensor, bias: torch.Tensor) -> tuple[Callable | None, str]:
    """``(fn, label)``: ``fn(x [M, K] bf16) -> [M, N] bf16`` for the weight ``w [N, K]``, or ``None``.

    ``label`` names what runs (``torchao x.y`` or ``aten tinygemm``) or why nothing can.
    """
    reasons = []
    try:
        import torchao

        fn = _torchao_linear(w, bias)
        fn(torch.zeros(16, w.shape[1], device=w.device, dtype=torch.bfloat16))
        return (
            fn,
            f"torchao {torchao.__version__} Int4WeightOnlyConfig(group_size={GROUP}, tile_packed_to_4d)",
        )
    except Exception as err:  # noqa: BLE001 - any failure falls back to the aten op, with its reason
        reasons.append(f"torchao: {error_line(err)}")
    try:
        fn = _aten_tinygemm(w, bias)
        fn(torch.zeros(16, w.shape[1], device=w.device, dtype=torch.bfloat16))
        return fn, f"aten tinygemm _weight_int4pack_mm (group {GROUP}); " + reasons[0]
    except Exception as err:  # noqa: BLE001
        reasons.append(f"aten: {error_line(err)}")
    return None, "; ".join(reasons)
