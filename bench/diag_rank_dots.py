# ruff: noqa: B023  (closures are timed before the loop variables change)
"""The large-M statistics launch's ``x @ l1`` in its own dot against cuBLAS, side by side.

    python bench/diag_rank_dots.py [--shapes 3072x3072,...] [--ms 4608] [--ranks 32,96,160]

The statistics launch of the large-M pre-pass computes the row maxima and ``x @ l1`` in one
read of X, with Triton dots of power-of-two widths whose fp32 accumulator must stay in
registers.  Where ``prepass_split_triton.branch_by_cublas`` says so (many ranks) it leaves
``x @ l1`` to cuBLAS (``torch.mm``, fp32 out, a second read of X).  For each shape, row count
and rank (INT4, one FP8 scale per operand), timed as ``bench_w4.bench`` times: bf16
``F.linear``; the statistics launch alone (with cuBLAS's product where it takes one) both ways;
the whole layer (``w4_linear(..., path="prefill")``, as ``bench_w4.ours`` calls it) both ways;
and what each rank costs the layer over the first rank listed (each way, and as
``branch_by_cublas`` routes).  The ``x @ l1`` of both ways is checked against float64.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_w4 import bench, cache_factors, make_w4, ours, sweep_args  # noqa: E402
from studio.kernels import prepass_split_triton  # noqa: E402
from studio.kernels.prepass_split_triton import row_stats_triton  # noqa: E402

WAYS = ("triton_dot", "cublas")


@contextmanager
def branch_by(way: str) -> Iterator[None]:
    """Within it the statistics launch takes ``x @ l1`` at every rank from its own dot
    (``"triton_dot"``) or from cuBLAS (``"cublas"``)."""
    real = prepass_split_triton.branch_by_cublas
    prepass_split_triton.branch_by_cublas = lambda m, r: way == "cublas"
    try:
        yield
    finally:
        prepass_split_triton.branch_by_cublas = real


def partials_error(x: torch.Tensor, sinv: torch.Tensor, l1: torch.Tensor) -> float:
    stats = row_stats_triton(x, sinv, l1, scaling="tensor")
    got = stats.la[: stats.la_parts].sum(0).double()
    want = x.double() @ l1.double()
    return ((got - want).norm() / want.norm()).item()


def routed_layer(row: dict, r: int) -> float:
    """The layer's time at rank ``r`` the way ``branch_by_cublas`` routes it."""
    way = "cublas" if prepass_split_triton.branch_by_cublas(row["M"], r) else "triton_dot"
    return row[f"r{r}_{way}_layer"]


def print_table(rows: list[dict], ranks: list[int]) -> None:
    base = ranks[0]
    print(f"\nK x N | M | rank | stats: own dot / cuBLAS | layer: own dot / cuBLAS (x bf16) | over rank {base}: "
          "own dot / cuBLAS / as routed")  # fmt: skip
    for row in rows:
        for r in ranks:
            s, o = row[f"r{r}_triton_dot_layer"], row[f"r{r}_cublas_layer"]
            more = [row[f"r{r}_{w}_layer"] / row[f"r{base}_{w}_layer"] - 1 for w in WAYS]
            more.append(routed_layer(row, r) / routed_layer(row, base) - 1)
            print(
                f"{row['K']}x{row['N']} | {row['M']} | {r} | {row[f'r{r}_triton_dot_stats']:.1f} / "
                f"{row[f'r{r}_cublas_stats']:.1f} | {s:.1f} ({row['bf16'] / s:.2f}x) / {o:.1f} "
                f"({row['bf16'] / o:.2f}x) | " + " / ".join(f"{v:+.1%}" for v in more)
            )


def main() -> None:
    args = sweep_args(
        __doc__,
        "diag_rank_dots.py",
        ms="4608",
        more=lambda ap: ap.add_argument("--ranks", default="32,96,160"),
    )
    ranks = [int(v) for v in args.ranks.split(",")]
    rows = []
    torch.manual_seed(0)
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda").bfloat16()
            row: dict = {"K": k, "N": n, "M": m, "bf16": bench(lambda: F.linear(x, w))}
            for r in ranks:
                p = cache_factors(make_w4(k, n, r, "int4", "cuda"))
                for way in WAYS:
                    with branch_by(way):
                        row[f"r{r}_{way}_err"] = partials_error(x, p["smooth_inv"], p["l1"])
                        row[f"r{r}_{way}_stats"] = bench(
                            lambda: row_stats_triton(x, p["smooth_inv"], p["l1"], scaling="tensor")
                        )
                        row[f"r{r}_{way}_layer"] = bench(lambda: ours(x, p, None, path="prefill"))
            rows.append(row)
            print(
                json.dumps({key: float(f"{v:.4g}") if isinstance(v, float) else v for key, v in row.items()})
            )
    print_table(rows, ranks)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
