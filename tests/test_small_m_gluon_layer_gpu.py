"""The one-launch Gluon small-M layer (``studio/kernels/small_m_gluon_layer.py``) vs its reference.

On a GPU (``pytest -m gpu``): rows 1-64 (row blocks of 16, 32 and 64), K from 5 to 192
groups, N off the column block, ranks 0-160 in slices of 32 (16 and 48 leave a slice part
empty), splits that leave short or empty runs of groups, rings deeper than a split, the
branch slices first and last in the grid (so that either kind of program finishes blocks),
activations scaled in the kernel or by the scaling pre-kernel, ``mma.sync`` or (from 33
rows) ``wgmma`` column programs.  The oracle is ``reference_small_m`` with the codes the
layer runs at that many rows (``uses_scaled_codes``: exact up to 16, each group's dot scaled
in fp32; scaled above): the same bf16 roundings of the activations and of the branch input before and after the strengths; what is left is fp32 summation
order and the bf16 output rounding (~2e-3), so 5e-3 relative (Frobenius), as for the
``tl`` kernel.  The argument checks run on the CPU too.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import module_args, small_m_case

from studio import kernels
from studio.kernels.reference_small_m import w4_linear_small_m
from studio.kernels.small_m_gluon_layer import (
    gluon_layer_fits,
    use_gluon_layer,
    uses_scaled_codes,
    w4_linear_small_m_gluon,
)
from studio.kernels.small_m_triton import w4_linear_small_m_triton

CASES = [
    # (M, K, N, R, tile (BLOCK_N, SPLIT_K, warps, stages))
    (1, 320, 72, 16, (64, 1, 4, 2)),
    (7, 704, 136, 48, (64, 5, 4, 3)),  # 11 groups over 5 splits: the last run is empty
    (16, 3072, 200, 32, (128, 8, 4, 4)),
    (12, 704, 256, 96, (256, 4, 8, 6)),  # a ring deeper than a split's 3 groups
    (16, 3072, 3072, 160, (128, 8, 4, 3)),
    (16, 12288, 192, 0, (128, 16, 4, 4)),
    (5, 1024, 520, 64, (64, 2, 8, 4)),
    (17, 704, 136, 48, (64, 5, 4, 3)),  # one row past a 16-row block
    (32, 3072, 3072, 32, (128, 4, 8, 4)),
    (33, 1024, 520, 96, (64, 2, 4, 4)),  # wgmma column programs from 33 rows
    (64, 3072, 200, 160, (128, 8, 4, 3)),
    (50, 12288, 192, 0, (64, 16, 4, 4)),
    (64, 3072, 3072, 32, (256, 2, 4, 2)),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("finish,slices_first", [("await", True), ("count", True), ("count", False)])
@pytest.mark.parametrize("prescale", [False, True])
@pytest.mark.parametrize("m,k,n,r,tile", CASES)
def test_gluon_layer_matches_reference(
    m: int, k: int, n: int, r: int, tile: tuple, prescale: bool, finish: str, slices_first: bool
) -> None:
    """Within the stated tolerance, identical run to run (no atomics on the sums), counters
    zeroed again after every launch; either finish (the block's last column program waiting
    for its count, or the arrival that completes a block, column program or slice)."""
    from studio.kernels.split_k_scratch import _SCRATCH

    args = small_m_case(m, k, n, r, "int4", seed=m + k + n + r, device="cuda")
    expect = w4_linear_small_m(*args, scaled_codes=uses_scaled_codes(m))
    kw = dict(tile=tile, prescale=prescale, slices_first=slices_first, finish=finish)
    out = w4_linear_small_m_gluon(*args, **kw)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert torch.isfinite(out).all() and _rel(out, expect) < 5e-3, kw
    assert torch.equal(out, w4_linear_small_m_gluon(*args, **kw)), kw
    torch.cuda.synchronize()
    assert not any(t.any() for pair in _SCRATCH.values() for t in pair)


@pytest.mark.gpu
@pytest.mark.parametrize("prescale", [False, True])
@pytest.mark.parametrize("m,k,n,r,tile", [CASES[i] for i in (0, 1, 2, 3, 4, 5, 7, 8, 9, 10)])
def test_gluon_layer_codes_left_matches_reference(
    m: int, k: int, n: int, r: int, tile: tuple, prescale: bool
) -> None:
    """Codes as the dot's left operand (``mma.sync`` column programs at any rows), the
    activations scaled in the kernel or by the pre-kernel."""
    args = small_m_case(m, k, n, r, "int4", seed=m + k + n + r, device="cuda")
    expect = w4_linear_small_m(*args, scaled_codes=uses_scaled_codes(m))
    kw = dict(tile=tile, prescale=prescale, codes_left=True, wgmma=False)
    out = w4_linear_small_m_gluon(*args, **kw)
    assert torch.isfinite(out).all() and _rel(out, expect) < 5e-3, kw
    assert torch.equal(out, w4_linear_small_m_gluon(*args, **kw)), kw


@pytest.mark.gpu
@pytest.mark.parametrize("codes_left", [False, True])
@pytest.mark.parametrize("m,k,n,r,tile", [CASES[i] for i in (0, 1, 2, 4, 5, 7)])
def test_gluon_layer_dependent_launch_matches_the_plain_one(
    m: int, k: int, n: int, r: int, tile: tuple, codes_left: bool
) -> None:
    """Launched after the scaling pre-kernel with programmatic dependent launch (its column
    programs read only weights until the pre-kernel is done; its slices read the raw
    activations, which the pre-kernel does not write): the same bits as the plain launch,
    twice in a row and in a CUDA graph after a kernel that writes the activations (as
    ``bench_w4`` times it)."""
    args = small_m_case(m, k, n, r, "int4", seed=m + k + n, device="cuda")
    kw = dict(tile=tile, prescale=True, codes_left=codes_left, wgmma=False)
    plain = w4_linear_small_m_gluon(*args, dependent_launch=False, **kw)
    runs = [w4_linear_small_m_gluon(*args, dependent_launch=True, **kw) for _ in range(2)]
    x = args[0]
    x_in = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.copy_(x_in * 1.0)  # (a kernel that writes x right before the layer reads it)
        captured = w4_linear_small_m_gluon(*args, dependent_launch=True, **kw)
    x.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for out in (*runs, captured):
        assert torch.equal(out, plain), kw


def test_gluon_layer_codes_left_refuses_narrow_warps() -> None:
    """Codes as the left operand need ``BLOCK_N`` a multiple of ``16 * warps`` (checked
    before anything runs)."""
    args = small_m_case(16, 384, 64, 32, "int4")
    with pytest.raises(ValueError, match="a multiple of 16 \\* warps"):
        w4_linear_small_m_gluon(*args, tile=(64, 2, 8, 3), codes_left=True)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m,scaled,tile", [(16, True, None), (64, False, (64, 4, 8, 3)), (40, True, (128, 4, 8, 4))]
)
def test_gluon_layer_mma_sync_codes_scaled_or_exact_at_any_rows(
    m: int, scaled: bool, tile: tuple | None
) -> None:
    """The ``mma.sync`` column programs at any rows, either kind of codes: each matches its
    own oracle, and not the other kind exactly (the two roundings differ)."""
    args = small_m_case(m, 3072, 520, 32, "int4", seed=m, device="cuda")
    kw = dict(tile=tile, wgmma=False)
    out = w4_linear_small_m_gluon(*args, scaled_codes=scaled, **kw)
    assert _rel(out, w4_linear_small_m(*args, scaled_codes=scaled)) < 5e-3
    assert not torch.equal(out, w4_linear_small_m_gluon(*args, scaled_codes=not scaled, **kw))


def test_gluon_layer_wgmma_refuses_what_it_does_not_take() -> None:
    """The ``wgmma`` column programs need 33-64 rows, one warpgroup and scaled codes (checked
    before anything runs, so on the CPU too)."""
    for m, kw in [(16, {}), (64, {"tile": (64, 4, 8, 3)}), (64, {"scaled_codes": False})]:
        args = small_m_case(m, 384, 64, 32, "int4")
        with pytest.raises(ValueError, match="the wgmma column programs take 33-64 rows"):
            w4_linear_small_m_gluon(*args, wgmma=True, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,r,tile", [CASES[i] for i in (1, 2, 4, 5, 10)])
def test_gluon_layer_finishes_agree_bit_for_bit(m: int, k: int, n: int, r: int, tile: tuple) -> None:
    """Both finishes add the same partials in the same order (the awaiting one its own split
    from registers and the branch input reduced once): the same bits."""
    args = small_m_case(m, k, n, r, "int4", seed=m + k, device="cuda")
    runs = [w4_linear_small_m_gluon(*args, tile=tile, finish=finish) for finish in ("await", "count")]
    assert torch.equal(*runs)


@pytest.mark.parametrize("finish,slices_first", [("await", False), ("wait", True), ("", True)])
def test_gluon_layer_refuses_an_unknown_finish_or_await_with_slices_last(
    finish: str, slices_first: bool
) -> None:
    """The awaiting finish waits for programs earlier in the grid only: with the slices last
    it is refused (checked before anything runs, so on the CPU too)."""
    args = small_m_case(16, 384, 64, 32, "int4")
    with pytest.raises(
        ValueError,
        match="finish is 'await' or 'flag' \\(with the branch slices first in the grid\\) or 'count'",
    ):
        w4_linear_small_m_gluon(*args, finish=finish, slices_first=slices_first)


@pytest.mark.gpu
def test_gluon_layer_without_bias_and_at_the_default_tile() -> None:
    args = list(small_m_case(16, 3072, 3072, 32, "int4", seed=3, device="cuda"))
    args[-1] = None
    assert _rel(w4_linear_small_m_gluon(*args), w4_linear_small_m(*args, scaled_codes=False)) < 5e-3


@pytest.mark.gpu
def test_w4_linear_takes_the_gluon_layer_where_it_fits() -> None:
    """``w4_linear`` runs the Gluon layer for INT4 bf16 up to 16 rows (bit-identical to calling
    it), and the ``tl`` kernel above (where the Gluon layer fits but was measured slower) and
    where it does not fit (rank 20)."""
    args = small_m_case(16, 3072, 3072, 32, "int4", seed=8, device="cuda")
    assert use_gluon_layer(*args[:8])
    assert torch.equal(kernels.w4_linear(*args), w4_linear_small_m_gluon(*args))
    more = small_m_case(64, 3072, 3072, 32, "int4", seed=8, device="cuda")
    assert gluon_layer_fits(*more[:8]) and not use_gluon_layer(*more[:8])
    assert torch.equal(kernels.w4_linear(*more), w4_linear_small_m_triton(*more))
    odd = small_m_case(9, 3072, 512, 20, "int4", seed=9, device="cuda")
    assert not gluon_layer_fits(*odd[:8])
    assert _rel(kernels.w4_linear(*odd), w4_linear_small_m(*odd)) < 5e-3


@pytest.mark.gpu
def test_module_on_the_gluon_layer_per_sample_strengths_equal_samples_alone() -> None:
    """An ``SVDQuantLinear`` with a LoRA, 4 samples of 4 rows (16: the Gluon layer), a strength
    per sample: each sample's output is that sample run alone at its strength, and all of them
    match the reference."""
    from torch import nn

    from adapters.base import inject, set_strength
    from adapters.lora import LoraSpec
    from adapters.svdquant import SVDQuantLinear

    torch.manual_seed(0)
    lin = nn.Linear(320, 208).cuda()
    calib = torch.randn(256, 320, device="cuda")
    calib[:, 5] *= 30
    model = nn.Sequential(SVDQuantLinear.from_linear(lin, calib, rank=32))
    inject(model, LoraSpec(targets=["0"], rank=8), "style")
    strengths = [0.0, 1.0, 0.5, -1.0]
    with torch.no_grad():
        model[0].adapters["style"].lora_B.normal_(0, 0.1)
        x = torch.randn(4, 4, 320, device="cuda").bfloat16()
        set_strength(model, "style", torch.tensor(strengths))
        y = model(x)
        args = module_args(model[0], x.reshape(16, 320), rows_per_sample=4)
        assert use_gluon_layer(*args[:8])
        assert _rel(y.reshape(16, 208), w4_linear_small_m(*args, scaled_codes=False)) < 5e-3
        for i, s in enumerate(strengths):
            set_strength(model, "style", s)
            assert _rel(y[i], model(x[i : i + 1])[0]) < 1e-3, s


@pytest.mark.gpu
def test_gluon_layer_on_two_streams_at_once() -> None:
    """Launches on two streams overlap; each stream has its own arrival counters."""
    cases = [small_m_case(16, 3072, 3072, 32, "int4", seed=s, device="cuda") for s in (4, 5)]
    expect = [w4_linear_small_m(*c, scaled_codes=False) for c in cases]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for c in cases:  # compile outside the streams
        w4_linear_small_m_gluon(*c)
    torch.cuda.synchronize()
    outs: list[list[torch.Tensor]] = [[], []]
    for _ in range(20):
        for i, (c, s) in enumerate(zip(cases, streams, strict=True)):
            with torch.cuda.stream(s):
                outs[i].append(w4_linear_small_m_gluon(*c))
    torch.cuda.synchronize()
    for i in range(2):
        assert all(_rel(o, expect[i]) < 5e-3 for o in outs[i])


@pytest.mark.parametrize(
    "change,need",
    [
        ("fp4", "INT4 codes"),
        ("65 rows", "1-64 rows"),
        ("fp32 x", "bf16 activations"),
        ("K off 64", "K a multiple of 64"),
        ("rank 20", "a rank that is a multiple of 16"),
        ("strided x", "contiguous rows of x"),
        ("x off 16 bytes", "x, codes, scales, smoothing factors and l1 starting at 16-byte boundaries"),
        ("l1 transposed", "bf16 l1 \\[K, R\\]"),
        ("none", "a CUDA GPU of sm_80 or later"),  # the CPU: everything else fits
    ],
)
def test_gluon_layer_refuses_what_it_does_not_take(change: str, need: str) -> None:
    """Each misfit is named (checked on the CPU, where the GPU is the one thing missing)."""
    m = 65 if change == "65 rows" else 4
    k = 330 if change == "K off 64" else 384
    r = 20 if change == "rank 20" else 32
    args = list(small_m_case(m, k, 64, r, "fp4" if change == "fp4" else "int4"))
    if change == "fp32 x":
        args[0] = args[0].float()
    if change == "strided x":
        args[0] = torch.cat([args[0], args[0]], 1)[:, ::2]
    if change == "x off 16 bytes":  # a view starting 8 columns (16 bytes) plus one into a wider buffer
        wide = torch.zeros(m, k + 16, dtype=torch.bfloat16)
        wide[:, 9 : 9 + k] = args[0]
        args[0] = wide[:, 9 : 9 + k]
    if change == "l1 transposed":
        args[5] = args[5].t().contiguous().t()
    assert not gluon_layer_fits(*args[:8])
    with pytest.raises(ValueError, match=f"the Gluon small-M layer needs {need}"):
        w4_linear_small_m_gluon(*args)


def test_default_tile_is_the_pinned_one_or_shaped_like_them() -> None:
    from studio.kernels.small_m_gluon_layer import GLUON_TILES, default_tile

    for key, tile in GLUON_TILES.items():
        assert default_tile(key[1], key[2], key[0]) == tile
    assert default_tile(5, 72) == (64, 1, 4, 4, False, "await")  # a tiny layer: one split of all 5 groups
    assert default_tile(80, 20000) == (128, 8, 4, 4, False, "await")
    assert {tile[5] for tile in GLUON_TILES.values()} <= {"await", "count"}
    assert default_tile(5, 72, 64)[0] == 128  # more rows: wider blocks, fewer reads of them
    for kg in (1, 7, 48, 300):
        assert kg // default_tile(kg, 4096)[1] >= min(kg, 4)  # at least 4 groups a split
