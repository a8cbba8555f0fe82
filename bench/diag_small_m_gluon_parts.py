# ruff: noqa: B023  (every closure below is timed before its loop variables change)
"""Where the Gluon small-M layer's time goes: its parts side by side, and one launch's timeline.

    python bench/diag_small_m_gluon_parts.py [--shapes 3072x3072,...] [--tiles "64,4,4,4;128,8,4,4"]

Per FLUX shape (16 rows, INT4) and tile (BLOCK_N, SPLIT_K, warps, stages), timed as
``bench_w4`` times after a memset (``flush``): the product alone (``small_m_gluon``'s kernel,
fp32 partials, the codes on the side of the dot the layer takes: ``product_kind``), the layer without a branch (rank 0: the product, the count and the finish
of each block) and with rank 32 (branch slices too), each with the activations scaled in the
kernel and by the scaling pre-kernel, and each with either finish (``await``: each block's
last column program waits for its count; ``count``: the arrival that completes a block
finishes it), and rank 32 with the slices last in the grid (``count`` only).  Then, per
finish, one launch of the rank-32 layer after a memset with ``times``: each program's
``%globaltimer`` when it starts, when its loop and stores are done, when it learns it
finishes a block (or, awaiting, that its block is complete), and when it ends, summarised
per kind of program (ns from the first start).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_w4 import bench, parse_tiles, swept_layers  # noqa: E402
from bench.diag_small_m_gluon_layer import layer_args  # noqa: E402
from studio.kernels.small_m_gluon import codes_left_fits, w4_small_m_partials_gluon  # noqa: E402
from studio.kernels.small_m_gluon_layer import DEFAULT_CODES_LEFT, w4_linear_small_m_gluon  # noqa: E402
from studio.kernels.small_m_triton import scaled_activations  # noqa: E402

STAMPS = ("start", "loop and stores done", "finishes a block from", "end")


def product_kind(tile: tuple) -> str:
    """The product kernel's kind that matches the layer's column programs at ``tile``: the codes
    as the dot's left operand where the tile allows it (``DEFAULT_CODES_LEFT``)."""
    return "left" if DEFAULT_CODES_LEFT and codes_left_fits(tile[0], tile[2]) else "async"


def spread(v: torch.Tensor) -> str:
    """``n, min, median, max`` of the stamps that were written (others are NaN)."""
    v = v[~torch.isnan(v)]
    return f"n={v.numel()} {v.min():.0f}/{v.median():.0f}/{v.max():.0f}" if v.numel() else "none"


def timeline(
    x: torch.Tensor,
    p: dict,
    bias: torch.Tensor,
    tile: tuple,
    flush: torch.Tensor,
    finish: str,
    prescale: bool = False,
) -> str:
    """One launch after a memset: per kind of program, each stamp's min/median/max in ns."""
    kg, n = p["qweight"].shape[:2]
    slices = min(kg, 2 * tile[1]) * -(-p["l1"].shape[1] // 32)
    times = torch.zeros(slices + -(-n // tile[0]) * tile[1], 4, dtype=torch.int64, device="cuda")
    for _ in range(3):  # the last of three launches: compiled, warm instruction caches
        times.zero_()
        flush.zero_()
        w4_linear_small_m_gluon(
            *layer_args(x, p, bias), tile=tile, prescale=prescale, finish=finish, times=times
        )
    torch.cuda.synchronize()
    t = times.cpu().double()
    t = torch.where(t > 0, t - t[:, 0].min(), torch.full_like(t, float("nan")))
    lines = [f"  finish {finish}:"]
    for kind, rows in (("slices", t[:slices]), ("columns", t[slices:])):
        lines.append(f"    {kind}: " + "; ".join(f"{s} {spread(rows[:, i])}" for i, s in enumerate(STAMPS)))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="3072x3072,3072x9216,3072x12288,12288x3072")
    ap.add_argument("--tiles", default="64,4,4,4;128,4,4,3;128,8,4,4")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("diag_small_m_gluon_parts needs a CUDA GPU")
    flush = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    for k, n, _, x, (_, bias, _, p, _) in swept_layers(args.shapes, "16"):
        xs, _ = scaled_activations(x, p["smooth_inv"], False)
        rank0 = dict(p, l1=p["l1"][:, :0], l2=p["l2"][:, :0], strength=p["strength"][:, :0])
        for tile in parse_tiles(args.tiles):
            parts = {
                "product": bench(
                    lambda: w4_small_m_partials_gluon(
                        xs, p["qweight"], p["wscale"], (product_kind(tile), *tile)
                    )
                )
            }
            for name, q in (("rank 0", rank0), ("rank 32", p)):
                for pre in (False, True):
                    for finish in ("await", "count"):
                        label = f"{name}{', pre-kernel' if pre else ''}, {finish}"
                        parts[label] = bench(
                            lambda: w4_linear_small_m_gluon(
                                *layer_args(x, q, bias), tile=tile, prescale=pre, finish=finish
                            )
                        )
            parts["rank 32, slices last, count"] = bench(
                lambda: w4_linear_small_m_gluon(
                    *layer_args(x, p, bias), tile=tile, prescale=False, slices_first=False, finish="count"
                )
            )
            print(f"{k}x{n} {tile}: " + " | ".join(f"{s} {v:.1f}" for s, v in parts.items()), flush=True)
            for finish in ("await", "count"):
                print(timeline(x, p, bias, tile, flush, finish), flush=True)


if __name__ == "__main__":
    main()
