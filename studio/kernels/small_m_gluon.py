"""Gluon kernel of the small-M INT4 product: codes loaded straight into the mma operand's registers.

Why Gluon (Triton's layout-explicit dialect) and not ``triton.language``: in ``tl`` the
compiler picks where each decoded code lives, and at M <= 16 it spent most of the loop
moving codes into the layout of the dot's operand (shared-memory round trips, byte splits
and re-packs: 368 instructions per warp per group, ``docs/results.md``, twelfth session).
Here the packed codes are loaded in ``DotOperandLayout`` itself, so each thread reads the
bytes of its own operand fragment (8 of a column's 32 bytes per group, one load) and
decodes them in place by inline PTX: no layout conversion at all.

``_w4_gluon_kernel``, grid ``(column blocks, SPLIT_K)``: program ``(col, pid_k)`` owns
``BLOCK_N`` output channels and one run of groups along K.  Per group of 64 it loads the
packed codes ``[32 bytes, BLOCK_N]`` (byte ``j`` holds K = ``j`` and ``j + 32``, the stored
format of ``reference.py``), turns both nibbles into bf16 ``code - 8`` (exact), takes two
``mma.sync`` (m16n8k16) dots with the pre-scaled activations ``bf16(x * smooth_inv)`` (rows
padded to 16), scales the group's sum by its group scale in fp32 and adds it to the running
sum.  It writes fp32 partials ``[SPLIT_K, M, N]``; the small-M path's epilogue kernel adds
them with the low-rank branch and the bias.  ``mma.sync`` rather than ``wgmma``: at 16 rows
the product is a sliver of the tensor cores' time, and ``mma.sync`` takes both operands from
registers, waits for nothing asynchronous and needs no shared memory.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2


@gluon.jit
def _int4_codes_minus_8(packed):
    """Four packed bytes at a time to bf16 ``code - 8`` of their low and high nibbles.

    ``0x4300 | code`` is the bf16 ``128 + code``; one ``fma.rn.bf16x2`` by 1 and -136 makes it
    ``code - 8`` exactly (small integers)."""
    return gl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 t0, t1, u0, u1, one, shift;
        mov.b32 one, 0x3F803F80;
        mov.b32 shift, 0xC308C308;
        prmt.b32 t0, $4, $4, 0x1100;
        prmt.b32 t1, $4, $4, 0x3322;
        lop3.b32 u0, t0, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 u1, t1, 0x000F000F, 0x43004300, 0xEA;
        fma.rn.bf16x2 $0, u0, one, shift;
        fma.rn.bf16x2 $1, u1, one, shift;
        shr.u32 t0, t0, 4;
        shr.u32 t1, t1, 4;
        lop3.b32 u0, t0, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 u1, t1, 0x000F000F, 0x43004300, 0xEA;
        fma.rn.bf16x2 $2, u0, one, shift;
        fma.rn.bf16x2 $3, u1, one, shift;
        }
        """,
        constraints="=r,=r,=r,=r,r",
        args=[packed],
        dtype=(gl.bfloat16, gl.bfloat16),
        is_pure=True,
        pack=4,
    )


@gluon.jit
def _group_loads(xs, qweight, wscale, g, g1, q_offs, q_mask, x_offs, x_mask, n_c, N, stride_qg, stride_wg):
    """Group ``g``'s packed codes, its two halves of activations and its scales (zeros past ``g1``)."""
    live = g < g1
    codes = gl.load(qweight + g * stride_qg + q_offs, mask=q_mask & live, other=0)
    x_lo = gl.load(xs + g * 64 + x_offs, mask=x_mask & live, other=0.0)
    x_hi = gl.load(xs + g * 64 + 32 + x_offs, mask=x_mask & live, other=0.0)
    scale = gl.load(wscale + g * stride_wg + n_c, mask=(n_c < N) & live, other=0.0)
    return codes, x_lo, x_hi, scale


@gluon.jit
def _group_dot(acc, codes, x_lo, x_hi, scale, mma: gl.constexpr):
    """``acc`` plus one group's product, its sum scaled by the group scale in fp32."""
    lo, hi = _int4_codes_minus_8(codes)
    d = mma_v2(x_lo, lo, gl.zeros(acc.shape, gl.float32, mma))
    d = mma_v2(x_hi, hi, d)
    return acc + d * scale[None, :]


