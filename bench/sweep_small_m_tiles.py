# ruff: noqa: B023  (closures are timed before the loop variables change)
"""Which tile the small-M path should run per FLUX shape: every candidate timed two ways.

    python bench/sweep_small_m_tiles.py [--shapes 3072x3072,...] [--ms 16,64] [--json out.json]
    python bench/sweep_small_m_tiles.py --choose run1.json,run2.json

Per shape and M (INT4, rank 32, the launcher's default variant), every tile (BLOCK_N,
SPLIT_K, warps, stages) of ``CANDIDATES`` is timed three ways: as ``bench_w4`` times the
layer (``flush``: CUDA-graph replays, L2 flushed by a memset before each call, the goal's
numbers), the same with L2 evicted by a read (``clean``: no written lines to write back),
and back to back on rotating weight copies (``stream``: ``bench_w4.bench_stream``, a decode
step through many layers).  Beside them: the autotuned launcher (``config=None`` with no pinned tile, as it
ran before tiles were pinned) and its pick, the launcher as it runs now (pinned tile where
``small_m_tiles`` has one), and bf16 ``F.linear``, under both timings.  ``--variants`` adds
launcher options to time at every tile too (``tl-fragment``: fragment order with Triton's
own decode, the form that is right above 16 rows).  The best tiles per timing are printed.

``--choose`` reads the JSON of one or more runs and prints, per shape and M, the tile with
the lowest mean of (its time / the best tile's time) over every run and timing: the tile
``studio/kernels/small_m_tiles.py`` pins (docs/results.md has the runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_w4 import bench, bench_stream, parse_tiles, swept_layers  # noqa: E402
from studio.kernels.small_m_tiles import tile_config, tile_key  # noqa: E402
from studio.kernels.small_m_triton import _split_configs, _w4_small_m_kernel, w4_linear_small_m_triton  # noqa: E402

#: The autotuner's tiles and the ones the stage diag found best (thirteenth session).
CANDIDATES = sorted(
    {
        tuple(c.all_kwargs()[key] for key in ("BLOCK_N", "SPLIT_K", "num_warps", "num_stages"))
        for c in _split_configs()
    }
    | {
        (64, 4, 4, 3),
        (64, 8, 4, 3),
        (64, 16, 4, 4),
        (64, 8, 4, 5),
        (128, 8, 4, 5),
        (128, 4, 4, 5),
        (32, 8, 4, 3),
    }
)
TIMINGS = ("flush", "clean", "stream")
VARIANTS = {"default": {}, "tl-fragment": {"fragment_order": True, "asm": False}}


def choose(runs: list[list[dict]]) -> dict[tuple[int, int, int], tuple[str, float]]:
    """Per (BLOCK_M, K groups, N): the default-variant tile with the lowest mean time relative
    to the best tile of its run and timing, and that mean (1.0: best in every run and timing)."""
    scores: dict[tuple[int, int, int], dict[str, list[float]]] = {}
    for rows in runs:
        for row in rows:
            key = tile_key(row["m"], -(-row["k"] // 64), row["n"])
            tiles = {t: v for t, v in row["tiles"].items() if t.startswith("default ")}
            for how in TIMINGS:
                if not tiles or how not in next(iter(tiles.values())):
                    continue
                best = min(v[how] for v in tiles.values())
                for tile, v in tiles.items():
                    scores.setdefault(key, {}).setdefault(tile, []).append(v[how] / best)
    chosen = {}
    for key, per_tile in scores.items():
        tile = min(per_tile, key=lambda t: sum(per_tile[t]) / len(per_tile[t]))
        chosen[key] = (tile.removeprefix("default "), sum(per_tile[tile]) / len(per_tile[tile]))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="3072x3072,3072x9216,3072x12288,12288x3072")
    parser.add_argument("--ms", default="16,64")
    parser.add_argument("--variants", default="default", help=f"of: {','.join(VARIANTS)}")
    parser.add_argument(
        "--tile-list", default=None, help="BLOCK_N,SPLIT_K,warps,stages;... (default: CANDIDATES)"
    )
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--choose", default=None, help="runs' JSON files, comma-separated: print the tiles to pin"
    )
    args = parser.parse_args()
    if args.choose:
        runs = [json.loads(Path(f).read_text()) for f in args.choose.split(",")]
        for key, (tile, score) in sorted(choose(runs).items()):
            print(f"    {key}: {tile},  # {score:.3f} x the best, mean over runs and timings")
        return
    tiles = parse_tiles(args.tile_list) if args.tile_list else CANDIDATES
    rows = []
    for k, n, m, x, (w_bf16, bias, bf16_copies, p, copies) in swept_layers(args.shapes, args.ms):

        def call(c: dict, **kw: object) -> torch.Tensor:
            return w4_linear_small_m_triton(
                x, c["smooth_inv"], c["qweight"], c["wscale"], "int4", c["l1"], c["l2"], c["strength"], 1,
                bias, **kw,
            )  # fmt: skip

        def both(**kw: object) -> dict:
            return {
                "flush": bench(lambda: call(p, **kw)),
                "clean": bench(lambda: call(p, **kw), evict="read"),
                "stream": bench_stream([lambda c=c: call(c, **kw) for c in copies]),
            }

        row = {"k": k, "n": n, "m": m}
        row["bf16"] = {
            "flush": bench(lambda: F.linear(x, w_bf16)),
            "clean": bench(lambda: F.linear(x, w_bf16), evict="read"),
            "stream": bench_stream([lambda w=w: F.linear(x, w) for w in bf16_copies]),
        }
        row["now"] = both()
        row["autotuned"] = both(pinned=False)
        best = _w4_small_m_kernel.best_config
        row["autotune_pick"] = [
            best.kwargs["BLOCK_N"],
            best.kwargs["SPLIT_K"],
            best.num_warps,
            best.num_stages,
        ]
        row["tiles"] = {}
        for name in args.variants.split(","):
            for tile in tiles:
                if tile[1] > max(1, (k // 64) // 2):
                    continue
                cfg = tile_config(tile)
                row["tiles"][f"{name} {tile}"] = both(config=cfg, **VARIANTS[name])
        rows.append(row)
        head = f"{k}x{n} M={m}:"
        for how in TIMINGS:
            times = {t: v[how] for t, v in row["tiles"].items()}
            ranked = sorted(times, key=times.get)[:4]
            print(
                f"{head} [{how}] bf16 {row['bf16'][how]:.1f} | now {row['now'][how]:.1f} "
                f"({row['bf16'][how] / row['now'][how]:.2f}x) | autotuned {row['autotuned'][how]:.1f} "
                f"(pick {tuple(row['autotune_pick'])}) | best: "
                + ", ".join(f"{t} {times[t]:.1f}" for t in ranked),
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
