"""Inputs of the small-M kernel tests, shared by the interpreter (CPU) and GPU suites."""

from __future__ import annotations

import torch


def small_m_case(m: int, k: int, n: int, r: int, fmt: str, seed: int = 0, device: str = "cpu") -> tuple:
    """``w4_linear``'s arguments for an ``[m, k]`` input and an ``n x k`` 4-bit layer of rank ``r``:
    three outlier input channels (40x), smoothing in [0.5, 1.5), two strength rows (one per
    half of the rows), a bias; drawn from ``device``'s generator seeded with ``seed``."""
    from studio.kernels import reference as ref

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
    x[:, :3] *= 40
    sinv = torch.rand(k, device=device, generator=g) + 0.5
    l1 = (torch.randn(k, r, device=device, generator=g) * 0.05).to(torch.bfloat16)
    l2 = (torch.randn(n, r, device=device, generator=g) * 0.05).to(torch.bfloat16)
    strength = torch.rand(2, r, device=device, generator=g)
    qw, ws = ref.quantize_weight(torch.randn(n, k, device=device, generator=g), fmt)
    bias = torch.randn(n, device=device, generator=g)
    return x, sinv, qw, ws, fmt, l1, l2, strength, max(1, m // 2), bias


def module_args(q, x: torch.Tensor, rows_per_sample: int = 1) -> tuple:
    """``w4_linear``'s arguments for an ``SVDQuantLinear`` ``q`` (its branch rebuilt first) on
    ``x [M, K]``, the bias in fp32."""
    q.rebuild_branch()
    return (
        x, q.smooth_inv, q.qweight, q.wscale, q.fmt, q.l1, q.l2, q.strength, rows_per_sample, q.bias.float(),
    )  # fmt: skip


def fragment_order_index(device: str = "cpu") -> torch.Tensor:
    """The column of each half group (``0 .. 31``) that index ``k' = 16s + 8t + 2q + b`` holds
    in ``small_m_triton._fragment_order``'s order: ``8q + 4s + 2t + b``, written out here as the
    tests' independent oracle (the kernel gets it by a reshape and a permute)."""
    kp = torch.arange(32, device=device)
    return 8 * ((kp >> 1) & 3) + 4 * (kp >> 4) + 2 * ((kp >> 3) & 1) + (kp & 1)