@gluon.jit
def _scaled_group_dot(acc, codes, x_lo, x_hi, scale):
    """``acc`` plus one group's dot with each code times its group scale rounded to bf16
    (``bf16(code * bf16(scale))``, ``reference_small_m``'s ``scaled_codes``): nothing per group
    but the dots, which chain on ``acc`` itself (no second accumulator held in registers)."""
    lo, hi = _int4_codes_minus_8(codes)
    s = scale.to(gl.bfloat16)[None, :]
    acc = mma_v2(x_lo, lo * s, acc)
    return mma_v2(x_hi, hi * s, acc)


@gluon.jit
def _group_dot_left(acc, codes, x_lo, x_hi, scale, mma: gl.constexpr):
    """``_group_dot`` transposed: codes ``[BLOCK_N, 32]`` as the dot's left operand, the
    activations ``[32, BLOCK_M]`` as its right one, ``acc [BLOCK_N, BLOCK_M]``."""
    lo, hi = _int4_codes_minus_8(codes)
    d = mma_v2(lo, x_lo, gl.zeros(acc.shape, gl.float32, mma))
    d = mma_v2(hi, x_hi, d)
    return acc + d * scale[:, None]


@gluon.jit
def _scaled_group_dot_left(acc, codes, x_lo, x_hi, scale):
    """``_scaled_group_dot`` transposed (as ``_group_dot_left``)."""
    lo, hi = _int4_codes_minus_8(codes)
    s = scale.to(gl.bfloat16)[:, None]
    acc = mma_v2(lo * s, x_lo, acc)
    return mma_v2(hi * s, x_hi, acc)


@gluon.jit
def _w4_gluon_kernel(
    xs, qweight, wscale, part,
    M, N, KG, stride_xm, stride_qg, stride_wg,
    BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr, K_WIDTH: gl.constexpr, WARPS: gl.constexpr, STEP: gl.constexpr,
):  # fmt: skip
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[2, 0], warps_per_cta=[1, WARPS], instr_shape=[16, 8]
    )
    a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=K_WIDTH)
    b_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=K_WIDTH)

    j_b = gl.arange(0, 32, layout=gl.SliceLayout(1, b_op))
    n_b = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, b_op))
    q_offs = n_b[None, :] * 32 + j_b[:, None]
    q_mask = (n_b < N)[None, :]
    m_a = gl.arange(0, 16, layout=gl.SliceLayout(1, a_op))
    j_a = gl.arange(0, 32, layout=gl.SliceLayout(0, a_op))
    x_offs = m_a[:, None] * stride_xm + j_a[None, :]
    x_mask = (m_a < M)[:, None]
    n_c = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
    m_c = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))

    per_split = gl.cdiv(KG, SPLIT_K)
    g0 = pid_k * per_split
    g1 = gl.minimum(g0 + per_split, KG)
    acc = gl.zeros([16, BLOCK_N], gl.float32, mma)
    # STEP groups' loads issued before any of them is computed: more bytes in flight per
    # program (Gluon does no software pipelining; carrying loaded bytes from one iteration to
    # the next instead made the compiler unpack and re-pack every byte).
    for g in range(g0, g1, STEP):
        ca, xla, xha, sa = _group_loads(
            xs, qweight, wscale, g, g1, q_offs, q_mask, x_offs, x_mask, n_c, N, stride_qg, stride_wg
        )
        if STEP >= 2:
            cb, xlb, xhb, sb = _group_loads(
                xs, qweight, wscale, g + 1, g1, q_offs, q_mask, x_offs, x_mask, n_c, N, stride_qg, stride_wg
            )
        if STEP >= 4:
            cc, xlc, xhc, sc = _group_loads(
                xs, qweight, wscale, g + 2, g1, q_offs, q_mask, x_offs, x_mask, n_c, N, stride_qg, stride_wg
            )
            cd, xld, xhd, sd = _group_loads(
                xs, qweight, wscale, g + 3, g1, q_offs, q_mask, x_offs, x_mask, n_c, N, stride_qg, stride_wg
            )
        acc = _group_dot(acc, ca, xla, xha, sa, mma)
        if STEP >= 2:
            acc = _group_dot(acc, cb, xlb, xhb, sb, mma)
        if STEP >= 4:
            acc = _group_dot(acc, cc, xlc, xhc, sc, mma)
            acc = _group_dot(acc, cd, xld, xhd, sd, mma)
    offs = (pid_k * M + m_c[:, None]) * N + n_c[None, :]
    gl.store(part + offs, acc, mask=(m_c < M)[:, None] & (n_c < N)[None, :])


