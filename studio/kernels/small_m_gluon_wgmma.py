"""Column programs of the Gluon small-M layer at 17-64 rows: codes decoded into shared memory, ``wgmma``.

At 16 rows ``small_m_gluon._column_partials`` feeds both ``mma.sync`` operands from
registers, and each warp loads the whole activation tile.  At 64 rows that costs four
times the ``mma.sync`` issues and four times the shared-memory reads of the activations
per code, and it measured slower than the ``tl`` kernel (``docs/results.md``, seventeenth
session: 17.8-44.1 us against 15.6-29.8 us).  Here one warpgroup (4 warps) per program:

- a ``cp.async`` ring of ``STAGES`` slots brings each group's pre-scaled activations (as two
  ``[64, 32]`` halves, K = 0-31 and 32-63, in ``wgmma``'s swizzled shared layout), packed codes
  and scales;
- the threads decode the group's codes (``small_m_gluon._int4_codes_minus_8``, four bytes
  each), multiply them by the group scale in bf16 (``bf16(code * bf16(scale))``, the
  ``scaled_codes`` rounding of ``reference_small_m``) while the group before is still in the
  tensor cores, then, once it is done, store them in the shared weight tile (one tile, not
  two: at 256 columns two would take 64 KB of shared memory);
- two asynchronous ``wgmma`` (m64 x ``BLOCK_N`` x k16 steps) add the group to the fp32
  accumulator: one issue per warpgroup and per 16 K, the activations read once by the tensor
  cores, not once per warp.

Why not the layer's 16-row column programs with a
``BLOCK_M`` of 64 throughout: ``wgmma`` needs at least 64 rows, which at 16 rows would be
three quarters padding.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

from studio.kernels.small_m_gluon import _int4_codes_minus_8, _ring_step_wait


@gluon.jit
def _issue_group_copies(
    xl_ring, xh_ring, c_ring, s_ring, g, g1, slot, x_ptrs, x_mask, q_ptrs, q_mask, s_ptrs, s_mask, stride_qg,
    stride_wg,
):  # fmt: skip
    """``cp.async`` of group ``g``'s two activation halves, codes and scales into ``slot``
    (nothing past ``g1``); one copy group."""
    live = g < g1
    async_copy.async_copy_global_to_shared(xl_ring.index(slot), x_ptrs + g * 64, mask=x_mask & live)
    async_copy.async_copy_global_to_shared(xh_ring.index(slot), x_ptrs + g * 64 + 32, mask=x_mask & live)
    async_copy.async_copy_global_to_shared(c_ring.index(slot), q_ptrs + g * stride_qg, mask=q_mask & live)
    async_copy.async_copy_global_to_shared(s_ring.index(slot), s_ptrs + g * stride_wg, mask=s_mask & live)
    async_copy.commit_group()


@gluon.jit
def _column_partials_wgmma(
    col, pid_k, xs, qweight, wscale, part, M, N, KG, stride_xm, stride_qg, stride_wg,
    BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    """Column block ``col``'s product over split ``pid_k``'s groups for up to 64 rows of
    pre-scaled activations ``xs``, stored as fp32 partials ``[SPLIT_K, M, N]``; 4 warps."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
    )
    half_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=16, rank=2)
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    x_copy: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
    # 4 consecutive code bytes of one column per thread: one 32-bit register to decode
    dec: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [4, 1], [1, 0])
    s_copy: gl.constexpr = gl.BlockedLayout([4], [32], [4], [0])
    xl_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, 64, 32], half_layout)
    xh_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, 64, 32], half_layout)
    c_ring = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N, 32], flat)
    s_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    w_lo = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_N, 32], half_layout)
    w_hi = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_N, 32], half_layout)

    m_x = gl.arange(0, 64, layout=gl.SliceLayout(1, x_copy))
    k_x = gl.arange(0, 32, layout=gl.SliceLayout(0, x_copy))
    x_ptrs = xs + m_x[:, None] * stride_xm + k_x[None, :]
    x_mask = (m_x < M)[:, None]
    n_q = col * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, dec))
    j_q = gl.arange(0, 32, layout=gl.SliceLayout(0, dec))
    q_ptrs = qweight + n_q[:, None] * 32 + j_q[None, :]
    q_mask = (n_q < N)[:, None]
    n_s = col * BLOCK_N + gl.arange(0, BLOCK_N, layout=s_copy)
    s_ptrs = wscale + n_s
    s_mask = n_s < N

    per_split = gl.cdiv(KG, SPLIT_K)
    g0 = pid_k * per_split
    g1 = gl.minimum(g0 + per_split, KG)
    for s in gl.static_range(STAGES - 1):
        _issue_group_copies(xl_ring, xh_ring, c_ring, s_ring, g0 + s, g1, s, x_ptrs, x_mask, q_ptrs, q_mask,
                            s_ptrs, s_mask, stride_qg, stride_wg)  # fmt: skip
    # (an accumulator token from the start: the loop carries the asynchronous dots' result)
    acc = warpgroup_mma_init(gl.zeros([64, BLOCK_N], gl.float32, acc_layout))
    for g in range(g0, g1):
        i = g - g0
        stage = i % STAGES
        _ring_step_wait(STAGES)
        lo, hi = _int4_codes_minus_8(c_ring.index(stage).load(dec))
        scale = s_ring.index(stage).load(gl.SliceLayout(1, dec)).to(gl.bfloat16)[:, None]
        lo = lo * scale
        hi = hi * scale
        # decoded while the group before is in the tensor cores; once it is done, its slot may
        # be refilled and the weight tile rewritten
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        _issue_group_copies(xl_ring, xh_ring, c_ring, s_ring, g + STAGES - 1, g1, (i + STAGES - 1) % STAGES,
                            x_ptrs, x_mask, q_ptrs, q_mask, s_ptrs, s_mask, stride_qg, stride_wg)  # fmt: skip
        w_lo.store(lo)
        w_hi.store(hi)
        fence_async_shared()
        gl.thread_barrier()
        acc = warpgroup_mma(xl_ring.index(stage), w_lo.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(xh_ring.index(stage), w_hi.permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    async_copy.wait_group(0)
    m_c = gl.arange(0, 64, layout=gl.SliceLayout(1, acc_layout))
    n_c = col * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
    offs = (pid_k * M + m_c[:, None]) * N + n_c[None, :]
    gl.store(part + offs, acc, mask=(m_c < M)[:, None] & (n_c < N)[None, :])
