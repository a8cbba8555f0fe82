# ruff: noqa: B023  (closures are timed before the loop variables change)
"""How far the large-M pre-pass's two launches are from their memory floor (GPU diagnostic).

    python bench/diag_prepass_pipeline.py [--ms 4608] [--ks 3072,12288] [--ranks 32,96]

The statistics launch runs unpipelined (``num_stages=1``): pipelined variants gave wrong
``x @ l1`` partials on H100 / Triton 3.6 (sixth session).  This script times, after a 64 MB
memset as ``bench_w4.bench`` does:

- floors: torch's ``amax`` over ``|X|`` (one read of X) and its FP8 cast of X (one read, one
  write), the memory traffic each stage cannot avoid;
- the statistics kernel at each tile and at 1, 2 and 3 pipeline stages, checking its row
  maxima (exact) and summed ``x @ l1`` partials (relative error against float64);
- a probe of the statistics kernel without masks (row and column counts divisible by the
  tile: every FLUX shape at M = 4608), at 1, 2 and 3 stages, with and without the dot, to
  see what the masks, the pipelining and the dot each cost;
- the codes kernel at each of its tiles.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_w4 import bench  # noqa: E402
from studio.kernels.prepass_split_triton import (  # noqa: E402
    RowStats,
    _prune_stats,
    _row_codes_kernel,
    _row_stats_kernel,
    row_codes_triton,
)
from studio.kernels.quant_act import branch_dot_dtype  # noqa: E402


@triton.jit
def _stats_probe(
    x_ptr, sinv_ptr, l1_ptr, amax_ptr, la_ptr,
    M, K, R, stride_xm, stride_l1k,
    R_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    """The statistics kernel without masks: M % BLOCK_M == 0, K % (SPLITS * BLOCK_K) == 0."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    per_split = K // SPLITS
    k_start = pid_s * per_split
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    la = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    for i in range(0, per_split // BLOCK_K):
        kk = k_start + i * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :])
        sinv = tl.load(sinv_ptr + kk)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32) * sinv[None, :]), axis=1))
        if DOT:
            l1 = tl.load(l1_ptr + kk[:, None] * stride_l1k + offs_r[None, :], r_mask[None, :], 0.0)
            la = tl.dot(x.to(DOT_DTYPE), l1.to(DOT_DTYPE), la)
    tl.store(amax_ptr + pid_s * M + offs_m, amax)
    if DOT:
        tl.store(la_ptr + (pid_s * M + offs_m[:, None]) * R + offs_r[None, :], la, r_mask[None, :])


def check(amax: torch.Tensor, la: torch.Tensor, used: int, truth_amax: torch.Tensor, truth_la: torch.Tensor):
    """(row maxima exact?, relative error of the summed ``x @ l1`` partials)."""
    exact = bool(torch.equal(amax[:used].amax(0), truth_amax))
    err = float((la[:used].double().sum(0) - truth_la).norm() / truth_la.norm())
    return exact, err


def run_case(m: int, k: int, r: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    x[:, :8] *= 30
    sinv = torch.rand(k, device="cuda", generator=gen) + 0.5
    l1 = (torch.randn(k, r, device="cuda", generator=gen) * 0.02).bfloat16()
    truth_amax = (x.float() * sinv).abs().amax(1)
    truth_la = x.double() @ l1.double()
    r_pad = max(16, triton.next_power_of_2(r))
    print(f"\n== M={m} K={k} rank {r}: X {x.numel() * 2 / 1e6:.1f} MB")
    x8 = torch.empty(m, k, device="cuda", dtype=torch.float8_e4m3fn)
    print(f"  floor amax(|X|) {bench(lambda: x.abs().amax()):.1f} us; "
          f"FP8 cast of X {bench(lambda: x8.copy_(x)):.1f} us")  # fmt: skip
    dot_dtype = branch_dot_dtype()
    configs = _prune_stats(_row_stats_kernel.configs, {}, R_PAD=r_pad)
    splits_max = max(c.kwargs["SPLITS"] for c in configs)
    amax = torch.empty(splits_max, m, device="cuda")
    la = torch.empty(splits_max, m, r, device="cuda")

    def timed_and_checked(launch, splits: int) -> tuple[float, bool, float]:
        """(us, row maxima exact, relative error of the summed partials) of one launch."""
        t = bench(launch)
        amax.zero_()
        la.zero_()
        launch()
        return (t, *check(amax, la, splits, truth_amax, truth_la))

    for cfg in configs:
        kw = cfg.kwargs
        bm, bk, sp = kw["BLOCK_M"], kw["BLOCK_K"], kw["SPLITS"]
        grid = (triton.cdiv(m, bm), sp)
        line = [f"  tile {bm}x{bk} splits {sp} warps {cfg.num_warps}:"]
        for stages in (1, 2, 3):

            def current() -> None:
                _row_stats_kernel.fn[grid](
                    x, sinv, l1, amax, la, amax, x, amax, m, k, k, r, 0, x.stride(0), l1.stride(0), 0,
                    R_PAD=r_pad, DOT_DTYPE=dot_dtype, TENSOR=False, CODES=False,
                    BLOCK_M=bm, BLOCK_K=bk, SPLITS=sp,
                    num_warps=cfg.num_warps, num_stages=stages,
                )  # fmt: skip

            t, exact, err = timed_and_checked(current, sp)
            line.append(f"cur s{stages} {t:.1f} us ({'ok' if exact else 'AMAX WRONG'}, la {err:.1e})")
            if m % bm or k % (sp * bk):
                continue
            for dot in (True, False):

                def probe() -> None:
                    _stats_probe[grid](
                        x, sinv, l1, amax, la, m, k, r, x.stride(0), l1.stride(0),
                        R_PAD=r_pad, DOT_DTYPE=dot_dtype, DOT=dot, BLOCK_M=bm, BLOCK_K=bk, SPLITS=sp,
                        num_warps=cfg.num_warps, num_stages=stages,
                    )  # fmt: skip

                t, exact, err = timed_and_checked(probe, sp)
                err_txt = f", la {err:.1e}" if dot else ""
                line.append(
                    f"probe{'' if dot else '-nodot'} s{stages} {t:.1f} us ({'ok' if exact else 'AMAX WRONG'}{err_txt})"
                )
        print(" | ".join(line), flush=True)
    stats = RowStats(amax, la, 4)
    st = torch.ones(1, r, device="cuda")
    g = torch.ones(r, device="cuda")
    for cfg in _row_codes_kernel.configs:
        c = dict(cfg.kwargs, num_warps=cfg.num_warps)
        t = bench(lambda: row_codes_triton(x, sinv, stats, r, st, 1, g, config=c))
        print(f"  codes {c}: {t:.1f} us")
    t = bench(lambda: row_codes_triton(x, sinv, stats, r, st, 1, g))
    print(f"  codes autotuned ({_row_codes_kernel.best_config}): {t:.1f} us", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ms", default="4608")
    parser.add_argument("--ks", default="3072,12288")
    parser.add_argument("--ranks", default="32,96")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for m in map(int, args.ms.split(",")):
        for k in map(int, args.ks.split(",")):
            for r in map(int, args.ranks.split(",")):
                run_case(m, k, r)


if __name__ == "__main__":
    main()
