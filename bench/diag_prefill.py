# ruff: noqa: B023  (closures are timed before the loop variable changes)
"""Diagnose the large-M path on a GPU: per-stage agreement with the reference and timings.

python bench/diag_prefill.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_w4 import bench  # noqa: E402
from studio.kernels import reference as ref  # noqa: E402
from studio.kernels import reference_prefill as rp  # noqa: E402
from studio.kernels.prefill_triton import (  # noqa: E402
    _expand_weight_kernel,
    _rowwise_prepass_kernel,
    expand_weight_triton,
    quantize_act_rowwise_triton,
    w4_linear_prefill_triton,
)
from studio.kernels.prepass_split_triton import (  # noqa: E402
    _prune_stats,
    _row_codes_kernel,
    _row_stats_kernel,
    quantize_act_rowwise_split_triton,
)


def mismatch_columns(a: torch.Tensor, b: torch.Tensor, kp: int, rb: int) -> str:
    bad = a.view(torch.uint8) != b.view(torch.uint8)
    cols = bad.any(0).nonzero().flatten().tolist()
    blocks = {"main": sum(c < kp for c in cols)}
    for i, name in enumerate(("ext0", "ext1", "ext2")):
        blocks[name] = sum(kp + i * rb <= c < kp + (i + 1) * rb for c in cols)
    where = bad.nonzero()[:4].tolist()
    pairs = [(a[i, j].float().item(), b[i, j].float().item()) for i, j in where]
    return f"frac {bad.float().mean().item():.4f} cols {blocks} e.g. {pairs} nan {a.float().isnan().sum().item()}"


def stages(m: int, k: int, n: int, r: int, fmt: str) -> None:
    g0 = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g0).bfloat16()
    x[:, :3] *= 40
    sinv = torch.rand(k, device="cuda", generator=g0) + 0.5
    l1 = (torch.randn(k, r, device="cuda", generator=g0) * 0.05).bfloat16()
    l2 = (torch.randn(n, r, device="cuda", generator=g0) * 0.05).bfloat16()
    st = torch.rand(2, r, device="cuda", generator=g0)
    qw, ws = ref.quantize_weight(torch.randn(n, k, device="cuda", generator=g0), fmt)
    bound = rp.branch_bound(l1, sinv) if r else torch.zeros(1, device="cuda")
    g, cs = rp.prefill_scales(l1, l2, sinv, ws, fmt, st)
    kp, rb = rp.padded_k(k), rp.branch_block(r)
    wq, cs_t, g_t = expand_weight_triton(qw, ws, fmt, l2, bound, rp.residual_max(ws, fmt), st)
    print(f"[{m}x{k}x{n} r{r} {fmt}] cs rel {((cs_t - cs).norm() / cs.norm()).item():.2e}")
    print(
        "  expand ",
        _expand_weight_kernel.best_config,
        mismatch_columns(wq, rp.expand_weight(qw, ws, fmt, l2, g, cs), kp, rb),
    )
    xq, sx = quantize_act_rowwise_triton(x, sinv, l1, st, max(1, m // 2), g)
    xr, sxr = rp.quantize_act_rowwise(x, sinv, l1, st, max(1, m // 2), g)
    print(
        "  prepass",
        _rowwise_prepass_kernel.best_config,
        mismatch_columns(xq, xr, kp, rb),
        "sx",
        ((sx - sxr).norm() / sxr.norm()).item(),
    )
    print(
        "  la scale check: max|a| codes",
        xr[:, kp:].float().abs().max().item(),
        xq[:, kp:].float().abs().max().item(),
    )


def timings(k: int, n: int, m: int, r: int) -> None:
    x = torch.randn(m, k, device="cuda").bfloat16()
    sinv = torch.rand(k, device="cuda") + 0.5
    l1 = (torch.randn(k, r, device="cuda") * 0.02).bfloat16()
    l2 = (torch.randn(n, r, device="cuda") * 0.02).bfloat16()
    st = torch.ones(1, r, device="cuda")
    kg = k // 64
    qw = torch.randint(0, 256, (kg, n, 32), device="cuda", dtype=torch.uint8)
    ws = torch.rand(kg, n, device="cuda") * 1e-3
    bound, wmax = rp.branch_bound(l1, sinv), rp.residual_max(ws, "int4")
    wq, cs, g = expand_weight_triton(qw, ws, "int4", l2, bound, wmax, st)
    xq, sx = quantize_act_rowwise_triton(x, sinv, l1, st, 1, g)
    t_exp = bench(lambda: expand_weight_triton(qw, ws, "int4", l2, bound, wmax, st))
    t_pre = bench(lambda: quantize_act_rowwise_triton(x, sinv, l1, st, 1, g))
    t_mm = bench(
        lambda: torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=cs.view(1, -1), out_dtype=torch.bfloat16)
    )
    x8 = x.to(torch.float8_e4m3fn)
    w8 = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
    t_bare = bench(
        lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=cs.view(1, -1), out_dtype=torch.bfloat16)
    )
    print(
        f"[{k}x{n} M={m} r{r}] expand {t_exp:.1f} us ({_expand_weight_kernel.best_config}), prepass {t_pre:.1f} us "
        f"({_rowwise_prepass_kernel.best_config}), scaled_mm(K+3Rb) {t_mm:.1f} us, scaled_mm rowwise bare {t_bare:.1f} us"
    )
    for extra in (0, 96, 128, 256, 288, 384):
        xe = torch.zeros(m, k + extra, device="cuda", dtype=torch.float8_e4m3fn)
        we = torch.zeros(n, k + extra, device="cuda", dtype=torch.float8_e4m3fn)
        t = bench(
            lambda: torch._scaled_mm(xe, we.t(), scale_a=sx, scale_b=cs.view(1, -1), out_dtype=torch.bfloat16)
        )
        print(f"   scaled_mm rowwise K={k}+{extra}: {t:.1f} us")
    t_split = bench(lambda: quantize_act_rowwise_split_triton(x, sinv, l1, st, 1, g))
    print(
        f"   prepass split (stats then codes): {t_split:.1f} us "
        f"({_row_stats_kernel.best_config} / {_row_codes_kernel.best_config})"
    )
    # Autotuning picks the statistics tile by its own time; the codes kernel then reads its
    # SPLITS partials of x @ l1.  Each statistics tile with the tuned codes tile, both stages:
    codes_cfg = _row_codes_kernel.best_config.all_kwargs()
    for cfg in _prune_stats(_row_stats_kernel.configs, {}, R_PAD=max(16, triton.next_power_of_2(r))):
        c = {"stats": cfg.all_kwargs(), "codes": codes_cfg}
        t = bench(lambda: quantize_act_rowwise_split_triton(x, sinv, l1, st, 1, g, config=c))
        print(f"   prepass split, stats {c['stats']}: {t:.1f} us")
    layer = (x, sinv, qw, ws, "int4", l1, l2, st, 1, None)
    for prepass in ("rows", "split"):
        t = bench(lambda: w4_linear_prefill_triton(*layer, bound=bound, wmax=wmax, prepass=prepass))
        print(f"   whole layer, prepass={prepass}: {t:.1f} us")


if __name__ == "__main__":
    for case in [(64, 200, 72, 16, "int4"), (129, 320, 136, 48, "fp4"), (256, 3072, 3072, 32, "int4")]:
        stages(*case)
    for r in (32, 96):
        for k, n in [(3072, 3072), (3072, 12288), (12288, 3072)]:
            timings(k, n, 4608, r)
