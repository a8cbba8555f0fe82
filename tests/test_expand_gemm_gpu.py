"""The GEMM that expands the 4-bit codes itself (``expand_gemm_triton``) on a GPU (``pytest -m gpu``).

It must give what cuBLAS gives on the expanded FP8 copy of the weight: the same FP8 operands,
so the two differ only in the fp32 summation order (and one bf16 rounding).  Tolerances: the
layer within 1e-2 of the float32 reference, as the large-M path's other tests; within 4e-3 of
the cuBLAS path and of a dense product of the same operands.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_prefill_gpu import SHAPES, _case, _rel

from studio.kernels import reference_prefill as rp
from studio.kernels.expand_gemm_triton import _expand_gemm_kernel, expand_gemm_triton
from studio.kernels.prefill_triton import expand_weight_triton, w4_linear_prefill_triton

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("scaling", ["tensor", "row"])
@pytest.mark.parametrize("fmt", ["int4", "fp4"])
@pytest.mark.parametrize("m,k,n,r", SHAPES)
def test_expand_gemm_layer_matches_cublas_and_reference(
    m: int, k: int, n: int, r: int, fmt: str, scaling: str
) -> None:
    x, sinv, l1, l2, strength, qw, ws, bias = _case(m, k, n, r, 3, fmt, seed=m + k)
    rows = max(1, m // 3)
    args = (x, sinv, qw, ws, fmt, l1, l2, strength, rows, bias)
    out = w4_linear_prefill_triton(*args, scaling=scaling, gemm="expand")
    out_cublas = w4_linear_prefill_triton(*args, scaling=scaling, gemm="cublas")
    expect = rp.w4_linear_prefill(x.float(), sinv, qw, ws, fmt, l1, l2, strength, rows, bias, scaling=scaling)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n) and torch.isfinite(out).all()
    assert _rel(out, expect) < 1e-2, _expand_gemm_kernel.best_config
    assert _rel(out, out_cublas) < 4e-3, _expand_gemm_kernel.best_config


def _operands(m: int, k: int, n: int, r: int, fmt: str, scaling: str):
    x, sinv, l1, l2, strength, qw, ws, bias = _case(m, k, n, r, 2, fmt, seed=7)
    bound, wmax = rp.branch_bound(l1, sinv), rp.residual_max(ws, fmt)
    peaks = rp.weight_peaks(l2, wmax) if scaling == "tensor" else None
    wq, cs, g = expand_weight_triton(qw, ws, fmt, l2, bound, wmax, strength, peaks=peaks)
    wb, cs_b, g_b = expand_weight_triton(
        qw, ws, fmt, l2, bound, wmax, strength, peaks=peaks, branch_only=True
    )
    kp = qw.shape[0] * 64
    # the branch columns alone are the full expansion's, bit for bit, with the same scales
    assert torch.equal(wb.view(torch.uint8), wq[:, kp:].view(torch.uint8))
    assert torch.equal(cs_b, cs) and torch.equal(g_b, g)
    xq, sx = rp.quantize_act_rowwise(x, sinv, l1, strength, 5, g, scaling=scaling)
    sx = sx.view(-1)[:1] if scaling == "tensor" else sx
    dense = (xq.float() * sx) @ (wq.float() * cs[:, None]).t() + bias.to(torch.bfloat16).float()
    return xq, sx, qw, ws, cs, wb, bias, dense


@pytest.mark.parametrize("cfg", [c.all_kwargs() for c in _expand_gemm_kernel.configs], ids=str)
def test_expand_gemm_every_config(cfg: dict) -> None:
    """Every tile of the autotuning list, rows and columns off the tiles, K off the group count."""
    for fmt, scaling in (("int4", "tensor"), ("fp4", "row")):
        xq, sx, qw, ws, cs, wb, bias, dense = _operands(300, 1000, 520, 48, fmt, scaling)
        out = expand_gemm_triton(xq, sx, qw, ws, fmt, cs, wb, bias, config=cfg)
        assert out.shape == dense.shape and _rel(out, dense) < 4e-3, (fmt, scaling)
        no_bias = expand_gemm_triton(xq, sx, qw, ws, fmt, cs, wb, None, config=cfg)
        assert _rel(no_bias, dense - bias.to(torch.bfloat16).float()) < 4e-3


def test_expand_gemm_refuses_operands_that_do_not_fit() -> None:
    xq, sx, qw, ws, cs, wb, bias, _ = _operands(64, 320, 136, 16, "int4", "tensor")
    with pytest.raises(ValueError, match="do not fit"):
        expand_gemm_triton(xq, sx, qw, ws, "int4", cs, wb[:, :-64], bias)
    with pytest.raises(ValueError, match="fmt"):
        expand_gemm_triton(xq, sx, qw, ws, "int8", cs, wb, bias)
    x, sinv, l1, l2, strength, qw, ws, bias = _case(8, 320, 136, 16, 1, "int4", seed=0)
    with pytest.raises(ValueError, match="gemm"):
        w4_linear_prefill_triton(x, sinv, qw, ws, "int4", l1, l2, strength, 8, bias, gemm="tiles")


def test_expand_gemm_with_a_calibrated_peak_and_in_a_cuda_graph() -> None:
    """The opt-in calibrated peak takes the same GEMM; a captured graph replays the same bits."""
    x, sinv, l1, l2, strength, qw, ws, bias = _case(256, 3072, 3072, 32, 1, "int4", seed=11)
    args = (x, sinv, qw, ws, "int4", l1, l2, strength, 256, bias)
    peak = ((x.float() * sinv).abs().amax() * 2).reshape(1)
    kw = {"scaling": "tensor", "act_peak": peak}
    out = w4_linear_prefill_triton(*args, **kw, gemm="expand")
    assert _rel(out, w4_linear_prefill_triton(*args, **kw, gemm="cublas")) < 4e-3
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = w4_linear_prefill_triton(*args, **kw, gemm="expand")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, out)
