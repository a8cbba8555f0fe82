"""The 16-row Gluon layer's flagged finish (``finish="flag"``, ``studio/kernels/flagged_partials.py``).

On a GPU (``pytest -m gpu``): the same bits as the awaiting finish (it adds the same
partials in the same order) on the layer test's 1-16-row cases, the activations scaled in
the kernel or by the pre-kernel (with dependent launch); launch after launch (the epoch
moves on by one per launch in every column block), in a CUDA graph replayed on new inputs
(the epoch lives in device memory), and after launches that left other words behind
(another rank, other rows, another layer shape), which must not pass for this launch's.
The argument checks run on the CPU too.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import small_m_case

from studio.kernels.flagged_partials import _SCRATCH
from studio.kernels.reference_small_m import w4_linear_small_m
from studio.kernels.small_m_gluon_layer import w4_linear_small_m_gluon

CASES = [
    # (M, K, N, R, tile (BLOCK_N, SPLIT_K, warps, stages))
    (1, 320, 72, 16, (64, 1, 4, 2)),  # one split: nothing to wait for but the branch input
    (7, 704, 136, 48, (64, 5, 4, 3)),  # 11 groups over 5 splits: the last run is empty
    (16, 3072, 200, 32, (128, 8, 4, 4)),
    (12, 704, 256, 96, (256, 4, 8, 6)),
    (16, 3072, 3072, 160, (128, 8, 4, 3)),
    (16, 12288, 192, 0, (128, 16, 4, 4)),  # no branch
    (5, 1024, 520, 64, (64, 2, 8, 4)),
    (16, 3072, 3072, 32, (64, 8, 4, 3)),  # a FLUX shape at its pinned tile
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _epochs(n: int, block_n: int) -> torch.Tensor:
    """The epochs of the flagged scratch of ``n`` outputs in blocks of ``block_n`` (this stream)."""
    return next(pair[1] for key, pair in _SCRATCH.items() if key[2:] == (n, block_n))


@pytest.mark.gpu
@pytest.mark.parametrize("prescale", [False, True])
@pytest.mark.parametrize("m,k,n,r,tile", CASES)
def test_flagged_finish_gives_the_awaiting_finish_bits(
    m: int, k: int, n: int, r: int, tile: tuple, prescale: bool
) -> None:
    """The same bits as ``finish="await"``, within the layer's tolerance of the reference, three
    launches in a row; each launch moves every block's epoch on by one."""
    args = small_m_case(m, k, n, r, "int4", seed=m + k + n + r, device="cuda")
    kw = dict(tile=tile, prescale=prescale)
    expect = w4_linear_small_m_gluon(*args, finish="await", **kw)
    assert _rel(expect, w4_linear_small_m(*args, scaled_codes=False)) < 5e-3
    first = w4_linear_small_m_gluon(*args, finish="flag", **kw)
    torch.cuda.synchronize()
    blocks = -(-n // tile[0])
    before = _epochs(n, tile[0])[:blocks].clone()
    assert (before == before[0]).all() and before[0] > 0
    runs = [w4_linear_small_m_gluon(*args, finish="flag", **kw) for _ in range(2)]
    torch.cuda.synchronize()
    assert torch.equal(_epochs(n, tile[0])[:blocks], before + 2)
    for out in (first, *runs):
        assert torch.isfinite(out).all() and torch.equal(out, expect), kw


@pytest.mark.gpu
@pytest.mark.parametrize("prescale", [False, True])
def test_flagged_finish_replays_in_a_cuda_graph(prescale: bool) -> None:
    """Captured once, replayed on three new inputs: each replay gives the awaiting finish's
    bits for its input (the flag is read from device memory at every replay)."""
    args = small_m_case(16, 3072, 1024, 32, "int4", seed=3, device="cuda")
    x = args[0]
    kw = dict(tile=(64, 8, 4, 3), prescale=prescale)
    w4_linear_small_m_gluon(*args, finish="flag", **kw)  # (compiled and scratch made outside the capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = w4_linear_small_m_gluon(*args, finish="flag", **kw)
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, device="cuda", generator=g).to(x.dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, w4_linear_small_m_gluon(*args, finish="await", **kw))


@pytest.mark.gpu
def test_flagged_finish_ignores_words_left_by_other_launches() -> None:
    """Launches that leave words where the next one reads (more ranks, more rows, another
    layer of the same N but other K) and then a launch with fewer: every launch gives the
    awaiting finish's bits (a stale word carries an older epoch)."""
    tile = (64, 4, 4, 3)
    cases = [
        (16, 1024, 512, 96),
        (16, 1024, 512, 32),
        (3, 1024, 512, 32),
        (16, 2048, 512, 64),
        (9, 1024, 512, 0),
    ]
    for i, (m, k, n, r) in enumerate(cases * 2):
        args = small_m_case(m, k, n, r, "int4", seed=i, device="cuda")
        got = w4_linear_small_m_gluon(*args, tile=tile, finish="flag")
        assert torch.equal(got, w4_linear_small_m_gluon(*args, tile=tile, finish="await")), (m, k, n, r)


@pytest.mark.parametrize(
    "m,kw,match",
    [
        (16, {"slices_first": False}, "finish is 'await' or 'flag' \\(with the branch slices first"),
        (17, {}, "the flagged finish takes 1-16 rows"),
        (48, {"wgmma": False, "tile": (64, 4, 4, 3)}, "the flagged finish takes 1-16 rows"),
    ],
)
def test_flagged_finish_refuses_what_it_does_not_take(m: int, kw: dict, match: str) -> None:
    """The flagged finish needs the slices first in the grid, 1-16 rows and ``mma.sync``
    column programs (checked before anything runs, so on the CPU too)."""
    args = small_m_case(m, 384, 64, 32, "int4")
    with pytest.raises(ValueError, match=match):
        w4_linear_small_m_gluon(*args, finish="flag", **kw)