@gluon.jit
def _ring_step_wait(STAGES: gl.constexpr):
    """This thread's copies of the slot about to be read have landed, and every thread's have,
    and every thread is done reading the slot that is refilled next."""
    async_copy.wait_group(STAGES - 2)
    gl.thread_barrier()


@gluon.jit
def _issue_column_copies(
    c_ring, x_ring, s_ring, v_ring, g, g1, stage, q_ptrs, q_mask, x_ptrs, x_mask, s_ptrs, s_mask, v_ptrs,
    stride_qg, stride_wg, PRESCALED: gl.constexpr, WEIGHTS: gl.constexpr = True, ACTIVATIONS: gl.constexpr = True,
):  # fmt: skip
    """``cp.async`` of group ``g``'s codes, activations, scales (and smoothing factors unless
    ``PRESCALED``) into slot ``stage``; nothing is read past ``g1``.  One copy group.
    ``WEIGHTS`` / ``ACTIVATIONS`` False: leave out the codes and scales / the activations
    (and without the activations commit nothing: the next call's group takes them)."""
    live = g < g1
    if WEIGHTS:
        async_copy.async_copy_global_to_shared(
            c_ring.index(stage), q_ptrs + g * stride_qg, mask=q_mask & live
        )
        async_copy.async_copy_global_to_shared(
            s_ring.index(stage), s_ptrs + g * stride_wg, mask=s_mask & live
        )
    if ACTIVATIONS:
        async_copy.async_copy_global_to_shared(x_ring.index(stage), x_ptrs + g * 64, mask=x_mask & live)
        if not PRESCALED:
            async_copy.async_copy_global_to_shared(v_ring.index(stage), v_ptrs + g * 64, mask=live)
        async_copy.commit_group()


