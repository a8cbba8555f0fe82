"""Small-M tiles pinned per layer shape from side-by-side measurement, instead of autotuning.

Triton's autotuner times each tile on the first call of a shape, one launch at a time after
a memset that leaves L2 full of written lines (``triton.testing.do_bench``).  On the FLUX
shapes its pick moved between runs (3 of 8 shape / row-count cases in two runs) and was up to
21 % behind the best tile under the benches' timings (``bench/sweep_small_m_tiles.py``, three
runs, fourteenth session, docs/results.md).  So the shapes that were swept run the tile
measured best there; any other shape is autotuned as before.

The table is for INT4 codes in the launcher's default variant (``w4_linear_small_m_triton``
with no option forced; FP4, whose decode differs, was not swept and is autotuned) on Hopper
(sm_90: measured on an H100; an H200 has the same SMs).  Keys: (rows rounded up to a power of two, at least 16, as the kernel's ``BLOCK_M``; K groups of 64; N).
The rank is not in the key: the branch slices are 1-3 programs per split against 48-384
column blocks.
"""

from __future__ import annotations

import torch
import triton

#: (BLOCK_M, K groups, N) -> (BLOCK_N, SPLIT_K, num_warps, num_stages).
#: Chosen by ``bench/sweep_small_m_tiles.py --choose`` over its runs of 2026-11-24 (H100, rank
#: 32; 16 and 64 rows twice, 32 rows once): the lowest mean of (time / best tile's time) over
#: runs and timings (two in the first run, three in the others);
#: the comments give that mean (1.000: best in every run and timing).
PINNED_TILES: dict[tuple[int, int, int], tuple[int, int, int, int]] = {
    (16, 48, 3072): (64, 8, 4, 4),  # 1.004
    # 1.079: back to back, (64, 4, 4, 3) was 11 % faster; after a memset, 3.6-3.9x slower
    (16, 48, 9216): (128, 8, 4, 4),
    (16, 48, 12288): (128, 4, 4, 5),  # 1.008
    (16, 192, 3072): (64, 8, 4, 5),  # 1.030
    (32, 48, 3072): (128, 4, 4, 4),  # 1.035 (one run from here on)
    (32, 48, 9216): (64, 4, 4, 3),  # 1.002
    (32, 48, 12288): (128, 4, 4, 4),  # 1.000
    (32, 192, 3072): (64, 8, 4, 5),  # 1.001
    (64, 48, 3072): (128, 4, 4, 4),  # 1.003
    (64, 48, 9216): (128, 4, 4, 4),  # 1.010
    (64, 48, 12288): (128, 2, 4, 4),  # 1.000
    (64, 192, 3072): (128, 8, 4, 4),  # 1.000
}


def tile_key(m: int, kg: int, n: int) -> tuple[int, int, int]:
    """``PINNED_TILES``'s key of an ``m`` x (``kg`` groups of 64) x ``n`` layer."""
    return triton.next_power_of_2(max(m, 16)), kg, n


def tile_config(tile: tuple[int, int, int, int]) -> dict:
    """A ``(BLOCK_N, SPLIT_K, num_warps, num_stages)`` tile as the launcher's ``config``."""
    return dict(zip(("BLOCK_N", "SPLIT_K", "num_warps", "num_stages"), tile))


def pinned_tile(m: int, kg: int, n: int, device: torch.device) -> dict | None:
    """The pinned launch config (``tile_config``) of an ``m`` x (``kg`` groups of 64) x ``n``
    layer on ``device``, or None (autotune)."""
    tile = PINNED_TILES.get(tile_key(m, kg, n))
    if tile is None or device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return None
    return tile_config(tile)
