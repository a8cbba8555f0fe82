"""Triton kernels of the small-M path: split-K bf16 x 4-bit GEMM with ``x @ l1``, in one launch.

The maths and the reasons are in ``reference_small_m.py`` (the oracle).

``_w4_small_m_kernel``, grid ``(branch slices + column blocks) * SPLIT_K`` on one axis, every
branch slice first.  Program ``(col, pid_k)`` on a column block owns ``BLOCK_N`` output
channels and one run of groups along K; per group of 64 it loads the packed codes ``[BLOCK_N, 32]`` once (the bytes that
bound this path), turns both nibbles into bf16 weights (code times group scale:
``SCALED_CODES``) and adds two K = 32 dots with the bf16 activations to two running sums
(one per nibble, so that no dot waits for the other); with exact codes it scales each
group's partial dots by the group scale in fp32 instead.  The branch-slice
programs each compute one 32-rank slice of ``x @ l1`` over the same run of K (so the branch
input costs no launch of its own and ``l1`` is read once, not once per column block: that
re-read was 3x the weight bytes at 96 ranks).  Both write per-split partials, then count
themselves in a per-column-block counter (a slice counts in every block).  The program whose
arrival completes a block (``_finish_tile``) adds that block's partials in split order, the
branch ``bf16(bf16(sum of x @ l1 partials) * strength) @ l2`` and the bias, writes the output
and zeroes the counter for the next launch (``split_k_scratch``, per device and stream).  No atomics touch the sums, so results are
bit-identical run to run.  This is the fused path's split-K scheme (``gemm_w4_triton``) with
plain partial stores instead of atomic adds.

Why one launch: at M = 16 it measured faster than two (``finish_for``).  A second kernel
re-reads every split's partials, and under the bench's timing it costs more than its launch
(an empty kernel there takes 0.8-1.1 us, ``bench/floor_small_m.py``; the 6 us once quoted
here was cuBLAS's small GEMM).  ``finish="epilogue"`` keeps the two-launch form
(``_small_m_epilogue_kernel`` adds the partials) to measure against.

Turning codes into bf16 by bits (``MAGIC``): the bf16 bit pattern is built with integer
operations only.  INT4 code ``c`` becomes ``0x4300 | c``, which is the bf16 ``128 + c``; the
dot then carries ``136 * sum(x)`` too much, subtracted per group (the dot is exact in fp32:
8-bit by 8-bit mantissas).  FP4's E2M1 code maps straight onto the bf16 of its FP8 value.
``MAGIC=False`` converts through fp32 (``_decode``): an int-to-float conversion per weight,
at a quarter of the integer rate on H100.  Neither wins everywhere (FP4's bit path needs a
select, INT4's adds the row sums), so ``use_magic`` picks by format from what was measured.

Operand order (``SWAP_AB``): the dot is taken as ``codes @ x^T`` (``[BLOCK_N, BLOCK_M]``
sums), so that the decoded codes are the left operand, which Hopper's wgmma reads from
registers; as the right operand they went through shared memory every group at M = 64.
``FRAGMENT_ORDER`` (on for INT4 up to 16 rows, ``use_fragment_order``): INT4 codes decoded
four bytes at a time by inline PTX (``ASM_DECODE``) and re-indexed into the order in which
a wgmma thread holds its operand, the activations permuted the same way.  Two measured
options stay for ``bench/diag_small_m_stages.py``, off by default: ``ASM_DECODE`` in the
plain order, and exact codes (``SCALED_CODES`` off).  ``PRESCALED`` (``bf16(x * 1/s)``, and INT4's row sums for exact bit-built
codes, by ``_scale_x_kernel`` once, not per column program) is on above 16 rows and for large
layers: with scaled codes it lets the dots run asynchronously (``use_prescale``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from studio.kernels.autotuned_launch import launch_autotuned
from studio.kernels.prefill_triton import _decode
from studio.kernels.quant_act import branch_dot_dtype
from studio.kernels.reference_small_m import SMALL_M_ONE_LAUNCH
from studio.kernels.small_m_tiles import pinned_tile
from studio.kernels.split_k_scratch import zeroed_scratch

#: Ranks per branch-slice program (and per step of the epilogue's branch dot).
LA_RANKS = 32

#: Partial loads in flight at once where the one-launch kernel finishes a column block.
FINISH_IN_FLIGHT = 4

#: INT4 codes by inline PTX in the plain order by default: no (in fragment order, yes:
#: ``use_fragment_order``).  Its decode stage alone is faster (13.5 against
#: 16.2 us at 3072x12288, M = 16), but in the whole kernel it measured within 2 % either way
#: at M = 64 and up to 7 % slower at M = 16 (``bench/diag_small_m_stages.py``, tenth session).
USE_ASM_DECODE = False


def _split_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_N": bn, "SPLIT_K": sk}, num_warps=w, num_stages=st)
        for bn, sk, w, st in [
            (32, 4, 4, 3),
            (64, 2, 4, 3),
            (64, 4, 4, 4),
            (64, 8, 4, 4),
            (128, 4, 4, 4),
            (128, 4, 4, 5),
            (64, 8, 4, 5),
            (128, 8, 4, 4),
            (128, 8, 8, 3),
            (128, 16, 4, 4),
            (256, 8, 8, 3),
            (128, 2, 4, 4),
            (128, 1, 4, 4),
        ]
    ]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    kg = int(named_args["KG"])
    keep = [c for c in configs if c.kwargs["SPLIT_K"] <= max(1, kg // 2)]
    return keep or configs[-1:]


@triton.jit
def _codes_as_bf16(codes, FP4: tl.constexpr):
    """4-bit codes (0..15) as bf16 by bit patterns: FP4's FP8 value, or ``128 + code`` (INT4)."""
    c = codes.to(tl.uint16)
    if FP4:  # E2M1 -> bf16: exponent + 120 for normals, 0 / 2**-7 for the two subnormal codes
        mag = tl.where((c & 6) != 0, ((c & 7) << 6) + 0x3C00, (c & 1) * 0x3C00)
        bits = mag | ((c & 8) << 12)
    else:
        bits = c | 0x4300
    return bits.to(tl.bfloat16, bitcast=True)


