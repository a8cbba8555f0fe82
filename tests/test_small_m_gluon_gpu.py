"""The Gluon small-M INT4 product (``studio/kernels/small_m_gluon.py``) against float64.

On a GPU (``pytest -m gpu``): both kernels, odd shapes (rows below 16, K not a multiple of
128, N not a multiple of the column block, splits that leave short or empty runs of groups,
rings deeper than a split's groups).  The sums are fp32 over exact bf16 products: within
1e-5 relative (Frobenius) of the float64 product of the same bf16 activations and codes.
The argument checks run on the CPU too.
"""

from __future__ import annotations

import pytest
import torch

from studio.kernels.reference import dequantize_weight
from studio.kernels.small_m_gluon import w4_small_m_partials_gluon

CASES = [
    # (M, K, N, config)
    (1, 320, 96, ("regs", 64, 1, 4, 1)),
    (7, 3072, 200, ("regs", 128, 3, 4, 2)),
    (16, 704, 128, ("regs", 64, 4, 4, 4)),
    (5, 320, 96, ("async", 64, 2, 4, 3)),
    (16, 3072, 200, ("async", 128, 5, 8, 4)),
    (12, 704, 256, ("async", 256, 16, 8, 6)),
    (16, 12288, 64, ("async", 128, 16, 4, 2)),
    (5, 320, 96, ("left", 64, 2, 4, 3)),
    (16, 3072, 200, ("left", 128, 5, 4, 4)),
    (12, 704, 256, ("left", 256, 16, 8, 6)),
    (16, 12288, 64, ("left", 64, 16, 4, 2)),
]


def _weights(k: int, n: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    kg = -(-k // 64)
    qweight = torch.randint(0, 256, (kg, n, 32), device=device, dtype=torch.uint8, generator=g)
    wscale = torch.rand(kg, n, device=device, generator=g) * 1e-2 + 1e-3
    return qweight, wscale


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,config", CASES)
def test_gluon_partials_match_float64(m: int, k: int, n: int, config: tuple) -> None:
    qweight, wscale = _weights(k, n, "cuda", seed=m + k + n)
    kg = qweight.shape[0]
    xs = torch.zeros(m, kg * 64, device="cuda", dtype=torch.bfloat16)
    xs[:, :k] = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    xs[:, :3] *= 40  # outlier channels
    part = w4_small_m_partials_gluon(xs, qweight, wscale, config)
    assert part.shape == (config[2], m, n)
    want = xs.double() @ dequantize_weight(qweight, wscale, "int4", kg * 64).double().t()
    err = ((part.sum(0).double() - want).norm() / want.norm()).item()
    assert err < 1e-5, f"relative error {err:.2e} at {config}"


def _misfit(change: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arguments of a 128 x 64 layer with one thing wrong (``change``)."""
    qweight, wscale = _weights(128, 64, "cpu", seed=0)
    xs = torch.zeros(17 if change == "rows" else 4, 64 if change == "short xs" else 128, dtype=torch.bfloat16)
    if change == "strided codes":
        qweight = qweight.transpose(1, 2).contiguous().transpose(1, 2)
    if change == "fp64 scales":
        wscale = wscale.double()
    return xs, qweight, wscale


@pytest.mark.parametrize(
    "change,config,match",
    [
        ("rows", ("regs", 64, 1, 4, 1), "at most 16 rows"),
        ("none", ("tma", 64, 1, 4, 1), "kind must be"),
        ("none", ("async", 64, 1, 4, 1), "depth >= 2"),
        ("none", ("left", 64, 1, 8, 2), "a multiple of 16 \\* warps"),
        ("short xs", ("regs", 64, 1, 4, 1), "xs must be bf16"),
        ("strided codes", ("regs", 64, 1, 4, 1), "qweight must be uint8"),
        ("fp64 scales", ("regs", 64, 1, 4, 1), "wscale must be fp32"),
    ],
)
def test_gluon_partials_refuse_bad_arguments(change: str, config: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        w4_small_m_partials_gluon(*_misfit(change), config)
