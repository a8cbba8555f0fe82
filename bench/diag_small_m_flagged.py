# ruff: noqa: B023  (every closure below is timed before its loop variables change)
"""The 16-row Gluon layer's finishes side by side: counters (``await``) vs flagged words (``flag``).

    python bench/diag_small_m_flagged.py [--shapes 3072x3072,...] [--ms 16] [--rounds 2] [--timeline] [--json out.json]

Per FLUX shape (INT4, rank 32, a bias, 16 rows unless ``--ms`` says fewer): first the flagged finish against
``reference_small_m`` and the share of its outputs that differ from the awaiting finish's
(1, 5 and 16 rows, pinned tile); then each tile of ``TILES`` (with the shape's pinned one), activations scaled as
``GLUON_TILES`` pins them, each finish, timed as ``bench_w4`` times (``flush``: after a 64 MB
memset; ``stream``: back to back on cold weight copies) in ``--rounds`` interleaved rounds,
beside bf16 ``F.linear``.  It prints each finish's best time and bf16's time over it: the
small-M goal is 2.5x.  ``--timeline``: then one launch of each finish at the pinned tile with
``%globaltimer`` stamps (``diag_small_m_gluon_parts.timeline``; the flagged finish stamps
"finishes a block from" when its inputs are all in).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_w4 import bench, both_timings, sweep_args, swept_layers  # noqa: E402
from bench.diag_small_m_gluon_layer import layer_args  # noqa: E402
from bench.diag_small_m_gluon_parts import timeline  # noqa: E402
from studio.kernels.reference_small_m import w4_linear_small_m  # noqa: E402
from studio.kernels.small_m_gluon_layer import default_tile, w4_linear_small_m_gluon  # noqa: E402

#: (BLOCK_N, SPLIT_K, warps, stages) timed beside each shape's pinned tile.
TILES = [(64, 4, 4, 3), (64, 8, 4, 3), (64, 8, 4, 4), (128, 4, 4, 3), (128, 8, 4, 4), (128, 16, 4, 4)]

FINISHES = ("await", "flag")


def check(k: int, p: dict, bias: torch.Tensor) -> list[dict]:
    """The flagged finish at the pinned tile: relative error (Frobenius) against the reference
    and the share of outputs that differ from the awaiting finish's, at 1, 5 and 16 rows."""
    found = []
    for m in (1, 5, 16):
        args = layer_args(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), p, bias)
        ref = w4_linear_small_m(*args, scaled_codes=False).float()
        got = w4_linear_small_m_gluon(*args, finish="flag")
        differ = (got != w4_linear_small_m_gluon(*args, finish="await")).float().mean().item()
        err = ((got.float() - ref).norm() / ref.norm()).item()
        found.append(
            {"k": k, "n": p["qweight"].shape[1], "m": m, "rel_err": err, "differ_from_await": differ}
        )
        print(json.dumps(found[-1]), flush=True)
    return found


def main() -> None:
    def more(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--rounds", type=int, default=2)
        ap.add_argument("--timeline", action="store_true")

    args = sweep_args(__doc__, "diag_small_m_flagged", more=more)
    report = {"check": [], "times": []}
    for k, n, m, x, (w, bias, _, p, copies) in swept_layers(args.shapes, args.ms):
        report["check"] += check(k, p, bias)
        *pinned, prescale, _ = default_tile(k // 64, n)
        tiles = [tuple(pinned)] + [t for t in TILES if t != tuple(pinned)]
        row = {"k": k, "n": n, "m": m, "pinned": pinned, "prescale": prescale, "bf16": [], "runs": {}}
        for _ in range(args.rounds):
            row["bf16"].append(bench(lambda: F.linear(x, w, bias.to(torch.bfloat16))))
            for tile in tiles:
                for finish in FINISHES:
                    key = json.dumps([*tile, finish])
                    t = both_timings(
                        lambda c: w4_linear_small_m_gluon(
                            *layer_args(x, c, bias), tile=tile, prescale=prescale, finish=finish
                        ),
                        p,
                        copies,
                    )
                    row["runs"].setdefault(key, []).append(t)
        print(json.dumps(row), flush=True)
        bf16 = min(row["bf16"])
        for finish in FINISHES:
            mine = {key: runs for key, runs in row["runs"].items() if json.loads(key)[-1] == finish}
            best = {
                timing: min(
                    ((min(r[timing] for r in runs), key) for key, runs in mine.items()), key=lambda v: v[0]
                )
                for timing in ("flush", "stream")
            }
            pin = min(r["flush"] for r in mine[json.dumps([*pinned, finish])])
            print(
                f"{k}x{n} M={m} {finish}: pinned tile {pin:.1f} us ({bf16 / pin:.2f}x bf16 {bf16:.1f}) | best flush "
                f"{best['flush'][0]:.1f} {best['flush'][1]} ({bf16 / best['flush'][0]:.2f}x) | best stream "
                f"{best['stream'][0]:.1f} {best['stream'][1]}",
                flush=True,
            )
        if args.timeline:
            flush = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
            for finish in FINISHES:
                print(timeline(x, p, bias, tuple(pinned), flush, finish, prescale), flush=True)
        report["times"].append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