@triton.jit
def _bf16_nearest_even(v):
    """fp32 -> bf16 rounded to nearest even by integer ops, as the GPU's conversion rounds.

    By hand because the Triton interpreter's conversion truncates (Triton 3.9), which put the
    interpreter tests' error past their bound; on the GPU this is a few integer operations
    per activation, once per launch.  Infinities stay infinite; NaNs become bf16's quiet NaN
    (rounding would turn a NaN whose payload lies in the low 16 bits into an infinity).
    """
    bits = v.to(tl.uint32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits >> 16).to(tl.uint16)
    return tl.where(v != v, 0x7FC0, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _times_group_scale(codes, ws, OFFSET: tl.constexpr, ROUND_BY_BITS: tl.constexpr):
    """``bf16(code * bf16(ws))`` for decoded codes (``OFFSET``: INT4's bit-built ``128 + c``, less
    136 first, exactly).  bf16 arithmetic on the GPU (``sub``/``mul.bf16x2``, one rounding of
    the exact product); ``ROUND_BY_BITS`` (the interpreter, whose bf16 arithmetic and
    conversions truncate) computes in fp32, exact here, and rounds to nearest even by hand."""
    if ROUND_BY_BITS:
        v = codes.to(tl.float32)
        if OFFSET:
            v -= 136.0
        return _bf16_nearest_even(v * _bf16_nearest_even(ws).to(tl.float32))
    v = codes.to(tl.bfloat16)
    if OFFSET:
        v -= 136.0
    return v * ws.to(tl.bfloat16)


@triton.jit
def _scale_x_kernel(
    x_ptr, sinv_ptr, xs_ptr, rs_ptr, M, K, KG, stride_xm,
    ROW_SUMS: tl.constexpr, FRAGMENT_ORDER: tl.constexpr, BLOCK_M: tl.constexpr, GROUPS: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr = False,
):  # fmt: skip
    """``xs = bf16(x * 1/s)`` as ``[M, KG * 64]`` (zeros past K) and, for INT4's bit-built
    codes, each group's row sums of ``xs`` in fp32, ``[M, KG]``: once per launch, instead of
    in every column program for its own columns (``PRESCALED``, chosen by ``use_prescale``).
    ``FRAGMENT_ORDER``: each half group's 32 columns in ``_fragment_order``'s order.
    ``LAUNCH_DEPENDENTS`` (sm_90, not in the interpreter): a kernel launched after this one
    with programmatic dependent launch may start at once (it waits for ``xs`` itself:
    ``small_m_gluon_layer``'s ``GRID_DEP_WAIT``)."""
    if LAUNCH_DEPENDENTS:
        tl.extra.cuda.gdc_launch_dependents()
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_g = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    kk = offs_g[:, None] * 64 + tl.arange(0, 64)[None, :]
    rows = (offs_m < M)[:, None, None]
    x = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + kk[None], rows & (kk < K)[None], 0.0)
    xs = _bf16_nearest_even(x.to(tl.float32) * tl.load(sinv_ptr + kk, kk < K, 0.0)[None])
    if FRAGMENT_ORDER:  # each half group's 32 columns, as _fragment_order puts the codes
        xs = tl.reshape(
            _fragment_order(tl.reshape(xs, [BLOCK_M * GROUPS * 2, 32]), BLOCK_M * GROUPS * 2),
            [BLOCK_M, GROUPS, 64],
        )
    tl.store(xs_ptr + offs_m[:, None, None] * (KG * 64) + kk[None], xs, rows & (offs_g < KG)[None, :, None])
    if ROW_SUMS:
        sums = tl.sum(xs.to(tl.float32), axis=2)
        tl.store(
            rs_ptr + offs_m[:, None] * KG + offs_g[None, :],
            sums,
            (offs_m < M)[:, None] & (offs_g < KG)[None, :],
        )


