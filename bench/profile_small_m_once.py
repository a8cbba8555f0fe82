"""Run the small-M kernel at one forced tile a few times, for a profiler (``ncu``) to catch.

    ncu -k regex:_w4_small_m_kernel --launch-skip 4 --launch-count 1 python bench/profile_small_m_once.py

Shape 3072x12288, M = 16, INT4, rank 32, tile BLOCK_N 128, SPLIT_K 8, 4 warps, 4 stages (a
tile the autotuner picks there), one launch; ``--k``, ``--n``, ``--m`` for others.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_w4 import make_w4  # noqa: E402
from studio.kernels.small_m_triton import w4_linear_small_m_triton  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=3072)
    parser.add_argument("--n", type=int, default=12288)
    parser.add_argument("--m", type=int, default=16)
    args = parser.parse_args()
    p = make_w4(args.k, args.n, 32, "int4", "cuda")
    x = torch.randn(args.m, args.k, device="cuda", dtype=torch.bfloat16)
    cfg = {"BLOCK_N": 128, "SPLIT_K": 8, "num_warps": 4, "num_stages": 4}
    for _ in range(6):
        w4_linear_small_m_triton(
            x, p["smooth_inv"], p["qweight"], p["wscale"], "int4", p["l1"], p["l2"], p["strength"], 1, None,
            config=cfg, finish="last",
        )  # fmt: skip
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