@gluon.jit
def _grid_dependency_wait():
    """Wait until the grids this launch depends on are complete and their writes visible
    (``griddepcontrol.wait``; a no-op for a launch without programmatic dependent launch)."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _column_partials(
    col, pid_k, x, sinv, qweight, wscale, part, M, N, KG, stride_xm, stride_qg, stride_wg,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr, WARPS: gl.constexpr,
    STAGES: gl.constexpr, PRESCALED: gl.constexpr, SCALED_CODES: gl.constexpr, mma: gl.constexpr,
    a_op: gl.constexpr, b_op: gl.constexpr, CODES_LEFT: gl.constexpr = False, GRID_DEP_WAIT: gl.constexpr = False,
    STORE: gl.constexpr = True,
):  # fmt: skip
    """Column block ``col``'s product over split ``pid_k``'s groups, stored as fp32 partials
    and returned (``[BLOCK_M, BLOCK_N]``: ``mma`` layout, or its transpose with ``CODES_LEFT``).
    ``STORE`` False: not stored, and returned as the accumulator is held (with ``CODES_LEFT``
    ``[BLOCK_N, BLOCK_M]`` in ``mma.sync``'s layout with the warps along the columns).

    ``BLOCK_M`` rows (16, 32 or 64): each warp owns ``BLOCK_N / WARPS`` columns at every row,
    so a code is decoded once and serves ``BLOCK_M / 16`` ``mma.sync`` tiles.
    ``SCALED_CODES``: ``_scaled_group_dot``, else ``_group_dot`` (exact codes).

    ``CODES_LEFT``: the transposed product ``W @ x.T`` (``_group_dot_left``): the decoded codes
    are the dot's left operand and the activations its right one.  The left operand's four
    registers hold two rows each; the activations' rows come from two shared-memory reads,
    so as the left operand they were copied into place before every dot (35 moves of 156
    instructions a group at 16 rows, Triton 3.6, sm_90).  Decoded codes are computed where
    the dot needs them, and the activations as the right operand are one row each.  Needs
    ``BLOCK_N`` a multiple of ``16 * WARPS``."""
    if CODES_LEFT:
        gl.static_assert(
            BLOCK_N % (16 * WARPS) == 0, "codes as the left operand: BLOCK_N a multiple of 16 * WARPS"
        )
    mma_t: gl.constexpr = gl.NVMMADistributedLayout(
        version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8]
    )
    a_t: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_t, k_width=8)
    b_t: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma_t, k_width=8)
    c_copy: gl.constexpr = gl.BlockedLayout([16, 1], [2, 16], [1, WARPS], [0, 1])
    x_copy: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
    s_copy: gl.constexpr = gl.BlockedLayout([4], [32], [WARPS], [0])
    v_copy: gl.constexpr = gl.BlockedLayout([4], [32], [WARPS], [0])
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    c_ring = gl.allocate_shared_memory(
        gl.uint8, [STAGES, 32, BLOCK_N], gl.SwizzledSharedLayout(1, 1, 1, [0, 1])
    )
    x_ring = gl.allocate_shared_memory(
        gl.bfloat16, [STAGES, BLOCK_M, 64], gl.SwizzledSharedLayout(8, 1, 8, [1, 0])
    )
    s_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N], flat)
    v_ring = gl.allocate_shared_memory(gl.float32, [STAGES, 64], flat)

    j_c = gl.arange(0, 32, layout=gl.SliceLayout(1, c_copy))
    n_cc = col * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, c_copy))
    q_ptrs = qweight + n_cc[None, :] * 32 + j_c[:, None]
    q_mask = (n_cc < N)[None, :]
    m_x = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_copy))
    k_x = gl.arange(0, 64, layout=gl.SliceLayout(0, x_copy))
    x_ptrs = x + m_x[:, None] * stride_xm + k_x[None, :]
    x_mask = (m_x < M)[:, None]
    n_s = col * BLOCK_N + gl.arange(0, BLOCK_N, layout=s_copy)
    s_ptrs = wscale + n_s
    s_mask = n_s < N
    v_ptrs = sinv + gl.arange(0, 64, layout=v_copy)

    per_split = gl.cdiv(KG, SPLIT_K)
    g0 = pid_k * per_split
    g1 = gl.minimum(g0 + per_split, KG)
    if GRID_DEP_WAIT:  # the weights' first copies in flight before the activations can be read
        for s in gl.static_range(STAGES - 1):
            _issue_column_copies(c_ring, x_ring, s_ring, v_ring, g0 + s, g1, s, q_ptrs, q_mask, x_ptrs, x_mask,
                                 s_ptrs, s_mask, v_ptrs, stride_qg, stride_wg, PRESCALED, True, False)  # fmt: skip
        _grid_dependency_wait()
        for s in gl.static_range(STAGES - 1):
            _issue_column_copies(c_ring, x_ring, s_ring, v_ring, g0 + s, g1, s, q_ptrs, q_mask, x_ptrs, x_mask,
                                 s_ptrs, s_mask, v_ptrs, stride_qg, stride_wg, PRESCALED, False, True)  # fmt: skip
    else:
        for s in gl.static_range(STAGES - 1):
            _issue_column_copies(c_ring, x_ring, s_ring, v_ring, g0 + s, g1, s, q_ptrs, q_mask, x_ptrs, x_mask,
                                 s_ptrs, s_mask, v_ptrs, stride_qg, stride_wg, PRESCALED)  # fmt: skip
    if CODES_LEFT:
        acc_t = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma_t)
    else:
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
    for g in range(g0, g1):
        i = g - g0
        _ring_step_wait(STAGES)
        _issue_column_copies(c_ring, x_ring, s_ring, v_ring, g + STAGES - 1, g1, (i + STAGES - 1) % STAGES,
                             q_ptrs, q_mask, x_ptrs, x_mask, s_ptrs, s_mask, v_ptrs, stride_qg, stride_wg,
                             PRESCALED)  # fmt: skip
        stage = i % STAGES
        x_tile = x_ring.index(stage)
        if CODES_LEFT:
            codes = c_ring.index(stage).permute((1, 0)).load(a_t)
            x_lo = x_tile.slice(0, 32, dim=1).permute((1, 0)).load(b_t)
            x_hi = x_tile.slice(32, 32, dim=1).permute((1, 0)).load(b_t)
            if not PRESCALED:
                v_tile = v_ring.index(stage)
                v_lo = v_tile.slice(0, 32).load(gl.SliceLayout(1, b_t))
                v_hi = v_tile.slice(32, 32).load(gl.SliceLayout(1, b_t))
                x_lo = (x_lo.to(gl.float32) * v_lo[:, None]).to(gl.bfloat16)
                x_hi = (x_hi.to(gl.float32) * v_hi[:, None]).to(gl.bfloat16)
            if SCALED_CODES:
                scale = s_ring.index(stage).load(gl.SliceLayout(1, a_t))
                acc_t = _scaled_group_dot_left(acc_t, codes, x_lo, x_hi, scale)
            else:
                scale = s_ring.index(stage).load(gl.SliceLayout(1, mma_t))
                acc_t = _group_dot_left(acc_t, codes, x_lo, x_hi, scale, mma_t)
        else:
            codes = c_ring.index(stage).load(b_op)
            x_lo = x_tile.slice(0, 32, dim=1).load(a_op)
            x_hi = x_tile.slice(32, 32, dim=1).load(a_op)
            if not PRESCALED:  # bf16(x * 1/s), rounded to nearest even as the reference rounds
                v_tile = v_ring.index(stage)
                v_lo = v_tile.slice(0, 32).load(gl.SliceLayout(0, a_op))
                v_hi = v_tile.slice(32, 32).load(gl.SliceLayout(0, a_op))
                x_lo = (x_lo.to(gl.float32) * v_lo[None, :]).to(gl.bfloat16)
                x_hi = (x_hi.to(gl.float32) * v_hi[None, :]).to(gl.bfloat16)
            if SCALED_CODES:
                scale = s_ring.index(stage).load(gl.SliceLayout(0, b_op))
                acc = _scaled_group_dot(acc, codes, x_lo, x_hi, scale)
            else:
                scale = s_ring.index(stage).load(gl.SliceLayout(0, mma))
                acc = _group_dot(acc, codes, x_lo, x_hi, scale, mma)
    async_copy.wait_group(0)
    if CODES_LEFT:
        if STORE:
            n_t = col * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma_t))
            m_t = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma_t))
            offs = (pid_k * M + m_t[None, :]) * N + n_t[:, None]
            gl.store(part + offs, acc_t, mask=(m_t < M)[None, :] & (n_t < N)[:, None])
            acc = gl.permute(acc_t, (1, 0))
        else:
            acc = acc_t
    elif STORE:
        m_c = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
        n_c = col * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
        offs = (pid_k * M + m_c[:, None]) * N + n_c[None, :]
        gl.store(part + offs, acc, mask=(m_c < M)[:, None] & (n_c < N)[None, :])
    return acc


@gluon.jit
def _w4_gluon_async_kernel(
    xs, qweight, wscale, part,
    M, N, KG, stride_xm, stride_qg, stride_wg,
    BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr, WARPS: gl.constexpr, STAGES: gl.constexpr,
    CODES_LEFT: gl.constexpr,
):  # fmt: skip
    """``_w4_gluon_kernel`` with its loads in flight through a ring of ``STAGES`` shared-memory
    slots (``cp.async``, as Marlin-style kernels stream weights): bytes in flight without the
    registers that held them.  ``_column_partials`` with pre-scaled activations (the
    one-launch layer, ``small_m_gluon_layer``, runs the same code per column program)."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[2, 0], warps_per_cta=[1, WARPS], instr_shape=[16, 8]
    )
    a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8)
    b_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8)
    # (wscale stands in for the smoothing factors, which pre-scaled activations leave unread)
    _column_partials(gl.program_id(0), gl.program_id(1), xs, wscale, qweight, wscale, part, M, N, KG, stride_xm,
                     stride_qg, stride_wg, 16, BLOCK_N, SPLIT_K, WARPS, STAGES, True, False, mma, a_op, b_op,
                     CODES_LEFT)  # fmt: skip


