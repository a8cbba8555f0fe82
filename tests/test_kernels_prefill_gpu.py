"""The large-M path's Triton kernels vs reference_prefill.py (run on a GPU: ``pytest -m gpu``).

Tolerances as in test_kernels_gpu.py: FP8 codes bit-equal to the reference on >= 99.9 %
of entries (fp32 division may round differently by an ulp, moving a code by one FP8
step), scales to 1e-5, the layer's bf16 output within 1e-2 of the float32 reference.
"""

from __future__ import annotations

import pytest
import torch
import triton

from studio.kernels import reference as ref
from studio.kernels import reference_prefill as rp
from studio.kernels.prefill_triton import (
    _expand_weight_kernel,
    _rowwise_prepass_kernel,
    expand_weight_triton,
    fits_prepass,
    quantize_act_rowwise_triton,
    w4_linear_prefill_triton,
)
from studio.kernels.prepass_split_triton import (
    _row_codes_kernel,
    _row_stats_kernel,
    branch_by_cublas,
    quantize_act_rowwise_split_triton,
)

pytestmark = pytest.mark.gpu


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _same_codes(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float8_e4m3fn
    return (a.view(torch.uint8) == b.view(torch.uint8)).float().mean().item()


def _same_values(a: torch.Tensor, b: torch.Tensor) -> float:
    """As ``_same_codes`` but +0 and -0 count as equal: with one scale for all rows more small
    branch values round to zero, and the sign of such a zero differs between the kernel and
    torch (0.1-0.3 % of codes, all in the branch columns, on H100)."""
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float8_e4m3fn
    return (a.float() == b.float()).float().mean().item()


def _case(m: int, k: int, n: int, r: int, s: int, fmt: str, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    x[:, :3] *= 40
    sinv = torch.rand(k, device="cuda", generator=g) + 0.5
    l1 = (torch.randn(k, r, device="cuda", generator=g) * 0.05).to(torch.bfloat16)
    l2 = (torch.randn(n, r, device="cuda", generator=g) * 0.05).to(torch.bfloat16)
    strength = torch.rand(s, r, device="cuda", generator=g) * 2 - 0.5
    qw, ws = ref.quantize_weight(torch.randn(n, k, device="cuda", generator=g), fmt)
    bias = torch.randn(n, device="cuda", generator=g)
    return x, sinv, l1, l2, strength, qw, ws, bias


SHAPES = [  # (M, K, N, R): M off the tiles, K off 64 and 128, ranks 0..160
    (1, 200, 72, 16),
    (129, 320, 136, 48),
    (300, 1000, 520, 0),
    (1029, 448, 1100, 160),  # x @ l1 from cuBLAS (many ranks: prepass_split_triton.branch_by_cublas)
    (520, 448, 208, 96),  # the statistics launch's own 128-wide dot
    (4608, 3072, 3072, 96),  # cuBLAS again (many rows)
]


@pytest.mark.parametrize("fmt", ["int4", "fp4"])
@pytest.mark.parametrize("m,k,n,r", SHAPES)
def test_kernels_match_reference(fmt: str, m: int, k: int, n: int, r: int) -> None:
    x, sinv, l1, l2, strength, qw, ws, bias = _case(m, k, n, r, 3, fmt, seed=m + n)
    rows = max(1, m // 3)
    bound = rp.branch_bound(l1, sinv) if r else torch.zeros(1, device="cuda")
    g, cs = rp.prefill_scales(l1, l2, sinv, ws, fmt, strength)
    wq, cs_t, g_t = expand_weight_triton(qw, ws, fmt, l2, bound, rp.residual_max(ws, fmt), strength)
    assert _rel(cs_t, cs) < 1e-6 and (r == 0 or _rel(g_t, g[:r]) < 1e-6)
    assert _same_codes(wq, rp.expand_weight(qw, ws, fmt, l2, g, cs)) >= 0.999, (
        _expand_weight_kernel.best_config
    )
    xq, sx = quantize_act_rowwise_triton(x, sinv, l1, strength, rows, g)
    xq_r, sx_r = rp.quantize_act_rowwise(x, sinv, l1, strength, rows, g)
    assert _rel(sx, sx_r) < 1e-6
    assert _same_codes(xq, xq_r) >= 0.999, _rowwise_prepass_kernel.best_config
    out = w4_linear_prefill_triton(x, sinv, qw, ws, fmt, l1, l2, strength, rows, bias)
    expect = rp.w4_linear_prefill(x.float(), sinv, qw, ws, fmt, l1, l2, strength, rows, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n) and torch.isfinite(out).all()
    assert _rel(out, expect) < 1e-2


@pytest.mark.parametrize("cfg", [c.all_kwargs() for c in _rowwise_prepass_kernel.configs], ids=str)
def test_prepass_every_config(cfg: dict) -> None:
    if not fits_prepass(triton.Config(cfg), 256):
        pytest.skip("pruned for R_PAD = 256 (shared memory); autotuning never runs it there")
    x, sinv, l1, _, strength, _, _, _ = _case(1029, 448, 64, 160, 3, "int4", seed=5)
    g = torch.rand(160, device="cuda") + 0.5
    xq, sx = quantize_act_rowwise_triton(x, sinv, l1, strength, 171, g, config=cfg)
    xq_r, sx_r = rp.quantize_act_rowwise(x, sinv, l1, strength, 171, g)
    assert _rel(sx, sx_r) < 1e-6 and _same_codes(xq, xq_r) >= 0.999


@pytest.mark.parametrize("cfg", [c.all_kwargs() for c in _expand_weight_kernel.configs], ids=str)
def test_expand_every_config(cfg: dict) -> None:
    _, sinv, l1, l2, strength, qw, ws, _ = _case(8, 1000, 520, 48, 2, "fp4", seed=6)
    g, cs = rp.prefill_scales(l1, l2, sinv, ws, "fp4", strength)
    bound, wmax = rp.branch_bound(l1, sinv), rp.residual_max(ws, "fp4")
    wq, _, _ = expand_weight_triton(qw, ws, "fp4", l2, bound, wmax, strength, config=cfg)
    assert _same_codes(wq, rp.expand_weight(qw, ws, "fp4", l2, g, cs)) >= 0.999


@pytest.mark.parametrize("m,k,n,r", SHAPES)
def test_split_prepass_matches_reference(m: int, k: int, n: int, r: int) -> None:
    x, sinv, l1, l2, strength, qw, ws, bias = _case(m, k, n, r, 3, "fp4", seed=m + 1)
    rows = max(1, m // 3)
    g, _ = rp.prefill_scales(l1, l2, sinv, ws, "fp4", strength)
    xq, sx = quantize_act_rowwise_split_triton(x, sinv, l1, strength, rows, g)
    xq_r, sx_r = rp.quantize_act_rowwise(x, sinv, l1, strength, rows, g)
    assert _rel(sx, sx_r) < 1e-6
    assert _same_codes(xq, xq_r) >= 0.999, (_row_stats_kernel.best_config, _row_codes_kernel.best_config)
    out = w4_linear_prefill_triton(x, sinv, qw, ws, "fp4", l1, l2, strength, rows, bias, prepass="split")
    expect = rp.w4_linear_prefill(x.float(), sinv, qw, ws, "fp4", l1, l2, strength, rows, bias)
    assert out.shape == (m, n) and _rel(out, expect) < 1e-2


_STATS = [c.all_kwargs() for c in _row_stats_kernel.configs]
_CODES = [c.all_kwargs() for c in _row_codes_kernel.configs]


@pytest.mark.parametrize(  # every config of each kernel, beside the other's first
    "cfg",
    [{"stats": c, "codes": _CODES[0]} for c in _STATS]
    + [{"stats": _STATS[0], "codes": c} for c in _CODES[1:]],
)
def test_split_prepass_every_config(cfg: dict) -> None:
    x, sinv, l1, _, strength, _, _, _ = _case(1029, 448, 64, 48, 3, "int4", seed=7)
    g = torch.rand(48, device="cuda") + 0.5
    xq, sx = quantize_act_rowwise_split_triton(x, sinv, l1, strength, 171, g, config=cfg)
    xq_r, sx_r = rp.quantize_act_rowwise(x, sinv, l1, strength, 171, g)
    assert _rel(sx, sx_r) < 1e-6 and _same_codes(xq, xq_r) >= 0.999


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_branch_from_cublas_takes_any_float_input(dtype: torch.dtype) -> None:
    """With many ranks ``x @ l1`` comes from cuBLAS (``branch_by_cublas``); X of any float
    dtype is rounded to bf16 first, as the launch's own dot and the reference round it."""
    x, sinv, l1, _, strength, _, _, _ = _case(300, 448, 64, 160, 3, "int4", seed=11)
    assert branch_by_cublas(300, 160)
    noise = 1 + 1e-3 * torch.randn(x.shape, device="cuda")
    x = (x.float() * noise).to(dtype)  # in fp32, values that bf16 does not hold
    g = torch.rand(160, device="cuda") + 0.5
    xq, sx = quantize_act_rowwise_split_triton(x, sinv, l1, strength, 100, g)
    xq_r, sx_r = rp.quantize_act_rowwise(x, sinv, l1, strength, 100, g)
    assert _rel(sx, sx_r) < 1e-6 and _same_codes(xq, xq_r) >= 0.999


@pytest.mark.parametrize("m,k,n,r", SHAPES)
def test_one_scale_per_operand_matches_its_reference(m: int, k: int, n: int, r: int) -> None:
    x, sinv, l1, l2, strength, qw, ws, bias = _case(m, k, n, r, 3, "int4", seed=m + 3)
    x = x * (torch.rand(m, 1, device="cuda") * 3 + 0.1).to(x.dtype)  # tokens of different sizes
    rows = max(1, m // 3)
    g, cs = rp.prefill_scales(l1, l2, sinv, ws, "int4", strength, scaling="tensor")
    bound = rp.branch_bound(l1, sinv) if r else torch.zeros(1, device="cuda")
    wmax = rp.residual_max(ws, "int4")
    peaks = rp.weight_peaks(l2, wmax)
    wq, cs_t, _ = expand_weight_triton(qw, ws, "int4", l2, bound, wmax, strength, peaks=peaks)
    assert torch.equal(cs_t, cs)
    assert _same_values(wq, rp.expand_weight(qw, ws, "int4", l2, g, cs)) >= 0.999
    xq, sx = quantize_act_rowwise_split_triton(x, sinv, l1, strength, rows, g, scaling="tensor")
    xq_r, sx_r = rp.quantize_act_rowwise(x, sinv, l1, strength, rows, g, scaling="tensor")
    assert _rel(sx, sx_r) < 1e-6 and bool((sx == sx[0]).all())
    assert _same_values(xq, xq_r) >= 0.999
    args = (sinv, qw, ws, "int4", l1, l2, strength, rows, bias)
    out = w4_linear_prefill_triton(x, *args, scaling="tensor")
    expect = rp.w4_linear_prefill(x.float(), *args, scaling="tensor")
    assert out.shape == (m, n) and _rel(out, expect) < 1e-2
    # Captured in a CUDA graph and replayed on new inputs: the same bits as eager launches.
    static = x.clone()
    w4_linear_prefill_triton(static, *args, scaling="tensor")  # compile and tune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = w4_linear_prefill_triton(static, *args, scaling="tensor")
    for seed in (1, 2):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        static.copy_(torch.randn(x.shape, generator=gen, device="cuda").to(static.dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, w4_linear_prefill_triton(static, *args, scaling="tensor"))


@pytest.mark.parametrize("factor", [1.5, 0.5])  # headroom, and a peak the batch passes (saturated)
@pytest.mark.parametrize("m,k,n,r", SHAPES)
def test_calibrated_peak_matches_its_reference(m: int, k: int, n: int, r: int, factor: float) -> None:
    x, sinv, l1, l2, strength, qw, ws, bias = _case(m, k, n, r, 3, "int4", seed=m + 4)
    rows = max(1, m // 3)
    batch_peak = (x.float() * sinv).abs().amax().reshape(1)
    peak = batch_peak * factor
    g, _ = rp.prefill_scales(l1, l2, sinv, ws, "int4", strength, scaling="tensor")
    seen = torch.zeros(1, device="cuda")
    xq, sx = quantize_act_rowwise_split_triton(x, sinv, l1, strength, rows, g, None, "tensor", peak, seen)
    xq_r, sx_r = rp.quantize_act_rowwise(x, sinv, l1, strength, rows, g, "tensor", peak)
    assert torch.equal(seen, batch_peak) and _rel(sx, sx_r) < 1e-6
    assert _same_values(xq, xq_r) >= 0.999, _row_stats_kernel.best_config
    assert bool(torch.isfinite(xq.float()).all())
    assert (factor < 1) == bool((xq[:, :k].float().abs() == rp.FP8_MAX).any())
    args = (sinv, qw, ws, "int4", l1, l2, strength, rows, bias)
    out = w4_linear_prefill_triton(x, *args, scaling="tensor", act_peak=peak)
    expect = rp.w4_linear_prefill(x.float(), *args, scaling="tensor", act_peak=peak)
    assert out.shape == (m, n) and torch.isfinite(out).all() and _rel(out, expect) < 1e-2
    if factor < 1:
        return
    # Rows are scaled independently of their batch: a sample alone gives the same codes.  Its
    # branch blocks come from x @ l1 summed by the statistics tile autotuning picks for its row
    # count (the sample's rows take the few-row tiles here), so they may differ by an fp32 rounding.
    part, _ = quantize_act_rowwise_split_triton(x[:rows], sinv, l1, strength, rows, g, None, "tensor", peak)
    kp = -(-k // 64) * 64
    assert torch.equal(part[:, :kp].view(torch.uint8), xq[:rows, :kp].view(torch.uint8))
    assert _same_values(part, xq[:rows]) >= 0.999
    # Captured in a CUDA graph: replays match eager launches and keep raising the record.
    static = x.clone()
    seen.zero_()
    w4_linear_prefill_triton(static, *args, scaling="tensor", act_peak=peak, act_seen=seen)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = w4_linear_prefill_triton(static, *args, scaling="tensor", act_peak=peak, act_seen=seen)
    static.mul_(3)  # a louder batch than any before
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, w4_linear_prefill_triton(static, *args, scaling="tensor", act_peak=peak))
    assert torch.equal(seen, (static.float() * sinv).abs().amax().reshape(1))


@pytest.mark.parametrize("cfg", _STATS, ids=str)
def test_calibrated_peak_every_stats_config(cfg: dict) -> None:
    x, sinv, l1, _, strength, _, _, _ = _case(1029, 448, 64, 48, 3, "int4", seed=8)
    g = torch.rand(48, device="cuda") + 0.5
    peak = (x.float() * sinv).abs().amax().reshape(1) * 0.8
    config = {"stats": cfg, "codes": {"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4}}
    xq, sx = quantize_act_rowwise_split_triton(x, sinv, l1, strength, 171, g, config, "tensor", peak)
    xq_r, sx_r = rp.quantize_act_rowwise(x, sinv, l1, strength, 171, g, "tensor", peak)
    assert _rel(sx, sx_r) < 1e-6 and _same_values(xq, xq_r) >= 0.999
