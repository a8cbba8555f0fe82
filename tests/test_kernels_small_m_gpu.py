"""The small-M Triton kernel vs its reference on odd shapes (run on a GPU: ``pytest -m gpu``).

Tolerance: the kernel and ``reference_small_m`` round the same operands to bf16 (activations
times smoothing, the branch input before and after the strengths); what is left is fp32 summation order and
the bf16 output rounding (~2e-3), so 5e-3 relative (Frobenius).
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import fragment_order_index, small_m_case

from studio import kernels
from studio.kernels.reference_small_m import w4_linear_small_m
from studio.kernels.small_m_tiles import PINNED_TILES, tile_config
from studio.kernels.small_m_triton import _split_configs, scaled_activations, w4_linear_small_m_triton

pytestmark = pytest.mark.gpu

SHAPES = [  # (M, K, N, R): M 1..64, K off 128 and off 64, N off the tiles, ranks 0..160
    (1, 200, 72, 16),
    (7, 320, 136, 48),
    (16, 3072, 3072, 32),
    (33, 1000, 520, 96),
    (64, 448, 1100, 160),
    (16, 12288, 3072, 0),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _case(m: int, k: int, n: int, r: int, fmt: str, seed: int = 0) -> tuple:
    return small_m_case(m, k, n, r, fmt, seed, device="cuda")


EXACT = {"scale_codes": False}  # each group's partial dot scaled in fp32, not the codes

VARIANTS = [{}, {"swap": False, "prescale": False} | EXACT, {"swap": True, "prescale": True} | EXACT]


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("magic", [None, True, False])
@pytest.mark.parametrize("fmt", ["int4", "fp4"])
@pytest.mark.parametrize("m,k,n,r", SHAPES)
def test_small_m_matches_reference(
    m: int, k: int, n: int, r: int, fmt: str, magic: bool | None, variant: dict
) -> None:
    """The defaults autotuned; with exact codes, either operand order, with and without the
    scaling pre-kernel, at one tile (``test_small_m_every_config`` runs the others)."""
    args = _case(m, k, n, r, fmt)
    expect = w4_linear_small_m(*args, scaled_codes=variant.get("scale_codes", True))
    config = {"BLOCK_N": 64, "SPLIT_K": 4, "num_warps": 4, "num_stages": 3} if variant else None
    # INT4's bit-built codes both ways: by inline PTX and by Triton's integer ops
    for asm in (True, False) if fmt == "int4" and magic else (None,):
        out = w4_linear_small_m_triton(*args, magic=magic, asm=asm, config=config, **variant)
        assert out.dtype == torch.bfloat16 and out.shape == (m, n)
        assert torch.isfinite(out).all() and _rel(out, expect) < 5e-3, asm


@pytest.mark.parametrize("fmt", ["int4", "fp4"])
@pytest.mark.parametrize("cfg", [c.all_kwargs() for c in _split_configs()], ids=str)
def test_small_m_every_config(cfg: dict, fmt: str) -> None:
    args = _case(17, 1000, 520, 48, fmt, seed=1)
    expect = {scaled: w4_linear_small_m(*args, scaled_codes=scaled) for scaled in (True, False)}
    for magic in (True, False):
        for swap, prescale, scaled, frag in (
            (False, False, False, False),
            (True, True, True, False),
            (True, True, True, True),  # the wgmma operand's order (INT4: by inline PTX)
            (True, False, True, True),
        ):
            kw = dict(config=cfg, magic=magic, swap=swap, prescale=prescale, scale_codes=scaled)
            kw |= dict(fragment_order=frag)
            out = w4_linear_small_m_triton(*args, **kw)
            assert _rel(out, expect[scaled]) < 5e-3, kw
            # no atomics: identical run to run
            assert torch.equal(out, w4_linear_small_m_triton(*args, **kw)), kw


@pytest.mark.parametrize("m,asm", [(16, True), (16, False), (64, False)], ids=["16-asm", "16-tl", "64-tl"])
@pytest.mark.parametrize("cfg", [c.all_kwargs() for c in _split_configs()], ids=str)
def test_fragment_order_every_config(cfg: dict, m: int, asm: bool) -> None:
    """INT4 codes in the wgmma operand's order at every tile, 16 and 64 rows (one and two
    launches), with and without the scaling pre-kernel, by inline PTX (at 16 rows: above,
    ``MAX_FRAGMENT_ASM_ROWS`` refuses it) or Triton's integer ops."""
    args = _case(m, 3072, 1024, 48, "int4", seed=6)  # 6 groups per split at 8 splits; N % 16 == 0
    expect = w4_linear_small_m(*args)
    for prescale in (True, False):
        kw = dict(config=cfg, magic=True, asm=asm, swap=True, prescale=prescale, fragment_order=True)
        assert _rel(w4_linear_small_m_triton(*args, **kw), expect) < 5e-3, kw