@triton.jit
def _fragment_order(v, BLOCK_N: tl.constexpr):
    """``[BLOCK_N, 32]`` decoded codes, byte order ``j = 8q + 4s + 2t + b``, re-indexed as
    ``k' = 16s + 8t + 2q + b``: the index order of the wgmma's register operand (``FRAGMENT_ORDER``).

    In that operand the thread of lane ``4r + q`` holds columns ``2q, 2q + 1`` and ``2q + 8,
    2q + 9`` of every 16 (mma.sync's operand too); a thread that decoded the 8 contiguous bytes
    ``8q .. 8q + 7`` of a row therefore holds exactly its operand's codes of that row, and the
    reshape / permute / reshape below is a renaming of registers: Triton lays the result out
    as the operand with no conversion (checked on the sm_90 compile, Triton 3.6: no
    ``convert_layout`` before the dot; ``use_fragment_order`` gives the instruction counts).  The sum over K does not
    care about order, so the activations are put in the same order, by this same function.
    """
    v = tl.reshape(v, [BLOCK_N, 4, 2, 2, 2])
    v = tl.permute(v, [0, 2, 3, 1, 4])
    return tl.reshape(v, [BLOCK_N, 32])


@triton.jit
def _nibbles_by_asm(packed):
    """INT4 codes of 4 packed bytes at a time as bf16 ``128 + code`` (low and high nibbles).

    One ``prmt`` spreads two bytes over the two halves of a word, one ``lop3`` masks a nibble
    into each half and ors in the bf16 exponent of 128; the high nibbles take a shift more.
    About one instruction per code, where Triton's per-element decode takes about 2.5.
    """
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 t0, t1;
        prmt.b32 t0, $4, $4, 0x1100;
        prmt.b32 t1, $4, $4, 0x3322;
        lop3.b32 $0, t0, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 $1, t1, 0x000F000F, 0x43004300, 0xEA;
        shr.u32 t0, t0, 4;
        shr.u32 t1, t1, 4;
        lop3.b32 $2, t0, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 $3, t1, 0x000F000F, 0x43004300, 0xEA;
        }
        """,
        constraints="=r,=r,=r,=r,r",
        args=[packed],
        dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True,
        pack=4,
    )


@triton.autotune(
    configs=_split_configs(),
    key=[
        "M_BUCKET",
        "N",
        "KG",
        "N_LA",
        "MAGIC",
        "FINISH_LAST",
        "SWAP_AB",
        "ASM_DECODE",
        "FRAGMENT_ORDER",
        "PRESCALED",
        "SCALED_CODES",
    ],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _w4_small_m_kernel(
    x_ptr, sinv_ptr, xs_ptr, rs_ptr, q_ptr, ws_ptr, l1_ptr, part_ptr, la_ptr, cnt_ptr,
    l2_ptr, str_ptr, bias_ptr, out_ptr,
    M, K, N, KG, R, N_LA, M_BUCKET, S, rows_per_sample,
    stride_xm, stride_qg, stride_qn, stride_wsg, stride_l1k, stride_l2n, stride_sm, stride_om,
    FP4: tl.constexpr, MAGIC: tl.constexpr, LA_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    FINISH_LAST: tl.constexpr, FINISH_IN_FLIGHT: tl.constexpr, LA_FIRST: tl.constexpr,
    SWAP_AB: tl.constexpr, ASM_DECODE: tl.constexpr, FRAGMENT_ORDER: tl.constexpr, PRESCALED: tl.constexpr,
    SCALED_CODES: tl.constexpr, ROUND_BY_BITS: tl.constexpr, HAS_BRANCH: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    # One grid axis: every split's branch-slice programs before every column program
    # (``LA_FIRST``), so that the column programs arrive last.  With a 2-D (program, split)
    # grid the last split's slices started after most column programs; where those were fast
    # (scaled codes and pre-scaled activations) a slice arrived last at every block and
    # finished them all, one after another: 4-10x the kernel's time at 3072x12288.
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    n_slice_programs = N_LA * SPLIT_K
    if LA_FIRST:
        first_col = n_slice_programs
        first_la = 0
    else:
        first_col = 0
        first_la = n_blocks * SPLIT_K
    if (pid >= first_col) & (pid < first_col + n_blocks * SPLIT_K):
        col = (pid - first_col) % n_blocks
        pid_k = (pid - first_col) // n_blocks
        la_idx = -1
    else:
        col = -1
        la_idx = (pid - first_la) % N_LA
        pid_k = (pid - first_la) // N_LA
    offs_m = tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, 32)
    m_mask = offs_m < M
    per_split = tl.cdiv(KG, SPLIT_K)
    g_end = tl.minimum(pid_k * per_split + per_split, KG)
    target = SPLIT_K * (1 + N_LA)  # arrivals per column block: its K splits and every slice's
    if (col >= 0) & (col < n_blocks):  # a column block of the 4-bit GEMM
        offs_n = col * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        if SWAP_AB:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_hi = tl.zeros_like(acc)  # (SCALED_CODES: the high nibbles' sums)
        q_ptrs = q_ptr + offs_n[:, None] * stride_qn + offs_j[None, :]
        # (a hand prefetch of the next group's codes, as in gemm_w4_triton, measured slower
        # here: up to 33 % at M = 16 with INT4, within 7 % otherwise; docs/results.md)
        for grp in range(pid_k * per_split, g_end):
            packed = tl.load(q_ptrs + grp * stride_qg, n_mask[:, None], 0)
            ws = tl.load(ws_ptr + grp * stride_wsg + offs_n, n_mask, 0.0)
            k_lo = grp * 64 + offs_j
            if PRESCALED:  # bf16(x * 1/s), padded to whole groups, from _scale_x_kernel
                # (grp * 64 + offs_j is k_lo, but the two compile to different schedules on
                # sm_90; this form is the one timed and tested on the GPU, thirteenth session)
                xs_row = xs_ptr + offs_m[:, None] * (KG * 64) + grp * 64 + offs_j[None, :]
                xs_lo = tl.load(xs_row, m_mask[:, None], 0.0).to(DOT_DTYPE)
                xs_hi = tl.load(xs_row + 32, m_mask[:, None], 0.0).to(DOT_DTYPE)
            else:
                xmask_lo = m_mask[:, None] & (k_lo < K)[None, :]
                xmask_hi = m_mask[:, None] & (k_lo + 32 < K)[None, :]
                x_row = x_ptr + offs_m[:, None] * stride_xm + k_lo[None, :]
                x_lo = tl.load(x_row, xmask_lo, 0.0).to(tl.float32)
                x_hi = tl.load(x_row + 32, xmask_hi, 0.0).to(tl.float32)
                xs_lo = (x_lo * tl.load(sinv_ptr + k_lo, k_lo < K, 0.0)[None, :]).to(DOT_DTYPE)
                xs_hi = (x_hi * tl.load(sinv_ptr + k_lo + 32, k_lo + 32 < K, 0.0)[None, :]).to(DOT_DTYPE)
                if FRAGMENT_ORDER:  # the activations in the order of the codes
                    xs_lo = _fragment_order(xs_lo, BLOCK_M)
                    xs_hi = _fragment_order(xs_hi, BLOCK_M)
            if MAGIC & ASM_DECODE:  # (INT4 only) four bytes per instruction pair
                lo, hi = _nibbles_by_asm(packed)
            elif MAGIC:
                lo = _codes_as_bf16(packed & 0xF, FP4)
                hi = _codes_as_bf16(packed >> 4, FP4)
            else:
                lo = _decode(packed & 0xF, FP4)
                hi = _decode(packed >> 4, FP4)
            if SCALED_CODES:  # bf16(code * scale): the sums need no per-group work after the dot
                lo = _times_group_scale(lo, ws[:, None], MAGIC and not FP4, ROUND_BY_BITS).to(DOT_DTYPE)
                hi = _times_group_scale(hi, ws[:, None], MAGIC and not FP4, ROUND_BY_BITS).to(DOT_DTYPE)
            else:  # exact codes, each group's partial dot scaled in fp32 (below)
                lo = lo.to(DOT_DTYPE)
                hi = hi.to(DOT_DTYPE)
            if FRAGMENT_ORDER:
                lo = _fragment_order(lo, BLOCK_N)
                hi = _fragment_order(hi, BLOCK_N)
            if SCALED_CODES:
                if SWAP_AB:  # two chains: each dot waits on nothing of this group's other
                    acc = tl.dot(lo, tl.trans(xs_lo), acc)
                    acc_hi = tl.dot(hi, tl.trans(xs_hi), acc_hi)
                else:
                    acc = tl.dot(xs_lo, tl.trans(lo), acc)
                    acc_hi = tl.dot(xs_hi, tl.trans(hi), acc_hi)
            else:
                if SWAP_AB:  # [BLOCK_N, BLOCK_M] = codes @ x^T: the codes are a register operand
                    part = tl.dot(lo, tl.trans(xs_lo))
                    part = tl.dot(hi, tl.trans(xs_hi), part)
                else:
                    part = tl.dot(xs_lo, tl.trans(lo))
                    part = tl.dot(xs_hi, tl.trans(hi), part)
                if MAGIC and not FP4:  # the codes were 128 + c: take 136 * sum(x) back (exact in fp32)
                    if PRESCALED:
                        row_sum = tl.load(rs_ptr + offs_m * KG + grp, m_mask, 0.0)
                    else:
                        row_sum = tl.sum(xs_lo.to(tl.float32) + xs_hi.to(tl.float32), axis=1)
                    if SWAP_AB:
                        part -= 136.0 * row_sum[None, :]
                    else:
                        part -= 136.0 * row_sum[:, None]
                if SWAP_AB:
                    acc += part * ws[:, None]
                else:
                    acc += part * ws[None, :]
        if SCALED_CODES:
            acc += acc_hi
        if SWAP_AB:
            acc = tl.trans(acc)
        dst = part_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :]
        tl.store(dst, acc, m_mask[:, None] & n_mask[None, :])
        if FINISH_LAST:
            tl.debug_barrier()  # every thread's partial is written before the release below
            if tl.atomic_add(cnt_ptr + col, 1, sem="acq_rel") == target - 1:
                tl.debug_barrier()
                _finish_tile(
                    offs_m, offs_n, part_ptr, la_ptr, l2_ptr, str_ptr, bias_ptr, out_ptr,
                    M, N, R, S, rows_per_sample, stride_l2n, stride_sm, stride_om,
                    SPLIT_K, FINISH_IN_FLIGHT, HAS_BRANCH, HAS_BIAS, LA_R, DOT_DTYPE, BLOCK_M,
                    BLOCK_N,
                )  # fmt: skip
                tl.atomic_xchg(cnt_ptr + col, 0)  # zeroed again for the next launch
    else:  # a slice of LA_R ranks of x @ l1 over the same run of K
        offs_r = la_idx * LA_R + tl.arange(0, LA_R)
        r_mask = offs_r < R
        la = tl.zeros([BLOCK_M, LA_R], dtype=tl.float32)
        for grp in range(pid_k * per_split, g_end):
            for half in tl.static_range(2):
                kk = grp * 64 + 32 * half + offs_j
                xt = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                    m_mask[:, None] & (kk < K)[None, :],
                    0.0,
                )
                l1 = tl.load(
                    l1_ptr + kk[:, None] * stride_l1k + offs_r[None, :],
                    (kk < K)[:, None] & r_mask[None, :],
                    0.0,
                )
                la = tl.dot(xt.to(tl.bfloat16).to(DOT_DTYPE), l1.to(DOT_DTYPE), la)
        # (names differ from the other branch's: Triton wants one type per name across an if)
        la_dst = la_ptr + (pid_k * M + offs_m[:, None]) * R + offs_r[None, :]
        tl.store(la_dst, la, m_mask[:, None] & r_mask[None, :])
        if FINISH_LAST:  # count this slice in every column block; finish those it completes
            tl.debug_barrier()
            for b0 in range(0, n_blocks, 128):
                offs_b = b0 + tl.arange(0, 128)
                valid = offs_b < n_blocks
                prev = tl.atomic_add(cnt_ptr + offs_b, 1, mask=valid, sem="acq_rel")
                done = ((prev == target - 1) & valid).to(tl.int32)
                if tl.sum(done) > 0:  # rare: all the column programs of a block came first
                    tl.debug_barrier()
                    for blk in range(b0, tl.minimum(b0 + 128, n_blocks)):
                        if tl.sum(tl.where(offs_b == blk, done, 0)) > 0:
                            _finish_tile(
                                offs_m, blk * BLOCK_N + tl.arange(0, BLOCK_N), part_ptr, la_ptr, l2_ptr,
                                str_ptr, bias_ptr, out_ptr, M, N, R, S, rows_per_sample, stride_l2n,
                                stride_sm, stride_om, SPLIT_K, FINISH_IN_FLIGHT, HAS_BRANCH,
                                HAS_BIAS, LA_R, DOT_DTYPE, BLOCK_M, BLOCK_N,
                            )  # fmt: skip
                            tl.atomic_xchg(cnt_ptr + blk, 0)


# Read once here, not per launch (the launch path of a decode step).
_MOST_SPLITS = max(c.kwargs["SPLIT_K"] for c in _w4_small_m_kernel.configs)
_NARROWEST_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _w4_small_m_kernel.configs)


@triton.jit
def _finish_tile(
    offs_m, offs_n, part_ptr, la_ptr, l2_ptr, str_ptr, bias_ptr, out_ptr,
    M, N, R, S, rows_per_sample, stride_l2n, stride_sm, stride_om, n_splits,
    IN_FLIGHT: tl.constexpr, HAS_BRANCH: tl.constexpr, HAS_BIAS: tl.constexpr, LA_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Output tile ``offs_m x offs_n``: the K splits' partials, the branch and the bias.

    Partials are read at L2 (``.cg``): in the one-launch form other programs wrote them.  The
    loops over splits are unrolled ``IN_FLIGHT`` at a time so that that many partial loads are
    in flight at once; each step of the loop waits one L2 round trip.  The one-launch kernel
    takes 4 (``FINISH_IN_FLIGHT``): at M = 16 its time fell against 1 in 8 of 14 tiles (by
    up to 2 us) and rose in one (by 1.6 us, 5 %).  The
    epilogue kernel takes 1: with all splits in flight it measured 3-10 % slower at M = 64,
    where it runs (``bench/diag_small_m_stages.py``, docs/results.md).
    """
    m_mask = offs_m < M
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    acc = _sum_of_splits(part_ptr, offs_m, offs_n, M, N, mask, n_splits, IN_FLIGHT, BLOCK_M, BLOCK_N)
    if HAS_BRANCH:
        srow = (offs_m // rows_per_sample) % S
        for r0 in range(0, R, LA_R):  # LA_R ranks at a time keeps the tiles small at any rank
            rr = r0 + tl.arange(0, LA_R)
            rmask = m_mask[:, None] & (rr < R)[None, :]
            la = _sum_of_splits(la_ptr, offs_m, rr, M, R, rmask, n_splits, IN_FLIGHT, BLOCK_M, LA_R)
            st = tl.load(str_ptr + srow[:, None] * stride_sm + rr[None, :], rmask, 0.0)
            la = (la.to(tl.bfloat16).to(tl.float32) * st).to(tl.bfloat16)
            l2 = tl.load(
                l2_ptr + offs_n[:, None] * stride_l2n + rr[None, :], n_mask[:, None] & (rr < R)[None, :], 0.0
            )
            acc = tl.dot(la.to(DOT_DTYPE), tl.trans(l2.to(DOT_DTYPE)), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, n_mask, 0.0)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask)


