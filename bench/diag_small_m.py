# ruff: noqa: B023  (closures are timed before the loop variables change)
"""Where the small-M path's time goes, on a GPU: its launches apart, and both split-K reductions.

    python bench/diag_small_m.py [--json out.json]

Per FLUX shape at M = 16 and 64 (rank 32, INT4): the whole path with each reduction
(``splits``: partials then ``_sum_splits_kernel``; ``atomic``: in-kernel, last split writes),
the branch-input GEMM ``x @ l1`` alone, and the main kernel at every split-K config with each
reduction (forced configs, no autotuning).  Timing as ``bench_w4.bench`` (CUDA graphs, L2
flushed).  The 4-bit weight-read floor at 3 TB/s is printed beside.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_w4 import SHAPES, bench, make_w4  # noqa: E402
from studio.kernels.small_m_triton import _split_configs, w4_linear_small_m_triton  # noqa: E402


def floor_us(k: int, n: int) -> float:
    """4-bit codes plus fp32 group scales, read once at 3 TB/s."""
    return (k * n / 2 + k // 64 * n * 4) / 3e12 * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for k, n in SHAPES:
        p = make_w4(k, n, 32, "int4", "cuda")
        bias = torch.randn(n, device="cuda")
        for m in (16, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            call = (
                x,
                p["smooth_inv"],
                p["qweight"],
                p["wscale"],
                "int4",
                p["l1"],
                p["l2"],
                p["strength"],
                1,
                bias,
            )
            row = {"K": k, "N": n, "M": m, "floor": floor_us(k, n)}
            row["la_gemm"] = bench(lambda: x @ p["l1"])
            for reduce in ("splits", "atomic"):
                row[f"auto_{reduce}"] = bench(lambda: w4_linear_small_m_triton(*call, reduce=reduce))
                for cfg in _split_configs():
                    kw = cfg.all_kwargs()
                    if kw["SPLIT_K"] > max(1, (k // 64) // 2):
                        continue
                    name = (
                        f"{reduce}_bn{kw['BLOCK_N']}_sk{kw['SPLIT_K']}_w{kw['num_warps']}_s{kw['num_stages']}"
                    )
                    row[name] = bench(lambda: w4_linear_small_m_triton(*call, config=kw, reduce=reduce))
            rows.append(row)
            best = {r: min(v for c, v in row.items() if c.startswith(f"{r}_")) for r in ("splits", "atomic")}
            print(
                f"{k}x{n} M={m}: floor {row['floor']:.1f} us, x@l1 {row['la_gemm']:.1f} us, "
                f"auto splits {row['auto_splits']:.1f} / atomic {row['auto_atomic']:.1f} us, "
                f"best forced config splits {best['splits']:.1f} / atomic {best['atomic']:.1f} us",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
