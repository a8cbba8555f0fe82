# ruff: noqa: B023  (every closure below is timed before its loop variables change)
"""The Gluon small-M product (``studio/kernels/small_m_gluon.py``) against the read floor.

    python bench/diag_small_m_gluon.py [--shapes 3072x3072,...] [--ms 16] [--json out.json]

Per FLUX shape: first its sums against a float64 product (rows 1, 5, 16); then, per row
count, every tile of ``TILES`` timed as ``bench_w4`` times (``flush``: after a 64 MB memset;
``stream``: back to back on cold weight copies), beside the read floor of the 4-bit bytes
(``floor_small_m.floor_times``), bf16 ``F.linear`` and the layer as it runs now (``ours``).
The Gluon times are of the product alone (fp32 partials, no branch, no epilogue), so they
say how near the weight stream gets to the floor, not what a layer built on it would take.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_w4 import bench, both_timings, fastest, ours, sweep_args, swept_layers  # noqa: E402
from bench.floor_small_m import floor_times, w4_bytes  # noqa: E402
from studio.kernels.reference import dequantize_weight  # noqa: E402
from studio.kernels.small_m_gluon import w4_small_m_partials_gluon  # noqa: E402
from studio.kernels.small_m_triton import _small_m_epilogue_kernel, scaled_activations  # noqa: E402

#: (kind, BLOCK_N, SPLIT_K, warps, depth): see ``w4_small_m_partials_gluon``.
TILES = [("regs", bn, sk, 4, 2) for bn in (64, 128) for sk in (4, 8, 16)] + [
    ("async", bn, sk, w, st)
    for bn, w in ((64, 4), (128, 4), (128, 8), (256, 8))
    for sk in (2, 4, 8, 16)
    for st in (3, 4, 6)
]
#: Tiles whose sums are checked (odd splits leave short and empty runs of groups).
CHECKED = [
    ("regs", 64, 4, 4, 1),
    ("regs", 128, 3, 4, 4),
    ("async", 64, 4, 4, 3),
    ("async", 128, 5, 8, 4),
    ("async", 256, 16, 8, 6),
]


def layer_without_branch(x: torch.Tensor, p: dict, bias: torch.Tensor, tile: tuple) -> torch.Tensor:
    """A rank-0 layer from the Gluon product: the scaling kernel, the product, the small-M path's
    epilogue kernel (splits + bias): three launches, what a layer built on it costs at least."""
    m, n = x.shape[0], p["qweight"].shape[1]
    xs, _ = scaled_activations(x, p["smooth_inv"], False)
    part = w4_small_m_partials_gluon(xs, p["qweight"], p["wscale"], tile)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _small_m_epilogue_kernel[(triton.cdiv(m, 16), triton.cdiv(n, 32))](
        part, part, part, part, bias, out, m, n, 1, 1, 1, 0, 0, out.stride(0), tile[2],
        HAS_BRANCH=False, HAS_BIAS=True, LA_R=32, DOT_DTYPE=tl.bfloat16, BLOCK_M=16, BLOCK_N=32,
    )  # fmt: skip
    return out


def check(k: int, n: int, p: dict, w_ref: torch.Tensor) -> list[dict]:
    """Relative error of the Gluon sums against the float64 product with the dequantized weight
    ``w_ref [KG * 64, N]``, per row count and tile of ``CHECKED``."""
    found = []
    for m in (1, 5, 16):
        xs, _ = scaled_activations(
            torch.randn(m, k, device="cuda", dtype=torch.bfloat16), p["smooth_inv"], False
        )
        ref = xs.double() @ w_ref
        for tile in CHECKED:
            got = w4_small_m_partials_gluon(xs, p["qweight"], p["wscale"], tile).sum(0).double()
            err = ((got - ref).norm() / ref.norm()).item()
            found.append({"k": k, "n": n, "m": m, "tile": tile, "rel_err": err})
            print(json.dumps(found[-1]), flush=True)
    return found


def main() -> None:
    args = sweep_args(__doc__, "diag_small_m_gluon")
    report = {"check": [], "times": []}
    per_shape = {}  # (k, n) -> (dequantized weight, read floor): once per shape, not per row count
    for k, n, m, x, (w, bias, _, p, copies) in swept_layers(args.shapes, args.ms):
        if (k, n) not in per_shape:
            kg = p["qweight"].shape[0]
            w_ref = dequantize_weight(p["qweight"], p["wscale"], "int4", kg * 64).double().t()
            report["check"] += check(k, n, p, w_ref)
            per_shape[(k, n)] = w_ref, floor_times(w4_bytes(p, bias))
        w_ref, floor = per_shape[(k, n)]
        xs, _ = scaled_activations(x, p["smooth_inv"], False)
        row = {"k": k, "n": n, "m": m, "floor": floor}
        row["bf16"] = bench(lambda: F.linear(x, w, bias.to(torch.bfloat16)))
        row["ours"] = bench(lambda: ours(x, p, bias))
        tiles = {
            json.dumps(tile): both_timings(
                lambda c: w4_small_m_partials_gluon(xs, c["qweight"], c["wscale"], tile), p, copies
            )
            for tile in TILES
        }
        row["gluon"] = tiles
        best_f, best_s = fastest(tiles)
        row["best_flush"], row["best_stream"] = best_f, best_s
        tile = tuple(json.loads(best_f))
        ref = xs.double() @ w_ref + bias.double()
        got = layer_without_branch(x, p, bias, tile).double()
        row["layer_rel_err"] = ((got - ref).norm() / ref.norm()).item()
        layer = both_timings(lambda c: layer_without_branch(x, c, bias, tile), p, copies)
        row["layer_no_branch"], row["layer_no_branch_stream"] = layer["flush"], layer["stream"]
        print(
            f"  layer without branch, {tile}: {row['layer_no_branch']:.1f} us flush, "
            f"{row['layer_no_branch_stream']:.1f} us stream (bf16 / it: {row['bf16'] / row['layer_no_branch']:.2f}x); "
            f"rel err {row['layer_rel_err']:.2e}",
            flush=True,
        )
        print(json.dumps(row), flush=True)
        print(
            f"{k}x{n} M={m}: bf16 {row['bf16']:.1f} ours {row['ours']:.1f} | read floor flush "
            f"{floor['flush']:.1f} stream {floor['stream']:.1f} | gluon best flush {tiles[best_f]['flush']:.1f} "
            f"{best_f}, stream {tiles[best_s]['stream']:.1f} {best_s}",
            flush=True,
        )
        report["times"].append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