@triton.jit
def _sum_of_splits(
    base_ptr, offs_m, offs_c, M, n_cols, mask, n_splits,
    IN_FLIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Sum over splits of ``[split, M, n_cols]`` fp32 partials at ``offs_m x offs_c``, in split
    order, ``IN_FLIGHT`` loads at a time (read at L2: other programs wrote them)."""
    total = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for s0 in range(0, n_splits, IN_FLIGHT):
        for s in tl.static_range(IN_FLIGHT):
            total += tl.load(
                base_ptr + ((s0 + s) * M + offs_m[:, None]) * n_cols + offs_c[None, :],
                mask & (tl.full([BLOCK_M, BLOCK_C], s0 + s, tl.int32) < n_splits),
                0.0,
                cache_modifier=".cg",
            )
    return total


@triton.jit
def _small_m_epilogue_kernel(
    part_ptr, la_ptr, l2_ptr, str_ptr, bias_ptr, out_ptr,
    M, N, R, S, rows_per_sample, stride_l2n, stride_sm, stride_om, n_splits,
    HAS_BRANCH: tl.constexpr, HAS_BIAS: tl.constexpr, LA_R: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    _finish_tile(
        tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N),
        part_ptr, la_ptr, l2_ptr, str_ptr, bias_ptr, out_ptr, M, N, R, S, rows_per_sample, stride_l2n,
        stride_sm, stride_om, n_splits, 1, HAS_BRANCH, HAS_BIAS, LA_R, DOT_DTYPE, BLOCK_M, BLOCK_N,
    )  # fmt: skip


def use_magic(fmt: str, m: int) -> bool:
    """Bit-built codes where they measured faster on H100: INT4, with the codes as the dot's
    left operand (``use_swap``), at M = 16 and 64 alike (docs/results.md).

    FP4's bit path (a select per code) lost on every FLUX shape (``bench/diag_small_m.py``,
    2026-11-23).  INT4's row-sum correction lost at M = 64 with the codes as the right operand;
    as the left one it won by 2-6 % at the best tile (``bench/diag_small_m_stages.py``,
    two runs, 3072x3072 and 3072x12288, tenth session).
    """
    return fmt == "int4"


def scaled_activations(
    x: torch.Tensor,
    smooth_inv: torch.Tensor,
    row_sums: bool,
    fragment_order: bool = False,
    launch_dependents: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bf16(x * smooth_inv) [M, KG * 64] zero-padded, its row sums per group [M, KG] fp32)``;
    the sums are left empty unless ``row_sums`` (only INT4's bit-built codes need them).
    ``fragment_order``: each 32 columns in ``_fragment_order``'s order (``use_fragment_order``).
    ``launch_dependents``: let a next kernel launched with programmatic dependent launch start
    before this one ends (``_scale_x_kernel``'s ``LAUNCH_DEPENDENTS``; sm_90)."""
    m, k = x.shape
    kg = triton.cdiv(k, 64)
    xs = torch.empty(m, kg * 64, device=x.device, dtype=torch.bfloat16)
    sums = torch.empty(m, kg if row_sums else 0, device=x.device, dtype=torch.float32)
    _scale_x_kernel[(triton.cdiv(kg, 4), triton.cdiv(m, 16))](
        x, smooth_inv, xs, sums, m, k, kg, x.stride(0), ROW_SUMS=row_sums, FRAGMENT_ORDER=fragment_order,
        BLOCK_M=16, GROUPS=4, LAUNCH_DEPENDENTS=launch_dependents,
    )  # fmt: skip
    return xs, sums


