"""The 16-row Gluon layer's flagged finish (``finish="flag"``, ``studio/kernels/flagged_partials.py``).

On a GPU (``pytest -m gpu``): the awaiting finish's result to within one bf16 step (it adds
the same partials in the same order, each with its lowest fp32 bit cleared) and the
reference's tolerance, on the layer test's 1-16-row cases, the activations scaled in the
kernel or by the pre-kernel (with dependent launch); the same bits launch after launch (the
parity changes every launch, the result must not), with the epoch moving on by one per
launch in every column block; in a CUDA graph replayed on new inputs (the epoch lives in
device memory); and after launches that left other words behind (other rows, another layer
of the same N), which must not pass for this launch's.
The argument checks run on the CPU too.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import small_m_case

from studio.kernels.flagged_partials import _SCRATCH, one_wave_registers
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


def _epochs(n: int, tile: tuple, r: int) -> torch.Tensor:
    """The epochs of the flagged scratch of ``n`` outputs at ``tile``, rank ``r`` (this stream)."""
    return next(pair[1] for key, pair in _SCRATCH.items() if key[2:] == (n, tile[0], tile[1], r))


def _assert_near(out: torch.Tensor, expect: torch.Tensor) -> None:
    """Within one bf16 step of ``expect`` everywhere (outputs near zero: of its largest value),
    and equal almost everywhere."""
    diff = (out.float() - expect.float()).abs()
    assert (diff <= 2**-7 * expect.float().abs() + 1e-5 * expect.float().abs().max()).all()
    assert (diff > 0).float().mean() < 0.02


@pytest.mark.gpu
@pytest.mark.parametrize("prescale", [False, True])
@pytest.mark.parametrize("m,k,n,r,tile", CASES)
def test_flagged_finish_is_the_awaiting_finish_within_a_bf16_step(
    m: int, k: int, n: int, r: int, tile: tuple, prescale: bool
) -> None:
    """Within one bf16 step of ``finish="await"`` and the layer's tolerance of the reference;
    the same bits three launches in a row, each moving every block's epoch on by one."""
    args = small_m_case(m, k, n, r, "int4", seed=m + k + n + r, device="cuda")
    kw = dict(tile=tile, prescale=prescale)
    expect = w4_linear_small_m_gluon(*args, finish="await", **kw)
    first = w4_linear_small_m_gluon(*args, finish="flag", **kw)
    torch.cuda.synchronize()
    assert torch.isfinite(first).all() and _rel(first, w4_linear_small_m(*args, scaled_codes=False)) < 5e-3
    _assert_near(first, expect)
    before = _epochs(n, tile, r).clone()
    assert (before == before[0]).all() and before[0] > 0
    runs = [w4_linear_small_m_gluon(*args, finish="flag", **kw) for _ in range(2)]
    torch.cuda.synchronize()
    assert torch.equal(_epochs(n, tile, r), before + 2)
    for out in runs:
        assert torch.equal(out, first), kw


@pytest.mark.gpu
@pytest.mark.parametrize("prescale", [False, True])
def test_flagged_finish_replays_in_a_cuda_graph(prescale: bool) -> None:
    """Captured once, replayed on three new inputs: each replay gives a plain launch's bits
    for its input (the flag is read from device memory at every replay)."""
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
        assert torch.equal(captured, w4_linear_small_m_gluon(*args, finish="flag", **kw))
        _assert_near(captured, w4_linear_small_m_gluon(*args, finish="await", **kw))


@pytest.mark.gpu
def test_flagged_finish_ignores_words_left_by_other_launches() -> None:
    """Launches that share a scratch (same N, tile and rank) with other rows and other K, in
    turn: each is within one bf16 step of the awaiting finish (a word left by an earlier
    launch would carry other values), and the rows past M of a short launch are written
    too, so that the next full launch does not read words two launches old as its own."""
    tile = (64, 4, 4, 3)
    cases = [
        (16, 1024, 512),
        (3, 1024, 512),
        (16, 2048, 512),
        (9, 1024, 512),
        (16, 1024, 512),
        (1, 2048, 512),
    ]
    for r in (32, 0):
        for i, (m, k, n) in enumerate(cases * 2):
            args = small_m_case(m, k, n, r, "int4", seed=i, device="cuda")
            got = w4_linear_small_m_gluon(*args, tile=tile, finish="flag")
            _assert_near(got, w4_linear_small_m_gluon(*args, tile=tile, finish="await"))


@pytest.mark.gpu
def test_one_wave_registers_caps_only_where_a_second_wave_would_start() -> None:
    """The register cap that keeps every program resident: none for a grid of one program per
    SM, and at most 65536 / (programs per SM x threads) where more share an SM."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert one_wave_registers(torch.device("cuda"), sms, 4) is None
    assert one_wave_registers(torch.device("cuda"), 3 * sms, 4) == 168
    assert one_wave_registers(torch.device("cuda"), 3 * sms + 1, 4) == 128


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
