# ruff: noqa: B023  (every closure below is timed before its loop variables change)
"""Mid-M: the 4-bit layer with its codes expanded inside the GEMM, against bf16 and cuBLAS.

    python bench/bench_expand_gemm.py [--shapes 3072x3072,...] [--ms 128,256,...] [--ranks 32]
        [--fmts int4] [--every-config] [--fused] [--json out.json]

Per FLUX shape, row count, rank and format, timed as ``bench_w4.bench`` times (CUDA-graph
replays, a 64 MB memset before every call), side by side in one run:

- ``bf16``: ``F.linear``, the baseline a user has;
- ``cublas``: the large-M layer with the weight expanded into an FP8 copy, then cuBLAS FP8
  (``w4_linear_prefill_triton(..., gemm="cublas")``), as it ran before;
- ``expand``: the same layer with ``expand_gemm_triton`` (``gemm="expand"``), the codes
  expanded tile by tile inside the GEMM;
- ``fused`` (with ``--fused``): the path ``w4_linear`` took from 65 to 255 rows before the
  twenty-sixth session, pre-pass + the Triton 4-bit GEMM with per-group scales in fp32;
- the GEMMs alone: ``expand_gemm_triton`` against the expansion plus ``_scaled_mm``, and
  ``_scaled_mm`` alone on the expanded weight (what the copy costs);
- ``rel``: the relative difference of the two layers' outputs (same FP8 operands, so only the
  summation order differs).

It prints ``bf16 / expand`` and ``cublas / expand`` and the expand GEMM's chosen tile;
``--every-config`` also times the GEMM at each tile of its autotuning list.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_w4 import SHAPES, bench, cache_factors, make_w4  # noqa: E402
from studio import kernels  # noqa: E402
from studio.kernels.expand_gemm_triton import _expand_gemm_kernel, expand_gemm_triton  # noqa: E402
from studio.kernels.prefill_triton import (  # noqa: E402
    _scaled_mm_with_bias,
    expand_weight_triton,
    w4_linear_prefill_triton,
)
from studio.kernels.prepass_split_triton import quantize_act_rowwise_split_triton  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def measure(k: int, n: int, m: int, rank: int, fmt: str, every_config: bool, fused: bool) -> dict:
    dev = "cuda"
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    bias = torch.randn(n, device=dev) * 0.1
    bias16 = bias.to(torch.bfloat16)
    p = cache_factors(make_w4(k, n, rank, fmt, dev))
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    args = (x, p["smooth_inv"], p["qweight"], p["wscale"], fmt, p["l1"], p["l2"], p["strength"], 1, bias)
    cached = {"bound": p["bound"], "wmax": p["wmax"], "peaks": p["peaks"]}
    row: dict = {"K": k, "N": n, "M": m, "rank": rank, "fmt": fmt}
    row["bf16"] = bench(lambda: F.linear(x, w, bias16))
    for gemm in ("cublas", "expand"):
        row[gemm] = bench(lambda: w4_linear_prefill_triton(*args, **cached, gemm=gemm))
    if fused:
        row["fused"] = bench(lambda: kernels.w4_linear(*args, path="fused"))
    out_c = w4_linear_prefill_triton(*args, **cached, gemm="cublas")
    out_e = w4_linear_prefill_triton(*args, **cached, gemm="expand")
    row["rel"] = _rel(out_e, out_c)
    row["expand_tile"] = str(_expand_gemm_kernel.best_config)
    # The GEMMs alone, on one set of operands (one scale per operand, the default).
    factors = (p["qweight"], p["wscale"], fmt, p["l2"], p["bound"], p["wmax"], p["strength"])
    wq, cs, g = expand_weight_triton(*factors, peaks=p["peaks"])
    wb, _, _ = expand_weight_triton(*factors, peaks=p["peaks"], branch_only=True)
    xq, sx = quantize_act_rowwise_split_triton(
        x, p["smooth_inv"], p["l1"], p["strength"], 1, g, scaling="tensor"
    )
    sx1 = sx.view(-1)[:1]
    row["gemm_expand"] = bench(
        lambda: expand_gemm_triton(xq, sx1, p["qweight"], p["wscale"], fmt, cs, wb, bias)
    )
    row["gemm_scaled_mm"] = bench(lambda: _scaled_mm_with_bias(xq, sx1, wq, cs[:1], bias, n, torch.bfloat16))
    row["expansion"] = bench(lambda: expand_weight_triton(*factors, peaks=p["peaks"]))
    row["branch_only"] = bench(lambda: expand_weight_triton(*factors, peaks=p["peaks"], branch_only=True))
    row["prepass"] = bench(
        lambda: quantize_act_rowwise_split_triton(
            x, p["smooth_inv"], p["l1"], p["strength"], 1, g, scaling="tensor"
        )
    )
    if every_config:
        for cfg in _expand_gemm_kernel.configs:
            kw = cfg.all_kwargs()
            if kw["BLOCK_M"] > max(64, m):
                continue
            name = f"tile_{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['GROUPS']}_k{kw['SPLIT_K']}"
            name += f"_w{kw['num_warps']}_s{kw['num_stages']}"
            row[name] = bench(
                lambda: expand_gemm_triton(xq, sx1, p["qweight"], p["wscale"], fmt, cs, wb, bias, config=kw)
            )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--ms", default="128,256,512,1024,2048,4608")
    ap.add_argument("--ranks", default="32")
    ap.add_argument("--fmts", default="int4")
    ap.add_argument("--every-config", action="store_true")
    ap.add_argument("--fused", action="store_true", help="also time the fused path")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for m in (int(v) for v in args.ms.split(",")):
            for rank in (int(v) for v in args.ranks.split(",")):
                for fmt in args.fmts.split(","):
                    row = measure(k, n, m, rank, fmt, args.every_config, args.fused)
                    rows.append(row)
                    print(
                        json.dumps({a: (round(b, 2) if isinstance(b, float) else b) for a, b in row.items()})
                    )
    print("\nus (CUDA-graph replays, 64 MB memset before each call); layer = pre-pass + weight + GEMM")
    print(
        "| K x N | M | rank | fmt | bf16 | layer cublas | layer expand | fused | bf16 / expand | cublas / expand "
        "| GEMM expand | expansion + scaled_mm | scaled_mm | rel | tile |"
    )
    print("|---" * 15 + "|")
    for r in rows:
        fused = f"{r['fused']:.1f}" if "fused" in r else "-"
        print(
            f"| {r['K']}x{r['N']} | {r['M']} | {r['rank']} | {r['fmt']} | {r['bf16']:.1f} | {r['cublas']:.1f} | "
            f"{r['expand']:.1f} | {fused} | {r['bf16'] / r['expand']:.2f}x | {r['cublas'] / r['expand']:.2f}x | "
            f"{r['gemm_expand']:.1f} | {r['expansion'] + r['gemm_scaled_mm']:.1f} | {r['gemm_scaled_mm']:.1f} | "
            f"{r['rel']:.1e} | {r['expand_tile']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
