# ruff: noqa: B023  (every closure below is timed before its loop variables change)
"""The one-launch Gluon small-M layer (``studio/kernels/small_m_gluon_layer.py``): tiles and floor.

    python bench/diag_small_m_gluon_layer.py [--shapes 3072x3072,...] [--ms 16] [--json out.json]

Per FLUX shape (INT4, rank 32, a bias): first the layer's error against ``reference_small_m``
(its codes exact up to 16 rows, scaled above: ``uses_scaled_codes``) at 1, 5, 16, 40 and 64
rows; then, per row count, every tile and variant of ``variants``, timed as ``bench_w4`` times
(``flush``: after a 64 MB memset; ``stream``: back to back on cold weight copies), beside
the read floor of the layer's bytes (``floor_small_m.floor_times``), bf16 ``F.linear`` and the
``tl`` kernel (``w4_linear_small_m_triton`` at its pinned tile).  It prints the best tile per
timing and bf16's time over it: the small-M goal is 2.5x.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_w4 import bench, both_timings, fastest, sweep_args, swept_layers  # noqa: E402
from bench.floor_small_m import floor_times, w4_bytes  # noqa: E402
from studio.kernels.reference_small_m import w4_linear_small_m  # noqa: E402
from studio.kernels.small_m_gluon_layer import (  # noqa: E402
    block_rows,
    default_tile,
    uses_scaled_codes,
    w4_linear_small_m_gluon,
)
from studio.kernels.small_m_triton import w4_linear_small_m_triton  # noqa: E402

#: (BLOCK_N, SPLIT_K, warps, stages): see ``w4_linear_small_m_gluon``.
TILES = [(bn, sk, 4, st) for bn in (64, 128) for sk in (2, 4, 8, 16) for st in (3, 4)] + [
    (256, sk, 8, 4) for sk in (2, 4, 8)
]

#: The tiles of the ``mma.sync`` column programs above 16 rows: at most 16 columns per warp
#: (32 spill the accumulators at 64 rows).
TILES_MORE_ROWS = [(bn, sk, bn // 16, st) for bn in (64, 128) for sk in (2, 4, 8) for st in (3, 4)] + [
    (64, sk, 4, 4) for sk in (1, 16)
]

#: The tiles of the ``wgmma`` column programs (33-64 rows; one warpgroup).
TILES_WGMMA = [(bn, sk, 4, st) for bn in (64, 128) for sk in (2, 4, 8) for st in (3, 4)] + [
    (256, sk, 4, st) for sk in (1, 2, 4) for st in (3, 4)
]


def variants(m: int) -> list[tuple[tuple[int, ...], dict]]:
    """(tile, launcher keywords) swept at ``m`` rows.  Up to 16: exact codes, the awaiting
    finish, activations scaled in the kernel or by the pre-kernel (launched before the layer
    with dependent launch), the codes as the dot's left or right operand (``codes_left``; the
    eighteenth session swept both finishes: ``await`` was faster in 26-31 of 38 pairs per
    shape).  Above: scaled codes and the pre-kernel (faster at every tile of the seventeenth
    session's first sweep at 64 rows); ``mma.sync`` column programs at 17-32 rows; at 33-64
    ``wgmma`` ones, beside the two best ``mma.sync`` tiles of that sweep."""
    if m <= 16:
        return [
            (t, {"prescale": pre, "codes_left": left})
            for t in TILES
            for pre in (False, True)
            for left in (True, False)
        ]
    mma = {"prescale": True, "scaled_codes": True, "wgmma": False}
    if m <= 32:
        return [(t, mma) for t in TILES_MORE_ROWS]
    return [(t, {"wgmma": True}) for t in TILES_WGMMA] + [(t, mma) for t in ((64, 4, 4, 3), (64, 4, 4, 4))]


def layer_args(x: torch.Tensor, p: dict, bias: torch.Tensor) -> tuple:
    """``w4_linear``'s arguments for ``x`` on ``bench_w4``'s packed layer ``p``."""
    return (x, p["smooth_inv"], p["qweight"], p["wscale"], "int4", p["l1"], p["l2"], p["strength"], 1, bias)


def check(k: int, p: dict, bias: torch.Tensor) -> list[dict]:
    """Relative error (Frobenius) of the layer at its default tile against the reference, per
    row count, activations scaled in the kernel and before it (before it only where the
    default column programs take nothing else)."""
    found = []
    for m in (1, 5, 16, 40, 64):
        args = layer_args(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), p, bias)
        ref = w4_linear_small_m(*args, scaled_codes=uses_scaled_codes(m)).float()
        # (at 33-64 rows the default column programs, wgmma, read pre-scaled activations only)
        for prescale in (True,) if block_rows(m) == 64 else (False, True):
            got = w4_linear_small_m_gluon(*args, prescale=prescale).float()
            err = ((got - ref).norm() / ref.norm()).item()
            found.append({"k": k, "n": p["qweight"].shape[1], "m": m, "prescale": prescale, "rel_err": err})
            print(json.dumps(found[-1]), flush=True)
    return found


def main() -> None:
    args = sweep_args(__doc__, "diag_small_m_gluon_layer")
    report = {"check": [], "times": []}
    floors = {}  # (k, n) -> read floor, once per shape
    for k, n, m, x, (w, bias, _, p, copies) in swept_layers(args.shapes, args.ms):
        if (k, n) not in floors:
            report["check"] += check(k, p, bias)
            floors[(k, n)] = floor_times(w4_bytes(p, bias))
        row = {"k": k, "n": n, "m": m, "floor": floors[(k, n)]}
        row["default_tile"] = default_tile(k // 64, n, block_rows(m))
        row["bf16"] = bench(lambda: F.linear(x, w, bias.to(torch.bfloat16)))
        tl = both_timings(lambda c: w4_linear_small_m_triton(*layer_args(x, c, bias)), p, copies)
        row["tl"], row["tl_stream"] = tl["flush"], tl["stream"]
        tiles = {
            json.dumps([*tile, kw]): both_timings(
                lambda c: w4_linear_small_m_gluon(*layer_args(x, c, bias), tile=tile, **kw),
                p,
                copies,
            )
            for tile, kw in variants(m)
        }
        row["gluon"] = tiles
        best_f, best_s = fastest(tiles)
        row["best_flush"], row["best_stream"] = best_f, best_s
        print(json.dumps(row), flush=True)
        floor = row["floor"]
        print(
            f"{k}x{n} M={m}: bf16 {row['bf16']:.1f} | tl {row['tl']:.1f} (stream {row['tl_stream']:.1f}) | "
            f"read floor {floor['flush']:.1f} (stream {floor['stream']:.1f}) | gluon best flush "
            f"{tiles[best_f]['flush']:.1f} {best_f} = {row['bf16'] / tiles[best_f]['flush']:.2f}x bf16, "
            f"stream {tiles[best_s]['stream']:.1f} {best_s}",
            flush=True,
        )
        report["times"].append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