@pytest.mark.parametrize("key", sorted(PINNED_TILES), ids=str)
def test_pinned_tiles_match_the_reference(key: tuple[int, int, int]) -> None:
    """Each pinned shape, at a row count inside its bucket: the launcher runs the pinned tile
    (bit-identical to forcing it) and matches the reference; so does autotuning there."""
    block_m, kg, n = key
    args = _case(block_m - 3, kg * 64, n, 32, "int4", seed=7)
    expect = w4_linear_small_m(*args)
    out = w4_linear_small_m_triton(*args)
    assert _rel(out, expect) < 5e-3
    forced = tile_config(PINNED_TILES[key])
    assert torch.equal(out, w4_linear_small_m_triton(*args, config=forced))
    assert _rel(w4_linear_small_m_triton(*args, pinned=False), expect) < 5e-3


@pytest.mark.parametrize("fmt", ["int4", "fp4"])
@pytest.mark.parametrize("m,k,n,r", SHAPES)
def test_scaled_codes_round_as_their_reference(m: int, k: int, n: int, r: int, fmt: str) -> None:
    """Codes times their group scale, rounded to bf16 before the dot, as ``reference_small_m``
    models it: with fp32 in and out (no output rounding) only the summation order is left."""
    args = _case(m, k, n, r, fmt, seed=4)
    x32 = args[0].float()
    expect = w4_linear_small_m(x32, *args[1:], scaled_codes=True)
    fixed = {"BLOCK_N": 64, "SPLIT_K": 4, "num_warps": 4, "num_stages": 5}
    variants = [{}]  # the defaults, autotuned; then both decodes, operand orders, pre-kernel or not
    variants += [dict(config=fixed, magic=magic, swap=magic, prescale=magic) for magic in (True, False)]
    variants += [dict(config=fixed, magic=True, prescale=pre, fragment_order=True) for pre in (True, False)]
    for kw in variants:
        out = w4_linear_small_m_triton(x32, *args[1:], scale_codes=True, **kw)
        assert out.dtype == torch.float32 and out.shape == (m, n)
        assert _rel(out, expect) < 2e-4, kw


def test_scaled_activations_round_as_torch_and_pad_with_zeros() -> None:
    x, sinv = _case(37, 1000, 8, 0, "int4")[:2]
    xs, sums = scaled_activations(x, sinv, row_sums=True)
    expect = torch.nn.functional.pad((x.float() * sinv).to(torch.bfloat16), (0, 24))
    assert torch.equal(xs, expect)
    assert torch.allclose(sums, expect.float().view(37, 16, 64).sum(-1), rtol=1e-6, atol=1e-4)
    # the wgmma operand's order within each 32 columns (index 16s + 8t + 2q + b holds 8q + 4s + 2t + b)
    frag = scaled_activations(x, sinv, row_sums=False, fragment_order=True)[0]
    order = fragment_order_index(x.device)
    assert torch.equal(frag.view(37, 32, 32), expect.view(37, 32, 32)[:, :, order])


def test_auto_takes_the_small_m_path_and_fp32_inputs_work() -> None:
    args = _case(16, 448, 256, 32, "fp4", seed=2)
    x32 = args[0].float()
    out = kernels.w4_linear(x32, *args[1:])
    assert out.dtype == torch.float32
    assert _rel(out, w4_linear_small_m(x32, *args[1:])) < 5e-3


@pytest.mark.parametrize("la_first", [True, False])
@pytest.mark.parametrize("m,k,n,r", [SHAPES[1], SHAPES[3], SHAPES[4], SHAPES[5]])
def test_one_launch_finish_matches_the_two_launch_form(
    m: int, k: int, n: int, r: int, la_first: bool
) -> None:
    """Whichever program completes a column block adds its partials; counters come back zeroed."""
    from studio.kernels.split_k_scratch import _SCRATCH

    args = _case(m, k, n, r, "int4", seed=3)
    expect = w4_linear_small_m(*args)
    for cfg in [c.all_kwargs() for c in _split_configs()[:3]] + [None]:
        last = w4_linear_small_m_triton(*args, config=cfg, finish="last", la_first=la_first)
        assert _rel(last, expect) < 5e-3
        assert _rel(last, w4_linear_small_m_triton(*args, config=cfg, finish="epilogue")) < 1e-3
        # the same partials added in the same order: identical run to run
        assert torch.equal(
            last, w4_linear_small_m_triton(*args, config=cfg, finish="last", la_first=la_first)
        )
    torch.cuda.synchronize()
    assert not any(t.any() for pair in _SCRATCH.values() for t in pair)


def test_one_launch_finish_on_two_streams_at_once() -> None:
    """Launches on two streams overlap; each stream has its own arrival counters."""
    cases = [_case(16, 3072, 3072, 32, "int4", seed=4), _case(16, 3072, 3072, 32, "fp4", seed=5)]
    expect = [w4_linear_small_m(*c) for c in cases]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for c in cases:  # autotune outside the streams
        w4_linear_small_m_triton(*c)
    torch.cuda.synchronize()
    outs: list[list[torch.Tensor]] = [[], []]
    for _ in range(20):
        for i, (c, s) in enumerate(zip(cases, streams, strict=True)):
            with torch.cuda.stream(s):
                outs[i].append(w4_linear_small_m_triton(*c))
    torch.cuda.synchronize()
    for i in range(2):
        assert all(_rel(o, expect[i]) < 5e-3 for o in outs[i])
