# ruff: noqa: B023  (closures are timed before the loop variables change)
"""Where the one-read pre-pass (a calibrated activation peak) spends its time.

    python bench/diag_fixed_peak.py [--ks 3072,12288] [--m 4608] [--ranks 32,96]

At each K (M = 4608, bf16 X), timed as ``bench_w4.bench`` times: the two launches of the
measured-peak pre-pass alone (statistics, codes); the fixed-peak statistics launch that also
writes the codes, autotuned and at every tile of its autotuning list with 1 and 2 pipeline
stages (each checked against the reference: share of equal codes, relative error of the
scales); the finishing launch alone; torch's FP8 cast of X (the memory floor of one read of X
and one write of its codes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_w4 import bench  # noqa: E402
from studio.kernels import reference_prefill as rp  # noqa: E402
from studio.kernels.prepass_split_triton import (  # noqa: E402
    FixedPeak,
    _prune_stats,
    _row_stats_kernel,
    row_codes_triton,
    row_stats_triton,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="3072,12288")
    ap.add_argument("--m", type=int, default=4608)
    ap.add_argument("--ranks", default="32,96")
    args = ap.parse_args()
    m = args.m
    print(f"device: {torch.cuda.get_device_name()}  M = {m}")
    for k in [int(v) for v in args.ks.split(",")]:
        x = torch.randn(m, k, device="cuda").bfloat16()
        sinv = torch.rand(k, device="cuda") + 0.5
        kp = -(-k // 64) * 64
        print(f"K = {k}: FP8 cast of X {bench(lambda: x.to(torch.float8_e4m3fn)):.1f} us")
        for r in [int(v) for v in args.ranks.split(",")]:
            l1 = (torch.randn(k, r, device="cuda") * 0.02).bfloat16()
            st = torch.ones(1, r, device="cuda")
            g = torch.rand(r, device="cuda") + 0.5
            peak = (x.float() * sinv).abs().amax().reshape(1) * 2
            xq = torch.empty(m, rp.total_k(kp, r), device="cuda", dtype=torch.float8_e4m3fn)
            seen = torch.zeros(1, device="cuda")
            fixed = FixedPeak(peak, xq, seen)
            ref_q, ref_s = rp.quantize_act_rowwise(x, sinv, l1, st, 1, g, "tensor", peak)
            stats = row_stats_triton(x, sinv, l1, scaling="tensor")
            line = [
                f"  rank {r}: measured peak: statistics {bench(lambda: row_stats_triton(x, sinv, l1, scaling='tensor')):.1f}",
                f"codes {bench(lambda: row_codes_triton(x, sinv, stats, r, st, 1, g)):.1f}",
                f"fixed: statistics + codes {bench(lambda: row_stats_triton(x, sinv, l1, None, 'tensor', fixed)):.1f}"
                f" ({_row_stats_kernel.best_config.all_kwargs()})",
            ]
            done = row_stats_triton(x, sinv, l1, None, "tensor", fixed)
            line.append(
                f"finish {bench(lambda: row_codes_triton(x, sinv, done, r, st, 1, g, written=xq)):.1f} us"
            )
            print(", ".join(line), flush=True)
            r_pad = max(16, 1 << (max(r, 1) - 1).bit_length())
            for cfg in _prune_stats(_row_stats_kernel.configs, {}, R_PAD=r_pad):
                for stages in (1, 2):
                    c = {**cfg.all_kwargs(), "num_stages": stages}
                    t = bench(lambda: row_stats_triton(x, sinv, l1, c, "tensor", fixed))
                    xq.zero_()
                    done = row_stats_triton(x, sinv, l1, c, "tensor", fixed)
                    q, s = row_codes_triton(x, sinv, done, r, st, 1, g, written=xq)
                    same = (q.view(torch.uint8) == ref_q.view(torch.uint8)).float().mean().item()
                    bad = ((s - ref_s).abs().max() / ref_s.abs().max()).item()
                    print(f"    {cfg.kwargs} warps {cfg.num_warps} stages {stages}: {t:.1f} us, "
                          f"codes equal {same:.4f}, scale err {bad:.1e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