#: Weights (K x N) from which the scaling pre-kernel also runs at M <= 16 (``use_prescale``).
PRESCALE_MIN_WEIGHTS = 1 << 24


def use_prescale(m: int, k: int, n: int) -> bool:
    """The scaling pre-kernel above the one-launch rows, and at any M for large layers.

    With scaled codes (``use_scaled_codes``) the activations then reach the dot straight from
    a pipelined load into shared memory, which lets Triton keep its wgmmas in flight (the
    activations scaled in registers are stored to shared memory first, and each dot waits),
    and each column program no longer scales its own copy of them.  At M = 64 (two launches)
    the best tile went 15.3 -> 14.6 us (3072x3072) and 33.7 -> 28.5 us (3072x12288); without
    scaled codes the pre-kernel lost (16.7 -> 18.0 us, 39.6 -> 39.3 us; eleventh session).
    At M = 16 it adds a launch to a kernel that runs in one, which a layer of K x N >=
    ``PRESCALE_MIN_WEIGHTS`` earns back: in the tiles of ``bench/diag_small_m_stages.py``
    (INT4, twelfth session) it was faster in every tile of 3072x9216 (best 20.0 -> 19.2 us)
    and 3072x12288 (best 20.5 -> 20.4 us, others by up to 3.1 us), by 1.3-4.9 us in every
    tile of 12288x3072 (best 22.0 -> 19.7 us), but slower at the best tile of 3072x3072
    (10.2 -> 10.7 us).
    """
    return m > SMALL_M_ONE_LAUNCH or k * n >= PRESCALE_MIN_WEIGHTS


