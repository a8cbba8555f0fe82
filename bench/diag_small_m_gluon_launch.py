# ruff: noqa: B023  (every closure below is timed before its loop variables change)
"""How the 16-row Gluon layer is launched: the codes' side of the dot and the scaling pre-kernel.

    python bench/diag_small_m_gluon_launch.py [--shapes 3072x3072,...] [--tiles "64,4,4,3;128,8,4,4"]

Per FLUX shape (16 rows, INT4, rank 32, a bias) and tile (its pinned one first, then
``--tiles``), the layer (``w4_linear_small_m_gluon``) timed as ``bench_w4`` times (``flush``
after a 64 MB memset / ``stream`` back to back on cold weight copies) with the codes as the
dot's right (``R``) or left (``L``, ``codes_left``) operand, and the activations scaled in the
column programs (``in-kernel``), by the scaling pre-kernel launched first (``pre``), or by
the pre-kernel with the layer launched after it by programmatic dependent launch (``pre+pdl``,
``dependent_launch``: the layer's programs start while the pre-kernel runs, and its column
programs wait for it only before their first activation copies).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_w4 import bench, bench_stream, parse_tiles, swept_layers  # noqa: E402
from bench.diag_small_m_gluon_layer import layer_args  # noqa: E402
from studio.kernels.small_m_gluon_layer import default_tile, w4_linear_small_m_gluon  # noqa: E402

#: (label, launcher keywords) of the ways the activations are scaled.
SCALINGS = [
    ("in-kernel", {"prescale": False}),
    ("pre", {"prescale": True, "dependent_launch": False}),
    ("pre+pdl", {"prescale": True, "dependent_launch": True}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="3072x3072,3072x9216,3072x12288,12288x3072")
    ap.add_argument("--tiles", default="64,4,4,3;64,8,4,4;128,4,4,3;128,8,4,4")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("diag_small_m_gluon_launch needs a CUDA GPU")
    for k, n, _, x, (w, bias, _, p, copies) in swept_layers(args.shapes, "16"):
        pinned = default_tile(p["qweight"].shape[0], n)
        bf16 = bench(lambda: F.linear(x, w, bias.to(torch.bfloat16)))
        print(f"{k}x{n} (pinned {pinned}): bf16 {bf16:.1f} us; per variant flush / stream, us", flush=True)
        for tile in [tuple(pinned[:4])] + [t for t in parse_tiles(args.tiles) if t != tuple(pinned[:4])]:
            cells = []
            for left in (False, True):
                for label, kw in SCALINGS:

                    def layer(q: dict) -> torch.Tensor:
                        return w4_linear_small_m_gluon(
                            *layer_args(x, q, bias), tile=tile, codes_left=left, **kw
                        )

                    flush = bench(lambda: layer(p))
                    stream = bench_stream([lambda c=c: layer(c) for c in copies])
                    cells.append(f"{'L' if left else 'R'} {label} {flush:.1f}/{stream:.1f}")
            print(f"  {tile}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
