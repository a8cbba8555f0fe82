"""Every Triton kernel, launched as its launcher launches it, compiles for Hopper (sm_90) on the CPU.

The interpreter test runs the kernels' logic but not Triton's compiler, which rejects things
the interpreter accepts (a name bound to two different types in the two arms of an ``if``
failed on the H100 only).  Triton compiles down to a cubin without a GPU: the launches are
caught and built for ``GPUTarget("cuda", 90, 32)`` with ptxas (``studio/kernels/hopper_compile.py``);
each cubin's register count is read back too (at most 255 per thread on sm_90).  What this
cannot check: run-time limits (shared memory per block) and the numbers, which are the GPU
suite's job.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from studio.kernels import reference as ref  # noqa: E402
from studio.kernels import reference_prefill as rp  # noqa: E402
from studio.kernels.hopper_compile import caught_launches, compile_for_hopper, resource_usage  # noqa: E402


def _small_m_launches() -> None:
    from studio.kernels.small_m_triton import _split_configs, w4_linear_small_m_triton

    for fmt, r, magic in (("int4", 48, None), ("fp4", 0, True), ("fp4", 160, False), ("int4", 16, False)):
        x = torch.randn(16, 448, dtype=torch.bfloat16)
        qw, ws = ref.quantize_weight(torch.randn(136, 448), fmt)
        l1, l2 = torch.randn(448, r).bfloat16(), torch.randn(136, r).bfloat16()
        args = (x, torch.ones(448), qw, ws, fmt, l1, l2, torch.ones(2, r), 8, torch.randn(136))
        # every config (SPLIT_K = 1, the block shapes) once; the other variants with one
        for cfg in _split_configs() if magic is None else _split_configs()[:1]:
            # either operand order, with and without the scaling pre-kernel and scaled codes
            for swap, prescale, scaled in ((False, False, False), (True, True, True), (True, False, True)):
                kw = dict(magic=magic, swap=swap, prescale=prescale, scale_codes=scaled)
                w4_linear_small_m_triton(*args, config=cfg.all_kwargs(), **kw)
    # the two-launch form (its epilogue kernel), the other program order and INT4's codes by
    # inline PTX, once each
    cfg = _split_configs()[0].all_kwargs()
    w4_linear_small_m_triton(*args, config=cfg, finish="epilogue", la_first=False)
    w4_linear_small_m_triton(*args, config=cfg, magic=True, asm=True)
    # INT4's codes by inline PTX in the wgmma operand's order, at every config, with and
    # without the scaling pre-kernel
    for cfg in _split_configs():
        for prescale in (False, True):
            kw = dict(magic=True, swap=True, prescale=prescale, scale_codes=True, fragment_order=True)
            w4_linear_small_m_triton(*args, config=cfg.all_kwargs(), **kw)


def _prefill_launches() -> None:
    from studio.kernels.prefill_triton import (
        _expand_weight_kernel,
        _rowwise_prepass_kernel,
        expand_weight_triton,
        quantize_act_rowwise_triton,
    )
    from studio.kernels.prepass_split_triton import (
        _row_codes_kernel,
        _row_stats_kernel,
        quantize_act_rowwise_split_triton,
    )

    for fmt, r in (("int4", 96), ("fp4", 32)):
        x = torch.randn(64, 320, dtype=torch.bfloat16)
        sinv = torch.ones(320)
        qw, ws = ref.quantize_weight(torch.randn(144, 320), fmt)
        l1, l2, st = torch.randn(320, r).bfloat16(), torch.randn(144, r).bfloat16(), torch.ones(1, r)
        g = torch.ones(r)
        # One config each (the block sizes change no code path here; the GPU suite runs them all).
        expand_weight_triton(qw, ws, fmt, l2, torch.ones(r), rp.residual_max(ws, fmt), st,
                             config=_expand_weight_kernel.configs[0].all_kwargs())  # fmt: skip
        quantize_act_rowwise_triton(
            x, sinv, l1, st, 1, g, config=_rowwise_prepass_kernel.configs[0].all_kwargs()
        )
        config = {
            "stats": _row_stats_kernel.configs[0].all_kwargs(),
            "codes": _row_codes_kernel.configs[0].all_kwargs(),
        }
        quantize_act_rowwise_split_triton(x, sinv, l1, st, 1, g, config=config)
        _expand_gemm_launches(x, sinv, qw, ws, fmt, l1, l2, st)


def _expand_gemm_launches(x, sinv, qw, ws, fmt, l1, l2, st) -> None:  # noqa: ANN001
    """The GEMM that expands the codes itself, at every config, both scalings, and its branch
    columns (``branch_only``)."""
    from studio.kernels.expand_gemm_triton import _expand_gemm_kernel, expand_gemm_triton
    from studio.kernels.prefill_triton import expand_weight_triton

    bound, wmax = rp.branch_bound(l1.float(), sinv), rp.residual_max(ws, fmt)
    wb, cs, g = expand_weight_triton(qw, ws, fmt, l2, bound, wmax, st, branch_only=True)
    xq, sx = rp.quantize_act_rowwise(x, sinv, l1, st, 1, g)
    for i, cfg in enumerate(_expand_gemm_kernel.configs):
        bias = torch.randn(qw.shape[1]) if i % 2 else None
        sx_used = sx if i % 3 else sx.view(-1)[:1]
        expand_gemm_triton(xq, sx_used, qw, ws, fmt, cs, wb, bias, config=cfg.all_kwargs())


def _fused_launches() -> None:
    from studio.kernels.gemm_w4_triton import gemm_w4_triton
    from studio.kernels.quant_act import quantize_act_triton

    for fmt, r in (("int4", 48), ("fp4", 0)):
        x = torch.randn(20, 320, dtype=torch.bfloat16)
        qw, ws = ref.quantize_weight(torch.randn(72, 320), fmt)
        l1, l2, st = torch.randn(320, r).bfloat16(), torch.randn(72, r).bfloat16(), torch.ones(1, r)
        xq, xs, la = quantize_act_triton(
            x, torch.ones(320), l1, st, 1, config={"BLOCK_M": 16, "num_warps": 4}
        )
        for split in (1, 2):
            cfg = {"BLOCK_N": 64, "BLOCK_M": 16, "SPLIT_K": split, "num_warps": 4, "num_stages": 3}
            gemm_w4_triton(xq, xs, qw, ws, fmt, la, l2, torch.randn(72), config=cfg)


@pytest.mark.parametrize(
    "launches", [_small_m_launches, _prefill_launches, _fused_launches], ids=["small_m", "prefill", "fused"]
)
def test_kernels_compile_for_hopper(launches) -> None:
    caught = caught_launches(launches)
    assert caught
    for fn, args, kwargs in caught:
        compiled = compile_for_hopper(fn, args, kwargs)
        assert compiled.asm["cubin"], fn.__name__
        assert 0 < resource_usage(compiled)["REG"] <= 255, fn.__name__


def test_compiles_with_the_alignment_a_launch_would_see() -> None:
    """Aligned pointers and sizes divisible by 16 are hinted as a launch hints them, so that the
    CPU's register counts match the GPU's: without the hints the small-M kernel compiled to up to
    twice the registers (``bench/diag_registers.py``), and loads were not vectorised."""
    import triton.language as tl

    @triton.jit
    def copy(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, offs < n), offs < n)

    buf, out = torch.zeros(1040), torch.zeros(1040)

    def ptx(src: torch.Tensor, n: int) -> str:
        ((fn, args, kwargs),) = caught_launches(lambda: copy[(1,)](src, out, n, BLOCK=1024))
        return compile_for_hopper(fn, args, kwargs).asm["ptx"]

    assert "ld.global.v4" in ptx(buf, 1024)
    assert "ld.global.v4" not in ptx(buf[1:], 1024)  # a pointer 4 bytes past a 16-byte boundary
    assert "ld.global.v4" not in ptx(buf, 1000)  # a bound not divisible by 16
