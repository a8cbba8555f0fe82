# ruff: noqa: B023  (closures are timed before the loop variables change)
"""Large-M layer with per-token / per-channel scales against one scale per operand, side by side.

    python bench/diag_prefill_scaling.py [--shapes 3072x3072,...] [--ms 4608] [--ranks 32,96]
        [--fused] [--no-stages]

For each shape, row count and rank, timed as ``bench_w4.bench`` times (CUDA-graph replays,
64 MB memset before each call): bf16 ``F.linear`` and bare FP8 ``_scaled_mm`` for the ratios;
the layer (INT4) with each ``reference_prefill.SCALINGS`` choice, and each of its launches
alone (the expansion, the statistics launch, the codes launch, ``_scaled_mm``).  Then
``_scaled_mm`` on random FP8 operands of K and K + 128 columns, with row and channel scales
or one scale each, with and without the bias.  Each layer's output is compared with the
float32 reference of its own scaling and with the bf16 layer (relative Frobenius error).
``--fused`` adds the fused path (``w4_linear(..., path="fused")``, per-token activation codes, the
branch in its epilogue) on the same weights (the path 65-255 rows took before the twenty-sixth session); ``--no-stages``
skips the per-launch and random-operand ``_scaled_mm`` timings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_w4 import bench, make_w4, sweep_args  # noqa: E402
from studio.kernels import reference as ref  # noqa: E402
from studio.kernels import reference_prefill as rp  # noqa: E402
from studio.kernels import w4_linear  # noqa: E402
from studio.kernels.prefill_triton import expand_weight_triton, w4_linear_prefill_triton  # noqa: E402
from studio.kernels.prepass_split_triton import row_codes_triton, row_stats_triton  # noqa: E402


def weights(k: int, n: int, r: int) -> tuple[torch.Tensor, dict]:
    """A random bf16 weight and its SVDQuant-like INT4 form with a rank-``r`` branch that holds
    its top singular directions, plus the cached weight-only factors."""
    w = torch.randn(n, k, device="cuda") * 0.02
    w[:, :8] *= 20  # a few strong input channels, as smoothing leaves them
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    p = make_w4(k, n, r, "int4", "cuda")
    rr = p["l1"].shape[1]
    p["l1"] = (vh[:rr].t() * s[:rr].sqrt()).bfloat16().contiguous()
    p["l2"] = (u[:, :rr] * s[:rr].sqrt()).bfloat16().contiguous()
    p["smooth_inv"] = torch.ones(k, device="cuda")
    p["qweight"], p["wscale"] = ref.quantize_weight(w - p["l2"].float() @ p["l1"].float().t(), "int4")
    p["strength"] = torch.ones(1, rr, device="cuda")
    p["bound"] = rp.branch_bound(p["l1"], p["smooth_inv"])
    p["wmax"] = rp.residual_max(p["wscale"], "int4")
    p["peaks"] = rp.weight_peaks(p["l2"], p["wmax"])
    return w.bfloat16(), p


def layer_args(x: torch.Tensor, p: dict, bias: torch.Tensor) -> tuple:
    return (x, p["smooth_inv"], p["qweight"], p["wscale"], p["fmt"], p["l1"], p["l2"], p["strength"], 1, bias)


def stage_times(x: torch.Tensor, p: dict, scaling: str) -> dict[str, float]:
    """Each launch of the layer alone, in us."""
    r = p["l1"].shape[1]
    peaks = p["peaks"] if scaling == "tensor" else None
    expand = (p["qweight"], p["wscale"], p["fmt"], p["l2"], p["bound"], p["wmax"], p["strength"])
    wq, cs, g = expand_weight_triton(*expand, peaks=peaks)
    stats = row_stats_triton(x, p["smooth_inv"], p["l1"], scaling=scaling)
    xq, sx = row_codes_triton(x, p["smooth_inv"], stats, r, p["strength"], 1, g)
    sa, sb = (sx.view(-1)[:1], cs[:1]) if scaling == "tensor" else (sx, cs.view(1, -1))
    return {
        "expand": bench(lambda: expand_weight_triton(*expand, peaks=peaks)),
        "stats": bench(lambda: row_stats_triton(x, p["smooth_inv"], p["l1"], scaling=scaling)),
        "codes": bench(lambda: row_codes_triton(x, p["smooth_inv"], stats, r, p["strength"], 1, g)),
        "scaled_mm": bench(
            lambda: torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        ),
    }


def gemm_times(m: int, k: int, n: int, bias: torch.Tensor) -> dict[str, float]:
    """``_scaled_mm`` on random FP8 operands of K or K + 128 columns (the rank-32 branch), row
    and channel scales or one scale each, with and without the bf16 bias, in us."""
    out = {}
    bias16 = bias.to(torch.bfloat16)
    for extra in (0, 128):
        a = torch.randn(m, k + extra, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, k + extra, device="cuda").to(torch.float8_e4m3fn)
        scales = {
            "row": (torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")),
            "tensor": (torch.ones((), device="cuda"), torch.ones((), device="cuda")),
        }
        for kind, (sa, sb) in scales.items():
            for with_bias in (False, True):
                out[f"mm_K+{extra}_{kind}" + ("_bias" if with_bias else "")] = bench(
                    lambda: torch._scaled_mm(
                        a,
                        b.t(),
                        scale_a=sa,
                        scale_b=sb,
                        bias=bias16 if with_bias else None,
                        out_dtype=torch.bfloat16,
                    )
                )
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def extra_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--ranks", default="32,96")
    ap.add_argument("--fused", action="store_true", help="also the fused path on the same weights")
    ap.add_argument("--no-stages", action="store_true", help="the whole layers only")


def main() -> None:
    args = sweep_args(
        __doc__,
        "diag_prefill_scaling.py",
        ms="4608",
        more=extra_args,
    )
    rows = []
    torch.manual_seed(0)
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        bias = torch.randn(n, device="cuda") * 0.1
        one = torch.ones((), device="cuda")
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda")
            x[:, :8] *= 10  # outlier channels
            x *= torch.rand(m, 1, device="cuda") * 3 + 0.1  # tokens of different sizes
            x = x.bfloat16()
            row = {"K": k, "N": n, "M": m}
            for r in (int(v) for v in args.ranks.split(",")):
                w, p = weights(k, n, r)
                if "bf16" not in row:
                    w8, x8 = w.to(torch.float8_e4m3fn), x.to(torch.float8_e4m3fn)
                    row["bf16"] = bench(lambda: F.linear(x, w, bias.to(torch.bfloat16)))
                    row["fp8_bare"] = bench(
                        lambda: torch._scaled_mm(
                            x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16
                        )
                    )
                exact = F.linear(x.float(), w.float(), bias)  # this rank's own weight
                layer = layer_args(x, p, bias)
                for scaling in rp.SCALINGS:
                    got = w4_linear_prefill_triton(*layer, bound=p["bound"], wmax=p["wmax"], scaling=scaling)
                    want = rp.w4_linear_prefill(x.float(), *layer[1:], scaling=scaling)
                    row[f"r{r}_{scaling}_err_vs_ref"] = rel(got, want)
                    row[f"r{r}_{scaling}_err_vs_bf16"] = rel(got, exact)
                    row[f"r{r}_{scaling}"] = bench(
                        lambda: w4_linear_prefill_triton(
                            *layer, bound=p["bound"], wmax=p["wmax"], scaling=scaling, peaks=p["peaks"]
                        )
                    )
                    if not args.no_stages:
                        for name, t in stage_times(x, p, scaling).items():
                            row[f"r{r}_{scaling}_stage_{name}"] = t
                if args.fused:
                    row[f"r{r}_fused_err_vs_bf16"] = rel(w4_linear(*layer, path="fused"), exact)
                    row[f"r{r}_fused"] = bench(lambda: w4_linear(*layer, path="fused"))
            if not args.no_stages:
                row.update(gemm_times(m, k, n, bias))
            rows.append(row)
            print(
                json.dumps({key: float(f"{v:.4g}") if isinstance(v, float) else v for key, v in row.items()}),
                flush=True,
            )
    ranks = args.ranks.split(",")
    kinds = rp.SCALINGS + (("fused",) if args.fused else ())
    print("\nK x N | M | bf16 | fp8_bare | " + " | ".join(f"r{r} {s}" for r in ranks for s in kinds))
    for row in rows:
        cells = [
            f"{row[f'r{r}_{s}']:.1f} ({row['bf16'] / row[f'r{r}_{s}']:.2f}x, err {row[f'r{r}_{s}_err_vs_bf16']:.4f})"
            for r in ranks
            for s in kinds
        ]
        print(
            f"{row['K']}x{row['N']} | {row['M']} | {row['bf16']:.1f} | {row['fp8_bare']:.1f} | "
            + " | ".join(cells)
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