def use_scaled_codes(m: int) -> bool:
    """Codes times their group scale in bf16 before the dot, everywhere (``reference_small_m``'s
    default too).  The sums then need no work per group, so Triton keeps the wgmmas in flight
    across groups, where the fp32 scaling of each group's partial dot waited for every one.
    Measured on H100 (``bench/diag_small_m_stages.py``, best tile, eleventh session): M = 16
    10.3 -> 10.0 us (3072x3072) and 20.8 -> 19.5 us (3072x12288); M = 64 (two launches)
    16.7 -> 15.3 us and 39.6 -> 33.7 us, and with the scaling pre-kernel too
    (``use_prescale``) 14.6 and 28.5 us.
    """
    return True


def use_fragment_order(fmt: str, magic: bool, swap: bool, interpreted: bool, m: int) -> bool:
    """INT4's bit-built codes decoded eight at a time by ``_nibbles_by_asm`` and used in the
    wgmma operand's order (``_fragment_order``), on the GPU, with the codes as the left
    operand, at M <= 16.  On the sm_90 compile the loop goes from 383 to 292 instructions per
    group at the (128, 8, 4, 4) tile (Triton 3.6): eight-byte shared-memory reads instead of
    two-byte ones, and no byte shuffles to build each thread's operand.  Measured on H100
    (``bench/diag_small_m_stages.py``, fixed tiles, thirteenth session): at M = 16 faster in
    43 of 46 tile-variant-shape cases; in the default variant's best tile 10.0 -> 9.8 us
    (3072x3072), 17.7 -> 16.0 us (3072x9216), 21.9 -> 20.4 us (3072x12288) and 19.8 -> 19.0 us
    (12288x3072).
    Not at M > 16: there, at 128-column tiles of 4 warps, the inline-PTX decode in this order
    gave wrong sums on H100 (Triton 3.6) in some runs (``MAX_FRAGMENT_ASM_ROWS``).
    """
    return fmt == "int4" and magic and swap and not interpreted and m <= MAX_FRAGMENT_ASM_ROWS


