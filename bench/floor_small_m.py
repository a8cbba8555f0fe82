# ruff: noqa: B023  (every closure below is timed before its loop variables change)
"""How fast can any one kernel be at M <= 64?  The read floor, measured as ``bench_w4`` times.

    python bench/floor_small_m.py [--shapes 3072x3072,...] [--ms 16,64] [--json out.json]

At M <= 64 a layer is bound by reading its weights.  The goal's 2.5x against bf16 is only
reachable where a kernel that does nothing but read the bytes the 4-bit layer must read
(codes, group scales, the rank-32 branch ``l1`` / ``l2`` and the bias) once, at the best tile
found, is more than 2.5x faster than bf16 ``F.linear``.  This script times, side by side in
one run and under both of ``bench_w4``'s timings (``flush``: CUDA-graph replays after a 64 MB
memset, the goal's numbers; ``stream``: back to back on cold copies, a decode step):

- ``empty``: a kernel of one program that stores one word (what a launch costs here);
- ``read_w4``: the fastest of ``READ_TILES`` streaming those bytes (a sum of 16-byte words
  per program, one word stored per program, so nothing is optimised away);
- ``read_bf16``: the same over the bf16 layer's bytes (how near cuBLAS is to its own floor);
- ``bf16``: ``F.linear``; ``ours``: the layer as it runs (INT4, rank 32, ``path="auto"``).

It prints ``bf16 / read_w4``, the best ratio any kernel that reads the 4-bit bytes once could
reach, beside ours, and ``ours / read_w4``, how far ours is from that floor.
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

from bench.bench_w4 import (
    bench,
    bench_stream,
    both_timings,
    copies_for_cold_l2,
    ours,
    sweep_args,
    swept_layers,
)  # noqa: E402

#: (16-byte words per program per step, steps per program, warps) tried for the read floor.
READ_TILES = [(512, 1, 4), (1024, 1, 4), (2048, 1, 8), (1024, 4, 4), (2048, 4, 8), (4096, 2, 8)]


@triton.jit
def _read_kernel(src, out, n_words, WORDS: tl.constexpr, STEPS: tl.constexpr):
    """Program p sums its ``STEPS`` runs of ``WORDS`` int32x4 words and stores one int32."""
    pid = tl.program_id(0)
    acc = tl.zeros([WORDS, 4], dtype=tl.int32)
    lane = tl.arange(0, WORDS)[:, None] * 4 + tl.arange(0, 4)[None, :]
    for step in range(STEPS):
        base = (pid * STEPS + step) * WORDS * 4
        offs = base + lane
        acc += tl.load(src + offs, mask=offs < n_words * 4, other=0)
    tl.store(out + pid, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _empty_kernel(out):
    tl.store(out, 1)


def read_fn(buf: torch.Tensor, out: torch.Tensor, tile: tuple[int, int, int]):
    """A closure that streams ``buf`` (int32, length a multiple of 4) once with ``tile``."""
    words, steps, warps = tile
    n_words = buf.numel() // 4
    grid = (triton.cdiv(n_words, words * steps),)
    return lambda: _read_kernel[grid](buf, out, n_words, WORDS=words, STEPS=steps, num_warps=warps)


def as_words(n_bytes: int) -> torch.Tensor:
    """A random int32 buffer of at least ``n_bytes``, in whole 16-byte words."""
    n = -(-n_bytes // 16) * 4
    return torch.randint(-(2**31), 2**31 - 1, (n,), device="cuda", dtype=torch.int32)


def floor_times(n_bytes: int) -> dict:
    """Best read time of ``n_bytes`` under both timings, and the tile that gave each."""
    copies = [as_words(n_bytes) for _ in range(copies_for_cold_l2(n_bytes))]
    out = torch.empty(1 << 20, device="cuda", dtype=torch.int32)
    flush = {tile: bench(read_fn(copies[0], out, tile)) for tile in READ_TILES}
    stream = {tile: bench_stream([read_fn(c, out, tile) for c in copies]) for tile in READ_TILES}
    best_flush, best_stream = min(flush, key=flush.get), min(stream, key=stream.get)
    return {
        "flush": flush[best_flush],
        "flush_tile": list(best_flush),
        "stream": stream[best_stream],
        "stream_tile": list(best_stream),
    }


def w4_bytes(p: dict, bias: torch.Tensor) -> int:
    """What the 4-bit layer must read besides the activations: codes, scales, branch, bias."""
    return sum(t.numel() * t.element_size() for t in (p["qweight"], p["wscale"], p["l1"], p["l2"], bias))


def measure(shapes: str, ms: str) -> list[dict]:
    """One row per shape and row count: the floors (once per shape), bf16 and ours."""
    out = torch.empty(1, device="cuda", dtype=torch.int32)
    floors, rows = {}, []
    for k, n, m, x, (w, bias, w_copies, p, p_copies) in swept_layers(shapes, ms):
        if (k, n) not in floors:
            n_w4, n_bf16 = w4_bytes(p, bias), (w.numel() + n) * 2
            floors[(k, n)] = {
                "w4_mb": n_w4 / 2**20,
                "bf16_mb": n_bf16 / 2**20,
                "empty": {
                    "flush": bench(lambda: _empty_kernel[(1,)](out)),
                    "stream": bench_stream([lambda: _empty_kernel[(1,)](out)]),
                },
                "read_w4": floor_times(n_w4),
                "read_bf16": floor_times(n_bf16),
            }
        bias16 = bias.to(torch.bfloat16)
        row = {"k": k, "n": n, "m": m, **floors[(k, n)]}
        row["bf16"] = both_timings(lambda c: F.linear(x, c, bias16), w, w_copies)
        row["ours"] = both_timings(lambda c: ours(x, c, bias), p, p_copies)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print("\ntimes in us; flush = after a 64 MB memset (bench_w4's goal timing), stream = back to back")
    head = "| K x N | M | timing | empty | read_w4 | read_bf16 | bf16 | ours | bf16/read_w4 | bf16/ours | ours/read_w4 |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in rows:
        for t in ("flush", "stream"):
            e, f4, f16, b, o = (r[c][t] for c in ("empty", "read_w4", "read_bf16", "bf16", "ours"))
            print(
                f"| {r['k']}x{r['n']} | {r['m']} | {t} | {e:.1f} | {f4:.1f} | {f16:.1f} | {b:.1f} | {o:.1f} "
                f"| {b / f4:.2f}x | {b / o:.2f}x | {o / f4:.2f}x |"
            )


def main() -> None:
    args = sweep_args(__doc__, "floor_small_m", ms="16,64")
    rows = measure(args.shapes, args.ms)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