def codes_left_fits(block_n: int, warps: int) -> bool:
    """Whether a tile of ``block_n`` columns and ``warps`` warps can take the codes as the dot's
    left operand (``_column_partials``'s ``CODES_LEFT``): each warp owns whole 16-row tiles of
    ``W``, so ``block_n`` is a multiple of ``16 * warps``."""
    return block_n % (16 * warps) == 0


def w4_small_m_partials_gluon(
    xs: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, config: tuple[str, int, int, int, int]
) -> torch.Tensor:
    """fp32 partial products ``[SPLIT_K, M, N]`` of ``xs [M <= 16, KG * 64]`` (bf16, smoothing
    applied) and INT4 ``qweight [KG, N, 32]`` (uint8) with group scales ``wscale [KG, N]``
    (fp32); their sum over the first axis is ``xs @ W.T``.  ``config``: (kind, BLOCK_N,
    SPLIT_K, warps, depth): kind ``"regs"`` (``_w4_gluon_kernel``, depth = groups per step:
    1, 2 or 4), ``"async"`` (``_w4_gluon_async_kernel``, depth = ring slots, at least 2) or
    ``"left"`` (the same with the codes as the dot's left operand, ``_column_partials``'s
    ``CODES_LEFT``; ``BLOCK_N`` a multiple of ``16 * warps``).  GPU only (Gluon has no
    interpreter)."""
    kind, block_n, split_k, warps, depth = config
    m = xs.shape[0]
    kg, n, _ = qweight.shape
    if m > 16:
        raise ValueError(f"the Gluon small-M kernel takes at most 16 rows, got {m}")
    if (kind, depth) not in {("regs", 1), ("regs", 2), ("regs", 4)} and not (
        kind in ("async", "left") and depth >= 2
    ):
        raise ValueError(
            f"kind must be 'regs' (depth 1, 2 or 4) or 'async' / 'left' (depth >= 2), not {kind!r} / {depth}"
        )
    if kind == "left" and not codes_left_fits(block_n, warps):
        raise ValueError(
            f"codes as the left operand need BLOCK_N a multiple of 16 * warps, got {block_n} / {warps}"
        )
    if xs.dtype != torch.bfloat16 or xs.stride(1) != 1 or xs.shape[1] < kg * 64:
        raise ValueError(
            f"xs must be bf16 [M, >= {kg * 64}] with unit column stride, got {xs.dtype} {tuple(xs.shape)}"
        )
    if qweight.dtype != torch.uint8 or qweight.stride()[1:] != (32, 1) or qweight.shape[2] != 32:
        raise ValueError(
            f"qweight must be uint8 [KG, N, 32] with rows contiguous, got {qweight.dtype} {tuple(qweight.shape)}"
        )
    if wscale.dtype != torch.float32 or wscale.shape != (kg, n) or wscale.stride(1) != 1:
        raise ValueError(
            f"wscale must be fp32 [{kg}, {n}] with unit column stride, got {wscale.dtype} {tuple(wscale.shape)}"
        )
    part = torch.empty(split_k, m, n, device=xs.device, dtype=torch.float32)
    grid = (triton.cdiv(n, block_n), split_k)
    args = (xs, qweight, wscale, part, m, n, kg, xs.stride(0), qweight.stride(0), wscale.stride(0))
    if kind == "regs":
        _w4_gluon_kernel[grid](
            *args, BLOCK_N=block_n, SPLIT_K=split_k, K_WIDTH=8, WARPS=warps, STEP=depth, num_warps=warps
        )
    else:
        _w4_gluon_async_kernel[grid](
            *args,
            BLOCK_N=block_n,
            SPLIT_K=split_k,
            WARPS=warps,
            STAGES=depth,
            CODES_LEFT=kind == "left",
            num_warps=warps,
        )
    return part