#: Rows up to which the inline-PTX decode may run in fragment order.  Above them, at the
#: (128, 8 | 16, 4, 4) tiles and 64 rows, its sums came out wrong on H100 in each of three
#: diag runs (relative error 36-150) and in one of 44 cases of ``test_fragment_order_every_config``
#: (thirteenth session); Triton's own decode in the same order was right at every tile, and
#: so was every tile at 16 rows.
MAX_FRAGMENT_ASM_ROWS = 16


def use_swap(m: int) -> bool:
    """The codes as the dot's left operand, everywhere: Hopper's wgmma then takes them from
    registers.  As the right operand they were stored to shared memory every group at M = 64
    (a wgmma reading both operands there), and at M = 16 they fed an mma.sync.  Measured on
    H100 (``bench/diag_small_m_stages.py``, best tile, tenth session): M = 16 11.7 -> 10.3 us
    (3072x3072) and 26.7 -> 23.1 us (3072x12288); M = 64 (two launches) 17.9 -> 16.9 us and
    45.0 -> 43.9 us.
    """
    return True


def finish_for(m: int) -> str:
    """One launch where it measured faster on H100 (M <= 16), the epilogue kernel above.

    At M = 16 the one-launch form was faster in 14 of 16 FLUX cases over two runs (up to
    23 %, and 10-30 % at 96 ranks); at M = 64 the two-launch form won 14 of 16 (up to 30 %):
    the programs that finish a block add 64-row partials one after another at the end of the
    launch (``bench/diag_small_m.py``, 2026-11-23, docs/results.md).
    """
    return "last" if m <= SMALL_M_ONE_LAUNCH else "epilogue"


def w4_linear_small_m_triton(
    x: torch.Tensor,
    smooth_inv: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    fmt: str,
    l1: torch.Tensor,
    l2: torch.Tensor,
    strength: torch.Tensor,
    rows_per_sample: int,
    bias: torch.Tensor | None,
    config: dict | None = None,
    magic: bool | None = None,
    finish: str | None = None,
    la_first: bool = True,
    swap: bool | None = None,
    asm: bool | None = None,
    prescale: bool | None = None,
    scale_codes: bool | None = None,
    fragment_order: bool | None = None,
    pinned: bool = True,
) -> torch.Tensor:
    """``[M, N]`` in ``x.dtype``; shapes as ``studio.kernels.w4_linear``, ``M <= 64`` expected.

    ``config`` (BLOCK_N, SPLIT_K, num_warps, num_stages) skips autotuning (tests, the interpreter).
    ``magic``: codes to bf16 by bit patterns (True) or through fp32 (False); None: ``use_magic``.
    ``finish``: ``"last"`` (one launch: the program that completes a column block adds its
    partials) or ``"epilogue"`` (a second kernel does); None: ``finish_for(m)``.
    ``la_first``: the branch-slice programs come first in the grid (False: last; the tests run
    both, so that either kind of program finishing a block is covered).
    ``swap``: codes as the dot's left operand (``use_swap``); None: ``use_swap(m)``.
    ``asm``: INT4 bit-built codes decoded by inline PTX (``_nibbles_by_asm``, GPU only);
    None: not (``USE_ASM_DECODE``).
    ``prescale``: ``bf16(x * 1/s)`` (and INT4's row sums) by a small kernel first, instead of
    in every column program; None: ``use_prescale(m, k, n)``.
    ``scale_codes``: each code times its group scale, rounded to bf16, before the dot
    (``reference_small_m`` with ``scaled_codes=True``), instead of each group's partial dot
    scaled in fp32; None: ``use_scaled_codes(m)``.
    ``fragment_order``: the decoded codes and the activations taken in the wgmma operand's
    order (``_fragment_order``: the same products, summed in another order); None:
    ``use_fragment_order``.  With it, ``asm`` defaults to on where it can run, up to
    ``MAX_FRAGMENT_ASM_ROWS`` rows; ``asm=True`` with it above those rows is refused.
    ``pinned``: INT4 with no ``config`` and no option forced runs the tile ``small_m_tiles``
    pins for this shape where it has one (False: autotune, as before tiles were pinned).
    """
    forced = (magic, finish, swap, asm, prescale, scale_codes, fragment_order)
    if config is None and pinned and la_first and fmt == "int4" and all(v is None for v in forced):
        config = pinned_tile(x.shape[0], qweight.shape[0], qweight.shape[1], x.device)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    finish = finish_for(x.shape[0]) if finish is None else finish
    magic = use_magic(fmt, x.shape[0]) if magic is None else magic
    swap = use_swap(x.shape[0]) if swap is None else swap
    asm_can_run = fmt == "int4" and magic and not interpreted
    if asm and not asm_can_run:
        raise ValueError("asm decoding needs INT4, magic=True and a GPU (not TRITON_INTERPRET)")
    if fragment_order is None:
        fragment_order = use_fragment_order(fmt, magic, swap, interpreted, x.shape[0])
    if asm is None:
        asm = USE_ASM_DECODE or (fragment_order and asm_can_run and x.shape[0] <= MAX_FRAGMENT_ASM_ROWS)
    if asm and fragment_order and x.shape[0] > MAX_FRAGMENT_ASM_ROWS:
        raise ValueError(
            f"asm decoding in fragment order is limited to M <= {MAX_FRAGMENT_ASM_ROWS} (it gave wrong "
            "sums on H100 above that); pass asm=False for Triton's own decode"
        )
    prescale = use_prescale(x.shape[0], x.shape[1], qweight.shape[1]) if prescale is None else prescale
    scale_codes = use_scaled_codes(x.shape[0]) if scale_codes is None else scale_codes
    if finish not in ("last", "epilogue"):
        raise ValueError(f"finish must be 'last' or 'epilogue', not {finish!r}")
    x = x.contiguous()
    m, k = x.shape
    kg, n, _ = qweight.shape
    r = l1.shape[1]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    r_pad = max(16, triton.next_power_of_2(max(r, 1)))
    la_r = min(LA_RANKS, r_pad)
    n_la = triton.cdiv(r, la_r)
    # Room for the most splits and column blocks autotuning may pick (or the forced config's).
    splits = _MOST_SPLITS if config is None else config["SPLIT_K"]
    blocks = triton.cdiv(n, _NARROWEST_BLOCK_N if config is None else config["BLOCK_N"])
    part = torch.empty(splits, m, n, device=x.device, dtype=torch.float32)
    la = torch.empty(splits, m, max(r, 1), device=x.device, dtype=torch.float32)
    l1 = l1 if r else l1.new_zeros(k, 1)
    l2 = l2 if r else l2.new_zeros(n, 1)
    bias_t = bias.float().contiguous() if bias is not None else out
    block_m = max(16, triton.next_power_of_2(m))
    _, cnt = zeroed_scratch(x.device, 0, blocks)
    rows_per_sample = max(rows_per_sample, 1)
    xs, row_sums = (
        scaled_activations(x, smooth_inv, magic and fmt == "int4" and not scale_codes, fragment_order)
        if prescale
        else (x, out)
    )

    def grid(meta: dict) -> tuple[int]:
        return ((triton.cdiv(n, meta["BLOCK_N"]) + n_la) * meta["SPLIT_K"],)

    split = launch_autotuned(
        _w4_small_m_kernel,
        grid,
        (
            x, smooth_inv, xs, row_sums, qweight, wscale, l1, part, la, cnt, l2, strength, bias_t, out,
            m, k, n, kg, max(r, 1), n_la, triton.next_power_of_2(max(m, 16)), strength.shape[0], rows_per_sample,
            x.stride(0), qweight.stride(0), qweight.stride(1), wscale.stride(0), l1.stride(0), l2.stride(0),
            strength.stride(0), out.stride(0),
        ),
        dict(
            FP4=fmt == "fp4", MAGIC=magic, SWAP_AB=swap, ASM_DECODE=asm, FRAGMENT_ORDER=fragment_order, PRESCALED=prescale,
            SCALED_CODES=scale_codes, ROUND_BY_BITS=interpreted, LA_R=la_r,
            DOT_DTYPE=branch_dot_dtype(), BLOCK_M=block_m, FINISH_LAST=finish == "last",
            FINISH_IN_FLIGHT=FINISH_IN_FLIGHT, LA_FIRST=la_first,
            HAS_BRANCH=r > 0, HAS_BIAS=bias is not None,
        ),
        config,
        "SPLIT_K",
    )  # fmt: skip
    if finish == "epilogue":
        # 16 x 32 tiles: enough programs to stream the partials (16-row strips at M = 64).
        _small_m_epilogue_kernel[(triton.cdiv(m, 16), triton.cdiv(n, 32))](
            part, la, l2, strength, bias_t, out,
            m, n, max(r, 1), strength.shape[0], rows_per_sample, l2.stride(0), strength.stride(0),
            out.stride(0), split,
            HAS_BRANCH=r > 0, HAS_BIAS=bias is not None, LA_R=la_r, DOT_DTYPE=branch_dot_dtype(),
            BLOCK_M=16, BLOCK_N=32,
        )  # fmt: skip
    return out
