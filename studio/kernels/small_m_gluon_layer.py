"""The whole small-M INT4 layer in one Gluon launch: product, branch, bias (up to 64 rows).

``small_m_gluon`` streams the 4-bit weights near the read floor but computes the product
alone; composed with the scaling kernel and the epilogue kernel it took three launches and
5-7 us more (``docs/results.md``, fifteenth session).  This kernel is the ``tl`` one-launch
scheme (``small_m_triton._w4_small_m_kernel``) on top of that product:

- one grid axis, ``N_LA * SLICE_SPLIT`` branch-slice programs first, then ``n_blocks *
  SPLIT_K`` column programs;
- a column program streams its run of groups through a ``cp.async`` ring of ``STAGES``
  slots (codes, activations, group scales and, unless ``PRESCALED``, the smoothing factors),
  scales the raw bf16 activations by ``1/s`` as they leave shared memory (``bf16(x * 1/s)``,
  the rounding of ``reference_small_m``), decodes the codes in the ``mma.sync`` operand's own
  layout (``small_m_gluon._int4_codes_minus_8``) and sums each group's dot times its scale in
  fp32: exact codes, ``reference_small_m`` with ``scaled_codes=False``;
- a branch-slice program computes 32 ranks of ``bf16(x) @ l1`` over half a column program's
  run of K (``SLICE_SPLIT = 2 * SPLIT_K``, so that slices are done first: the kernel's
  docstring says why), its ``l1`` through a ring of its own;
- both write fp32 partials, then count themselves in their column blocks' counters (a slice
  in every block); the program whose arrival completes a block (``_finish_block``) adds the
  block's partials in split order, the branch ``bf16(bf16(x @ l1) * strength) @ l2`` and the
  bias, writes the output and zeroes the counter (``split_k_scratch``).  No atomics touch
  the sums, so results are identical run to run.

``PRESCALED``: the activations come scaled and padded from ``small_m_triton``'s scaling
kernel (one launch more) instead of being scaled in the column programs: measured faster on
three of the four FLUX shapes (``GLUON_TILES``), slower on 3072x3072.  The layer is then
launched by programmatic dependent launch (``GRID_DEP_WAIT``, ``DEFAULT_DEPENDENT_LAUNCH``):
its programs start while the scaling kernel runs, and the column programs wait for it only
before their first activation copies (their first codes are already in flight).
``CODES_LEFT`` (``DEFAULT_CODES_LEFT``): the column programs compute ``W @ x.T``, the decoded
codes as ``mma.sync``'s left operand (``small_m_gluon._column_partials``).  Requirements
(``gluon_layer_misfit``): INT4, 1-64 rows of bf16 activations, K a multiple of 64 and the
branch's rank a multiple of 16 (the ``cp.async`` copies move 16 bytes and are masked by
whole rows only), contiguous rows everywhere.

Above 16 rows (``BLOCK_M`` 32 or 64; ``w4_linear`` does not route them here, see
``GLUON_ROUTED_ROWS``): each warp's ``mma.sync`` tiles repeat down the rows, codes may be
scaled before the dot (``SCALED_CODES``, ``reference_small_m``'s default rounding; the
default above 16 rows), and from 33 rows the column programs may be
``small_m_gluon_wgmma``'s (``WGMMA``, the default there).  The finish works 16 rows at a time.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from studio.kernels.flagged_partials import _flagged_sum, _store_flagged, flagged_scratch, one_wave_registers
from studio.kernels.small_m_gluon import _column_partials, _ring_step_wait, codes_left_fits
from studio.kernels.small_m_gluon_wgmma import _column_partials_wgmma
from studio.kernels.split_k_scratch import zeroed_scratch

#: Ranks per branch-slice program and per step of the finishing branch dot.
LA_RANKS = 32

#: Rows per step of the finish (``_finish_block``): one ``mma.sync`` tile.
FINISH_ROWS = gl.constexpr(16)

#: Rows the kernel takes: up to four ``mma.sync`` tiles of 16 (``BLOCK_M`` 16, 32 or 64).
GLUON_MAX_ROWS = 64


def block_rows(m: int) -> int:
    """``BLOCK_M`` for ``m`` rows: 16, 32 or 64 (``gl.arange`` takes powers of two)."""
    return 16 if m <= 16 else 32 if m <= 32 else 64


#: How a column block is finished where ``GLUON_TILES`` says nothing (``w4_linear_small_m_gluon``'s
#: ``finish``): measured faster than ``"count"`` at 16 rows on H100 (by a median of 0.5-0.8 us per
#: shape over every tile after a memset, eighteenth session); at 17-64 rows, which ``w4_linear``
#: does not route here, not timed.
DEFAULT_FINISH = "await"

#: The finishes ``w4_linear_small_m_gluon`` takes: ``"await"`` and ``"count"`` (counters,
#: ``_w4_gluon_layer_kernel``) and ``"flag"`` (flagged words, ``flagged_partials``; 16 rows).
FINISHES = ("await", "count", "flag")

#: Whether the ``mma.sync`` column programs take the codes as the dot's left operand
#: (``_column_partials``'s ``CODES_LEFT``; ``w4_linear_small_m_gluon``'s ``codes_left``).
DEFAULT_CODES_LEFT = True

#: Whether the layer launches after the scaling pre-kernel with programmatic dependent launch
#: (``w4_linear_small_m_gluon``'s ``dependent_launch``; sm_90): its programs start while the
#: pre-kernel runs, and only the column programs' first activation copies wait for it.
DEFAULT_DEPENDENT_LAUNCH = True


#: (BLOCK_M, K groups of 64, N) -> (BLOCK_N, SPLIT_K, warps, stages, prescale, finish): the
#: tile measured best on H100, rank 32 (``bench/diag_small_m_gluon_layer.py``; 16 rows:
#: nineteenth session, call 5, codes as the left operand, the pre-kernel launched before the
#: layer with dependent launch; the lowest mean of time / best time over its two timings);
#: other shapes take ``default_tile``.
GLUON_TILES: dict[tuple[int, int, int], tuple[int, int, int, int, bool, str]] = {
    (16, 48, 3072): (64, 8, 4, 3, False, "await"),
    (16, 48, 9216): (128, 4, 4, 3, True, "await"),
    (16, 48, 12288): (128, 4, 4, 3, True, "await"),
    (16, 192, 3072): (128, 8, 4, 4, True, "await"),
}


@gluon.jit
def _slice_sum(
    la_idx, pid_k, x, l1, M, KG, R, stride_xm, stride_l1k,
    BLOCK_M: gl.constexpr, SPLIT_K: gl.constexpr, WARPS: gl.constexpr, STAGES: gl.constexpr,
    LA_R: gl.constexpr, mma: gl.constexpr, a_op: gl.constexpr, b_op: gl.constexpr,
):  # fmt: skip
    """Ranks ``la_idx * LA_R ..`` of ``bf16(x) @ l1`` over split ``pid_k``'s groups: fp32
    ``[BLOCK_M, LA_R]`` in the ``mma`` layout."""
    x_copy: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
    l_copy: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [WARPS, 1], [1, 0])
    x_ring = gl.allocate_shared_memory(
        gl.bfloat16, [STAGES, BLOCK_M, 64], gl.SwizzledSharedLayout(8, 1, 8, [1, 0])
    )
    l_ring = gl.allocate_shared_memory(
        gl.bfloat16, [STAGES, 64, LA_R], gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    )
    m_x = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_copy))
    k_x = gl.arange(0, 64, layout=gl.SliceLayout(0, x_copy))
    x_ptrs = x + m_x[:, None] * stride_xm + k_x[None, :]
    x_mask = (m_x < M)[:, None]
    k_l = gl.arange(0, 64, layout=gl.SliceLayout(1, l_copy))
    r_l = la_idx * LA_R + gl.arange(0, LA_R, layout=gl.SliceLayout(0, l_copy))
    l_ptrs = l1 + k_l[:, None] * stride_l1k + r_l[None, :]
    l_mask = (r_l < R)[None, :]

    per_split = gl.cdiv(KG, SPLIT_K)
    g0 = pid_k * per_split
    g1 = gl.minimum(g0 + per_split, KG)
    for s in gl.static_range(STAGES - 1):
        live = g0 + s < g1
        async_copy.async_copy_global_to_shared(x_ring.index(s), x_ptrs + (g0 + s) * 64, mask=x_mask & live)
        async_copy.async_copy_global_to_shared(
            l_ring.index(s), l_ptrs + (g0 + s) * 64 * stride_l1k, mask=l_mask & live
        )
        async_copy.commit_group()
    la = gl.zeros([BLOCK_M, LA_R], gl.float32, mma)
    for g in range(g0, g1):
        i = g - g0
        _ring_step_wait(STAGES)
        nxt = g + STAGES - 1
        live = nxt < g1
        slot = (i + STAGES - 1) % STAGES
        async_copy.async_copy_global_to_shared(x_ring.index(slot), x_ptrs + nxt * 64, mask=x_mask & live)
        async_copy.async_copy_global_to_shared(
            l_ring.index(slot), l_ptrs + nxt * 64 * stride_l1k, mask=l_mask & live
        )
        async_copy.commit_group()
        stage = i % STAGES
        x_tile = x_ring.index(stage)
        l_tile = l_ring.index(stage)
        la = mma_v2(x_tile.slice(0, 32, dim=1).load(a_op), l_tile.slice(0, 32, dim=0).load(b_op), la)
        la = mma_v2(x_tile.slice(32, 32, dim=1).load(a_op), l_tile.slice(32, 32, dim=0).load(b_op), la)
    async_copy.wait_group(0)
    return la


@gluon.jit
def _slice_partials(
    la_idx, pid_k, x, l1, la_part, M, KG, R, stride_xm, stride_l1k,
    BLOCK_M: gl.constexpr, SPLIT_K: gl.constexpr, WARPS: gl.constexpr, STAGES: gl.constexpr,
    LA_R: gl.constexpr, mma: gl.constexpr, a_op: gl.constexpr, b_op: gl.constexpr,
):  # fmt: skip
    """``_slice_sum`` stored as fp32 partials ``[SPLIT_K, M, R]``."""
    la = _slice_sum(la_idx, pid_k, x, l1, M, KG, R, stride_xm, stride_l1k, BLOCK_M, SPLIT_K, WARPS, STAGES, LA_R,
                    mma, a_op, b_op)  # fmt: skip
    m_c = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
    r_c = la_idx * LA_R + gl.arange(0, LA_R, layout=gl.SliceLayout(0, mma))
    offs = (pid_k * M + m_c[:, None]) * R + r_c[None, :]
    gl.store(la_part + offs, la, mask=(m_c < M)[:, None] & (r_c < R)[None, :])


@gluon.jit
def _reduce_slices(
    la_idx, la_part, M, R, SLICE_SPLIT: gl.constexpr, LA_R: gl.constexpr, WARPS: gl.constexpr, la_words=None,
    flag=0,
):  # fmt: skip
    """Ranks ``la_idx * LA_R ..`` of ``x @ l1``: the slices' partials summed in split order and
    rounded to bf16 (``reference_small_m``'s first rounding), stored as fp32 after the
    partials (split ``SLICE_SPLIT`` of ``la_part``), so that a finish reads them as one split;
    ``la_words``: stored there instead as flagged words ``[16, R]`` with ``flag``
    (``flagged_partials``; at most 16 rows, and all 16 written)."""
    flat: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [WARPS, 1], [1, 0])
    r_f = la_idx * LA_R + gl.arange(0, LA_R, layout=gl.SliceLayout(0, flat))
    for m0 in range(0, M, FINISH_ROWS):
        m_f = m0 + gl.arange(0, FINISH_ROWS, layout=gl.SliceLayout(1, flat))
        offs = m_f[:, None] * R + r_f[None, :]
        f_mask = (m_f < M)[:, None] & (r_f < R)[None, :]
        la = _sum_splits(la_part, offs, f_mask, M * R, SLICE_SPLIT, flat).to(gl.bfloat16).to(gl.float32)
        if la_words is None:
            gl.store(la_part + SLICE_SPLIT * M * R + offs, la, mask=f_mask)
        else:
            _store_flagged(la_words + offs, la, (m_f < FINISH_ROWS)[:, None] & (r_f < R)[None, :], flag)


@gluon.jit
def _now():
    """The GPU's nanosecond clock (``%globaltimer``), for the ``times`` stamps."""
    return gl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False, pack=1
    )


@gluon.jit
def _sum_splits(base, offs, mask, split_stride, SPLITS: gl.constexpr, layout: gl.constexpr):
    """Sum over splits of fp32 partials at ``base + offs`` (split ``s`` at ``s * split_stride``),
    in split order, read at L2 (other programs wrote them).  Unrolled, so that every load can
    be in flight at once: one L2 round trip, not one per split."""
    total = gl.zeros(offs.shape, gl.float32, layout)
    for s in gl.static_range(SPLITS):
        total += gl.load(base + s * split_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return total


#: How long an awaiting finish waits for its count (ns) before it gives up and writes NaN
#: over its block: only a launch whose programs do not all run (which the grid order rules
#: out: the programs it waits for come before it) would wait that long.
AWAIT_LIMIT_NS = gl.constexpr(1_000_000_000)


@gluon.jit
def _await_count(counter, target):
    """Whether ``counter`` reached ``target`` (read with acquire, again until it does or
    ``AWAIT_LIMIT_NS`` pass)."""
    start = _now()
    seen = gl.atomic_add(counter, 0, sem="acquire")
    while (seen < target) & (_now() - start < AWAIT_LIMIT_NS):
        seen = gl.atomic_add(counter, 0, sem="acquire")
    return seen >= target


@gluon.jit
def _branch_weights(
    r0, m0, col, strength, l2, M, N, R, S, rows_per_sample, stride_sm, stride_l2n,
    BLOCK_N: gl.constexpr, LA_R: gl.constexpr, WARPS: gl.constexpr, b_op: gl.constexpr,
):  # fmt: skip
    """Ranks ``r0 .. r0 + LA_R`` of the strengths of rows ``m0 ..`` ``[16, LA_R]`` (four values
    a thread) and of ``l2`` transposed ``[LA_R, BLOCK_N]`` of block ``col`` (``mma.sync``
    operand): what the finish reads that no program of the launch writes."""
    flat: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [WARPS, 1], [1, 0])
    m_f = m0 + gl.arange(0, FINISH_ROWS, layout=gl.SliceLayout(1, flat))
    r_f = r0 + gl.arange(0, LA_R, layout=gl.SliceLayout(0, flat))
    srow = (m_f // rows_per_sample) % S
    f_mask = (m_f < M)[:, None] & (r_f < R)[None, :]
    st = gl.load(strength + srow[:, None] * stride_sm + r_f[None, :], mask=f_mask, other=0.0)
    r_b = r0 + gl.arange(0, LA_R, layout=gl.SliceLayout(1, b_op))
    n_b = col * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, b_op))
    l2t = gl.load(
        l2 + n_b[None, :] * stride_l2n + r_b[:, None], mask=(r_b < R)[:, None] & (n_b < N)[None, :], other=0.0
    )
    return st, l2t


@gluon.jit
def _branch_input(
    r0, m0, la_part, st, M, R, SLICE_SPLIT: gl.constexpr, LA_R: gl.constexpr, WARPS: gl.constexpr,
    a_op: gl.constexpr,
):  # fmt: skip
    """Ranks ``r0 .. r0 + LA_R`` of the branch input as the ``mma.sync`` operand: ``bf16(bf16(x @
    l1) * strength)`` ``[16, LA_R]`` of rows ``m0 ..`` (the slices' partials in split order,
    the strengths ``st`` of ``_branch_weights``: ``reference_small_m``'s roundings).

    The partials are read in a layout that spreads the tile over the threads (four values
    each, one 16-byte load per split) and only the result goes to the operand's layout: read
    in that layout itself, every warp loaded the whole tile, 16 values per thread per split,
    more loads than the registers keep in flight, and the finish took several round trips."""
    flat: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [WARPS, 1], [1, 0])
    m_f = m0 + gl.arange(0, FINISH_ROWS, layout=gl.SliceLayout(1, flat))
    r_f = r0 + gl.arange(0, LA_R, layout=gl.SliceLayout(0, flat))
    f_mask = (m_f < M)[:, None] & (r_f < R)[None, :]
    la = _sum_splits(la_part, m_f[:, None] * R + r_f[None, :], f_mask, M * R, SLICE_SPLIT, flat)
    la = (la.to(gl.bfloat16).to(gl.float32) * st).to(gl.bfloat16)
    return gl.convert_layout(la, a_op)


@gluon.jit
def _finish_rows(
    m0, col, part, la_part, strength, l2, bias, out, M, N, R, S, rows_per_sample, stride_sm, stride_l2n,
    stride_om, BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr, SLICE_SPLIT: gl.constexpr, LA_R: gl.constexpr,
    WARPS: gl.constexpr, OUT_TPW_N: gl.constexpr, HAS_BRANCH: gl.constexpr, HAS_BIAS: gl.constexpr,
    ready, mma: gl.constexpr, a_op: gl.constexpr, b_op: gl.constexpr, own=None, counter=None, target=0,
):  # fmt: skip
    """Rows ``m0 .. m0 + 16`` of output block ``col``: its splits' partials in split order,
    plus the branch, plus the bias (``reference_small_m``'s order); NaN unless ``ready`` (an
    awaiting finish that gave up: ``_await_count``).  ``own``: the last split's partials as
    the finishing program holds them (``mma`` layout; its stored copy is not read again).
    ``counter``: wait for it to reach ``target`` first (``_await_count``), with the bias, the
    strengths and ``l2`` already on their way (nothing in the launch writes them).

    The bias, the first rank chunk's operands and every partial are loaded before any of
    them is used, in layouts of four values per thread (16-byte loads), so that the block
    waits about one L2 round trip, not one per step: the program finishing a block runs
    after every other of its block, while the rest of the launch still streams weights (an
    L2 round trip then took about 1 us on H100: ``bench/diag_small_m_gluon_parts.py``'s timeline)."""
    flat: gl.constexpr = gl.BlockedLayout([1, 4], [32 // OUT_TPW_N, OUT_TPW_N], [WARPS, 1], [1, 0])
    m_c = m0 + gl.arange(0, FINISH_ROWS, layout=gl.SliceLayout(1, flat))
    n_c = col * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, flat))
    mask = (m_c < M)[:, None] & (n_c < N)[None, :]
    if HAS_BIAS:
        b = gl.load(bias + n_c, mask=n_c < N, other=0.0)
    if HAS_BRANCH:
        st, l2t = _branch_weights(0, m0, col, strength, l2, M, N, R, S, rows_per_sample, stride_sm, stride_l2n,
                                  BLOCK_N, LA_R, WARPS, b_op)  # fmt: skip
    if counter is not None:
        ready = _await_count(counter, target)
    if HAS_BRANCH:
        la = _branch_input(0, m0, la_part, st, M, R, SLICE_SPLIT, LA_R, WARPS, a_op)
    if own is None:
        acc = _sum_splits(part, m_c[:, None] * N + n_c[None, :], mask, M * N, SPLIT_K, flat)
    else:
        acc = _sum_splits(part, m_c[:, None] * N + n_c[None, :], mask, M * N, SPLIT_K - 1, flat)
        acc += gl.convert_layout(own, flat)
    acc = gl.where(ready, acc, float("nan"))
    if HAS_BRANCH:
        branch = mma_v2(la, l2t, gl.zeros([FINISH_ROWS, BLOCK_N], gl.float32, mma))
        for r0 in range(LA_R, R, LA_R):
            st, l2t = _branch_weights(r0, m0, col, strength, l2, M, N, R, S, rows_per_sample, stride_sm,
                                      stride_l2n, BLOCK_N, LA_R, WARPS, b_op)  # fmt: skip
            la = _branch_input(r0, m0, la_part, st, M, R, SLICE_SPLIT, LA_R, WARPS, a_op)
            branch = mma_v2(la, l2t, branch)
        acc += gl.convert_layout(branch, flat)
    if HAS_BIAS:
        acc += b[None, :]
    gl.store(out + m_c[:, None] * stride_om + n_c[None, :], acc.to(out.dtype.element_ty), mask=mask)


@gluon.jit
def _finish_block(
    col, cnt, part, la_part, strength, l2, bias, out, M, N, R, S, rows_per_sample, stride_sm, stride_l2n,
    stride_om, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr, SLICE_SPLIT: gl.constexpr,
    LA_R: gl.constexpr, WARPS: gl.constexpr, OUT_TPW_N: gl.constexpr, HAS_BRANCH: gl.constexpr,
    HAS_BIAS: gl.constexpr, mma: gl.constexpr, a_op: gl.constexpr, b_op: gl.constexpr, own=None,
    counter=None, target=0,
):  # fmt: skip
    """Output block ``col``, ``FINISH_ROWS`` rows at a time (``_finish_rows``; rows past M
    skipped); then its counter back to zero for the next launch (a plain store: every
    arrival is in).  Chunks of 16 rows keep the partials the finish holds at once to what
    the 16-row layer holds: at 64 rows and 128 columns, whole-block sums spilled registers.
    ``counter``: wait for it to reach ``target`` first (at 16 rows inside ``_finish_rows``, its
    first loads in flight); ``own``: at 16 rows, ``_finish_rows``'s."""
    if BLOCK_M == FINISH_ROWS:  # straight-line, as the 16-row layer was measured (no loop around it)
        _finish_rows(0, col, part, la_part, strength, l2, bias, out, M, N, R, S, rows_per_sample, stride_sm,
                     stride_l2n, stride_om, BLOCK_N, SPLIT_K, SLICE_SPLIT, LA_R, WARPS, OUT_TPW_N, HAS_BRANCH,
                     HAS_BIAS, True, mma, a_op, b_op, own, counter, target)  # fmt: skip
    else:
        ready = True
        if counter is not None:
            ready = _await_count(counter, target)
        for m0 in range(0, M, FINISH_ROWS):  # (a loop, not unrolled: no chunk's loads hoisted into another's)
            _finish_rows(m0, col, part, la_part, strength, l2, bias, out, M, N, R, S, rows_per_sample, stride_sm,
                         stride_l2n, stride_om, BLOCK_N, SPLIT_K, SLICE_SPLIT, LA_R, WARPS, OUT_TPW_N, HAS_BRANCH,
                         HAS_BIAS, ready, mma, a_op, b_op)  # fmt: skip
    gl.store(cnt + col, 0)


@gluon.jit
def _block_words(words, col, SPLIT_K: gl.constexpr, BLOCK_N: gl.constexpr):
    """The first flagged word of column block ``col``: its other splits' partials lie together,
    split ``s``, row ``m``, column ``n`` of the block at ``(s * 16 + m) * BLOCK_N + n`` from
    here (strides known when compiled, so the finish's reads of every split share one address)."""
    return words + col * ((SPLIT_K - 1) * FINISH_ROWS * BLOCK_N)


@gluon.jit
def _branch_words(words, N, SPLIT_K: gl.constexpr, BLOCK_N: gl.constexpr):
    """The flagged words of the reduced branch input ``[16, R]``, after every block's."""
    return _block_words(words, gl.cdiv(N, BLOCK_N), SPLIT_K, BLOCK_N)


@gluon.jit
def _store_split_flagged(
    words, own, col, pid_k, N, flag, BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr, WARPS: gl.constexpr,
    OUT_TPW_N: gl.constexpr,
):  # fmt: skip
    """Split ``pid_k``'s partials ``own`` (``[16, BLOCK_N]``) of block ``col`` as flagged words
    (``_block_words``), in the layout the finish reads; all 16 rows, past M too
    (``flagged_partials``: every launch writes every word that a launch reads)."""
    flat: gl.constexpr = gl.BlockedLayout([1, 4], [32 // OUT_TPW_N, OUT_TPW_N], [WARPS, 1], [1, 0])
    m_c = gl.arange(0, FINISH_ROWS, layout=gl.SliceLayout(1, flat))
    n_l = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, flat))
    ptrs = (
        _block_words(words, col, SPLIT_K, BLOCK_N)
        + (pid_k * FINISH_ROWS + m_c[:, None]) * BLOCK_N
        + n_l[None, :]
    )
    mask = (m_c < FINISH_ROWS)[:, None] & (col * BLOCK_N + n_l < N)[None, :]
    _store_flagged(ptrs, gl.convert_layout(own, flat), mask, flag)


@gluon.jit
def _fence_acquire():
    """``fence.acq_rel.gpu`` before a read of flagged words.  The writers release nothing, so
    the memory model promises no more with it than without; measured, it let the finisher see
    words already written sooner (median 7.4 against 10.8 us on 3072x3072, docs/results.md)."""
    gl.inline_asm_elementwise("fence.acq_rel.gpu; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _await_flagged(base, offs, mask, flag, layout: gl.constexpr, start):
    """One split of flagged words, read until every parity bit is ``flag``'s or ``AWAIT_LIMIT_NS``
    from ``start`` pass: (values, whether they all arrived)."""
    vals, arrived = _flagged_sum(base, offs, mask, 0, 1, flag, layout)
    while (arrived == 0) & (_now() - start < AWAIT_LIMIT_NS):
        vals, arrived = _flagged_sum(base, offs, mask, 0, 1, flag, layout)
    return vals, arrived


@gluon.jit
def _finish_flagged(
    col, own, words, epochs, flag, strength, l2, bias, out, M, N, R, S, rows_per_sample, stride_sm, stride_l2n,
    stride_om, BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr, LA_R: gl.constexpr, WARPS: gl.constexpr,
    OUT_TPW_N: gl.constexpr, HAS_BRANCH: gl.constexpr, HAS_BIAS: gl.constexpr, mma: gl.constexpr,
    a_op: gl.constexpr, b_op: gl.constexpr, stamp=None,
):  # fmt: skip
    """16-row output block ``col`` as ``_finish_rows`` makes it, from flagged words
    (``flagged_partials``): the other splits' partials (``_store_split_flagged``) and the
    reduced branch input ``[16, R]`` (``_reduce_slices``) are read again, each time after an
    acquire fence, until their parity bits are ``flag``'s (NaN over the block if that takes
    ``AWAIT_LIMIT_NS``).  No counter: the first read of the partials and of the first rank
    chunk, issued together, is also the read of the data.  ``own``: this program's split, ``[16, BLOCK_N]``.  Then the block's epoch
    moves on to ``flag``.  ``stamp``: where to write ``%globaltimer`` once the inputs are in."""
    flat: gl.constexpr = gl.BlockedLayout([1, 4], [32 // OUT_TPW_N, OUT_TPW_N], [WARPS, 1], [1, 0])
    la_flat: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [WARPS, 1], [1, 0])
    LA_SPLITS: gl.constexpr = 1 if HAS_BRANCH else 0
    m_c = gl.arange(0, FINISH_ROWS, layout=gl.SliceLayout(1, flat))
    n_l = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, flat))
    n_c = col * BLOCK_N + n_l
    mask = (m_c < M)[:, None] & (n_c < N)[None, :]
    blk = _block_words(words, col, SPLIT_K, BLOCK_N)
    offs = m_c[:, None] * BLOCK_N + n_l[None, :]
    la_words = _branch_words(words, N, SPLIT_K, BLOCK_N)
    m_l = gl.arange(0, FINISH_ROWS, layout=gl.SliceLayout(1, la_flat))
    r_l = gl.arange(0, LA_R, layout=gl.SliceLayout(0, la_flat))
    la_offs = m_l[:, None] * R + r_l[None, :]
    la_mask = (m_l < M)[:, None] & (r_l < R)[None, :]
    if HAS_BIAS:
        b = gl.load(bias + n_c, mask=n_c < N, other=0.0)
    if HAS_BRANCH:
        st, l2t = _branch_weights(0, 0, col, strength, l2, M, N, R, S, rows_per_sample, stride_sm, stride_l2n,
                                  BLOCK_N, LA_R, WARPS, b_op)  # fmt: skip
    start = _now()
    _fence_acquire()
    acc, arrived = _flagged_sum(blk, offs, mask, FINISH_ROWS * BLOCK_N, SPLIT_K - 1, flag, flat)
    la, la_arrived = _flagged_sum(la_words, la_offs, la_mask, 0, LA_SPLITS, flag, la_flat)
    ready = arrived & la_arrived
    while (ready == 0) & (_now() - start < AWAIT_LIMIT_NS):
        _fence_acquire()
        acc, arrived = _flagged_sum(blk, offs, mask, FINISH_ROWS * BLOCK_N, SPLIT_K - 1, flag, flat)
        la, la_arrived = _flagged_sum(la_words, la_offs, la_mask, 0, LA_SPLITS, flag, la_flat)
        ready = arrived & la_arrived
    if stamp is not None:
        gl.store(stamp, _now())
    acc += gl.convert_layout(own, flat)
    if HAS_BRANCH:
        la = (la.to(gl.bfloat16).to(gl.float32) * st).to(gl.bfloat16)
        branch = mma_v2(gl.convert_layout(la, a_op), l2t, gl.zeros([FINISH_ROWS, BLOCK_N], gl.float32, mma))
        for r0 in range(LA_R, R, LA_R):
            st, l2t = _branch_weights(r0, 0, col, strength, l2, M, N, R, S, rows_per_sample, stride_sm,
                                      stride_l2n, BLOCK_N, LA_R, WARPS, b_op)  # fmt: skip
            la, la_arrived = _await_flagged(la_words + r0, la_offs, la_mask & (r0 + r_l < R)[None, :], flag,
                                            la_flat, start)  # fmt: skip
            ready = ready & la_arrived
            la = (la.to(gl.bfloat16).to(gl.float32) * st).to(gl.bfloat16)
            branch = mma_v2(gl.convert_layout(la, a_op), l2t, branch)
        acc += gl.convert_layout(branch, flat)
    if HAS_BIAS:
        acc += b[None, :]
    acc = gl.where(ready, acc, float("nan"))
    gl.store(out + m_c[:, None] * stride_om + n_c[None, :], acc.to(out.dtype.element_ty), mask=mask)
    gl.store(epochs + col, flag)


@gluon.jit
def _w4_gluon_layer_kernel(
    x, xs, sinv, qweight, wscale, l1, part, la_part, cnt, l2, strength, bias, out,
    M, N, KG, R, N_LA, S, rows_per_sample,
    stride_xm, stride_xsm, stride_qg, stride_wg, stride_l1k, stride_l2n, stride_sm, stride_om,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr, SLICE_SPLIT: gl.constexpr,
    WARPS: gl.constexpr, STAGES: gl.constexpr, SCALED_CODES: gl.constexpr, WGMMA: gl.constexpr,
    PRESCALED: gl.constexpr, HAS_BRANCH: gl.constexpr, HAS_BIAS: gl.constexpr, LA_R: gl.constexpr,
    OUT_TPW_N: gl.constexpr, SLICES_FIRST: gl.constexpr, AWAIT_SPLITS: gl.constexpr, times=None,
    TIMES: gl.constexpr = False, CODES_LEFT: gl.constexpr = False,
    GRID_DEP_WAIT: gl.constexpr = False, FLAGGED: gl.constexpr = False, words=None, epochs=None,
):  # fmt: skip
    """Grid ``(N_LA * SLICE_SPLIT + n_blocks * SPLIT_K,)``; ``cnt[col]`` counts the arrivals
    at column block ``col``: its ``SPLIT_K`` column programs and every slice (with
    ``AWAIT_SPLITS``: all but the last column program, and every rank chunk).

    ``AWAIT_SPLITS``: the block's last column program in the grid (split ``SPLIT_K - 1``)
    finishes it, once the other column programs and every rank chunk are counted
    (``_await_count``); it does not count itself.  Between its last product and the finish
    that is two L2 round trips (the count's read, the partials' reads), where a finish by the
    arrival that completes a block has three (its release, its atomic, the reads).  The slice
    that completes a rank chunk (counted in ``cnt[n_blocks + chunk]``) sums the chunk's
    partials once (``_reduce_slices``) and then counts the chunk in every block, so that each
    finish reads one split of the branch input, not ``SLICE_SPLIT`` (the finish's reads are
    most of its time).  The programs a finish waits for come before it in the grid, so they
    were scheduled first; ``SLICES_FIRST`` is required.

    ``FLAGGED`` (with ``AWAIT_SPLITS``, 16 rows, ``mma.sync`` column programs): the column
    programs store their partials and the rank chunks' reducers the branch input as flagged
    words (``flagged_partials``: ``words``, and ``epochs``, whose ``epochs[col] + 1`` is this
    launch's flag), and count nothing in the blocks; the finish reads the words until their
    parity bits are this launch's (``_finish_flagged``).

    Otherwise whichever arrival completes a block finishes it.  The branch slices come first in the
    grid (``SLICES_FIRST``) and each takes half a column program's run of K (``SLICE_SPLIT =
    2 * SPLIT_K``), so that their counts are in before the column programs end and a column
    program finishes each block, in parallel.  A slice that completes blocks finishes them
    one after another: where slices came last at every block (they ran as long as the column
    programs, or a slice first reduced its chunk's partials: two more L2 round trips, at
    about 1 us each while the launch streams weights) the launch took 5-25x its time
    (H100).  ``SLICES_FIRST=False`` (the tests) puts them last on purpose, to run that path.
    """
    pid = gl.program_id(0)
    if TIMES:
        gl.store(times + pid * 4, _now())
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[2, 0], warps_per_cta=[1, WARPS], instr_shape=[16, 8]
    )
    a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8)
    b_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8)
    n_blocks = gl.cdiv(N, BLOCK_N)
    n_slices = N_LA * SLICE_SPLIT
    target = SPLIT_K + n_slices  # arrivals that complete a column block
    first_col = n_slices if SLICES_FIRST else 0
    first_slice = 0 if SLICES_FIRST else n_blocks * SPLIT_K
    if (pid >= first_col) & (pid < first_col + n_blocks * SPLIT_K):
        col = (pid - first_col) % n_blocks
        pid_k = (pid - first_col) // n_blocks
        if FLAGGED:  # (this launch's flag: read now, used after the product)
            flag = gl.load(epochs + col, volatile=True) + 1
        if WGMMA:
            own = None
            _column_partials_wgmma(col, pid_k, xs, qweight, wscale, part, M, N, KG, stride_xsm, stride_qg,
                                   stride_wg, BLOCK_N, SPLIT_K, STAGES)  # fmt: skip
        else:  # (``own``: this program's partials, which its own finish takes from registers at 16 rows)
            own = _column_partials(col, pid_k, xs, sinv, qweight, wscale, part, M, N, KG, stride_xsm, stride_qg,
                                   stride_wg, BLOCK_M, BLOCK_N, SPLIT_K, WARPS, STAGES, PRESCALED, SCALED_CODES,
                                   mma, a_op, b_op, CODES_LEFT, GRID_DEP_WAIT, not FLAGGED)  # fmt: skip
        if not FLAGGED:
            gl.thread_barrier()  # every thread's partials are written before the release below
        if TIMES:
            gl.store(times + pid * 4 + 1, _now())
        if FLAGGED:
            if CODES_LEFT:  # (held transposed when not stored: ``_column_partials``)
                own = gl.permute(own, (1, 0))
            if pid_k < SPLIT_K - 1:
                _store_split_flagged(words, own, col, pid_k, N, flag, BLOCK_N, SPLIT_K, WARPS, OUT_TPW_N)
            else:
                _finish_flagged(col, own, words, epochs, flag, strength, l2, bias, out, M, N, R, S, rows_per_sample,
                                stride_sm, stride_l2n, stride_om, BLOCK_N, SPLIT_K, LA_R, WARPS, OUT_TPW_N,
                                HAS_BRANCH, HAS_BIAS, mma, a_op, b_op,
                                times + pid * 4 + 2 if TIMES else None)  # fmt: skip
        elif AWAIT_SPLITS:
            if pid_k < SPLIT_K - 1:
                gl.atomic_add(cnt + col, 1, sem="release")
            else:  # (the branch input comes reduced: one split, after the slices' partials)
                if TIMES:
                    gl.store(times + pid * 4 + 2, _now())
                gl.thread_barrier()
                _finish_block(col, cnt, part, la_part + SLICE_SPLIT * M * R, strength, l2, bias, out, M, N, R, S,
                              rows_per_sample, stride_sm, stride_l2n, stride_om, BLOCK_M, BLOCK_N, SPLIT_K, 1, LA_R,
                              WARPS, OUT_TPW_N, HAS_BRANCH, HAS_BIAS, mma, a_op, b_op, own, cnt + col,
                              SPLIT_K - 1 + N_LA)  # fmt: skip
        elif gl.atomic_add(cnt + col, 1, sem="acq_rel") == target - 1:
            if TIMES:
                gl.store(times + pid * 4 + 2, _now())
            gl.thread_barrier()
            _finish_block(col, cnt, part, la_part, strength, l2, bias, out, M, N, R, S, rows_per_sample,
                          stride_sm, stride_l2n, stride_om, BLOCK_M, BLOCK_N, SPLIT_K, SLICE_SPLIT, LA_R, WARPS,
                          OUT_TPW_N, HAS_BRANCH, HAS_BIAS, mma, a_op, b_op)  # fmt: skip
    elif HAS_BRANCH:  # (without a branch there are no slice programs: nothing to compile)
        la_idx = (pid - first_slice) % N_LA
        pid_k = (pid - first_slice) // N_LA
        _slice_partials(la_idx, pid_k, x, l1, la_part, M, KG, R, stride_xm, stride_l1k,
                        BLOCK_M, SLICE_SPLIT, WARPS, STAGES, LA_R, mma, a_op, b_op)  # fmt: skip
        gl.thread_barrier()
        if TIMES:
            gl.store(times + pid * 4 + 1, _now())
        blocks: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
        ones = gl.full([32 * WARPS], 1, gl.int32, blocks)
        if AWAIT_SPLITS:
            # The slice that completes its rank chunk (counted after the column blocks' counters)
            # reduces the chunk, then counts it in every column block.
            if gl.atomic_add(cnt + n_blocks + la_idx, 1, sem="acq_rel") == SLICE_SPLIT - 1:
                if TIMES:
                    gl.store(times + pid * 4 + 2, _now())
                gl.thread_barrier()
                if FLAGGED:  # (the flag of every block: equal at a launch's start, ``flagged_partials``)
                    flag = gl.load(epochs, volatile=True) + 1
                    _reduce_slices(la_idx, la_part, M, R, SLICE_SPLIT, LA_R, WARPS,
                                   _branch_words(words, N, SPLIT_K, BLOCK_N), flag)  # fmt: skip
                    gl.store(cnt + n_blocks + la_idx, 0)
                else:
                    _reduce_slices(la_idx, la_part, M, R, SLICE_SPLIT, LA_R, WARPS)
                    gl.store(cnt + n_blocks + la_idx, 0)
                    gl.thread_barrier()
                    for b0 in range(0, n_blocks, 32 * WARPS):
                        offs_b = b0 + gl.arange(0, 32 * WARPS, layout=blocks)
                        gl.atomic_add(cnt + offs_b, ones, mask=offs_b < n_blocks, sem="release")
        else:  # count this slice in every column block and finish those it completes
            for b0 in range(0, n_blocks, 32 * WARPS):
                offs_b = b0 + gl.arange(0, 32 * WARPS, layout=blocks)
                valid = offs_b < n_blocks
                prev = gl.atomic_add(cnt + offs_b, ones, mask=valid, sem="acq_rel")
                done = ((prev == target - 1) & valid).to(gl.int32)
                if gl.sum(done, axis=0) > 0:
                    if TIMES:
                        gl.store(times + pid * 4 + 2, _now())
                    gl.thread_barrier()
                    for blk in range(b0, gl.minimum(b0 + 32 * WARPS, n_blocks)):
                        if gl.sum(gl.where(offs_b == blk, done, 0), axis=0) > 0:
                            _finish_block(blk, cnt, part, la_part, strength, l2, bias, out, M, N, R, S,
                                          rows_per_sample, stride_sm, stride_l2n, stride_om, BLOCK_M, BLOCK_N, SPLIT_K,
                                          SLICE_SPLIT, LA_R, WARPS, OUT_TPW_N, HAS_BRANCH, HAS_BIAS, mma, a_op,
                                          b_op)  # fmt: skip
    if TIMES:
        gl.thread_barrier()
        gl.store(times + pid * 4 + 3, _now())


def gluon_layer_misfit(
    x: torch.Tensor, smooth_inv: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, fmt: str,
    l1: torch.Tensor, l2: torch.Tensor, strength: torch.Tensor,
) -> str | None:  # fmt: skip
    """What ``w4_linear_small_m_gluon`` needs and these arguments lack, or None if they fit.

    It takes INT4, 1-64 rows of bf16, K a multiple of 64 (its ``cp.async`` copies move 16
    bytes and are masked by whole rows: no partial group), a rank that is 0 or a multiple of
    16 (likewise for ``l1``'s rows; ``SVDQuantLinear`` pads its rank to 16), contiguous rows
    in every operand, operands that start at 16-byte boundaries (``cp.async`` reads them), and a CUDA GPU with ``cp.async`` and ``mma.sync`` (sm_80 and up)."""
    m, k = x.shape
    kg, n, _ = qweight.shape
    r = l1.shape[1]
    checks = [
        (fmt == "int4", "INT4 codes"),
        (0 < m <= GLUON_MAX_ROWS, f"1-{GLUON_MAX_ROWS} rows"),
        (x.dtype == torch.bfloat16, "bf16 activations"),
        (k % 64 == 0 and kg * 64 == k, "K a multiple of 64"),
        (r % 16 == 0, "a rank that is a multiple of 16"),
        (
            all(t.data_ptr() % 16 == 0 for t in (x, qweight, wscale, smooth_inv, l1)),
            "x, codes, scales, smoothing factors and l1 starting at 16-byte boundaries (views that start "
            "inside a row do not)",
        ),
        (
            x.stride(1) == 1
            and x.stride(0) % 8 == 0
            and qweight.dtype == torch.uint8
            and qweight.stride()[1:] == (32, 1)
            and wscale.dtype == torch.float32
            and wscale.stride(1) == 1
            and smooth_inv.dtype == torch.float32
            and smooth_inv.stride(0) == 1,
            "contiguous rows of x, codes, scales and smoothing factors",
        ),
        (
            r == 0
            or (
                l1.dtype == l2.dtype == torch.bfloat16
                and l1.stride() == (r, 1)
                and l2.stride(1) == 1
                and strength.dtype == torch.float32
                and strength.stride(1) == 1
            ),
            "bf16 l1 [K, R] and l2 [N, R] and fp32 strengths with contiguous rows",
        ),
        (
            x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] >= 8,
            "a CUDA GPU of sm_80 or later",
        ),
    ]
    return next((need for ok, need in checks if not ok), None)


def gluon_layer_fits(*args: object) -> bool:
    """``gluon_layer_misfit`` finds nothing missing (same arguments)."""
    return gluon_layer_misfit(*args) is None


#: Rows up to which ``w4_linear`` runs this kernel.  Above, the ``tl`` kernel was as fast or
#: faster on H100 at 64 rows (``bench/diag_small_m_gluon_layer.py --ms 64``, seventeenth
#: session, best tiles: ``mma.sync`` column programs 17.8-44.1 us, ``wgmma`` ones 15.4-32.3 us,
#: ``tl`` 15.1-29.8 us): at 64 rows every column program reads all the activations of its
#: run of K, four times the bytes of its codes at 64 columns.
GLUON_ROUTED_ROWS = 16


def use_gluon_layer(*args: object) -> bool:
    """Whether ``w4_linear``'s small-M path runs this kernel (else the ``tl`` one): where it
    fits (``gluon_layer_misfit``'s arguments) at up to ``GLUON_ROUTED_ROWS`` rows on sm_90,
    where it was measured faster."""
    x = args[0]
    return (
        x.shape[0] <= GLUON_ROUTED_ROWS
        and gluon_layer_fits(*args)
        and torch.cuda.get_device_capability(x.device) == (9, 0)
    )


def uses_scaled_codes(m: int) -> bool:
    """Whether the layer at ``m`` rows runs scaled codes by default: above 16 rows."""
    return m > 16


def default_tile(kg: int, n: int, block_m: int = 16) -> tuple[int, int, int, int, bool, str]:
    """``GLUON_TILES``'s tile of the shape, or one shaped like those: 64 columns up to 9216
    outputs at 16 rows (128 above, and at more rows: every column program reads all the rows'
    activations), 4 splits up to 64 groups (8 above), at least 4 groups a split, 4 warps, 4
    slots, activations scaled in the kernel, ``DEFAULT_FINISH``."""
    if (block_m, kg, n) in GLUON_TILES:
        return GLUON_TILES[(block_m, kg, n)]
    split = max(1, min(4 if kg <= 64 else 8, kg // 4))
    return (64 if n <= 9216 and block_m == 16 else 128), split, 4, 4, False, DEFAULT_FINISH


def w4_linear_small_m_gluon(
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
    tile: tuple[int, int, int, int] | None = None,
    prescale: bool | None = None,
    scaled_codes: bool | None = None,
    wgmma: bool | None = None,
    slices_first: bool = True,
    finish: str | None = None,
    times: torch.Tensor | None = None,
    codes_left: bool | None = None,
    dependent_launch: bool | None = None,
) -> torch.Tensor:
    """``[M, N]`` bf16; shapes as ``studio.kernels.w4_linear``; ``reference_small_m`` with
    ``scaled_codes=False`` is its oracle.  ``tile``: (BLOCK_N, SPLIT_K, warps, stages);
    None: ``default_tile``'s.  ``prescale``: activations scaled by ``small_m_triton``'s kernel
    first (``PRESCALED``); None: as ``default_tile`` says.  ``scaled_codes``: each code times its
    group scale rounded to bf16 before the dot (``reference_small_m``'s ``scaled_codes``);
    None: ``uses_scaled_codes(M)``, which says which oracle a call has.  ``wgmma``: the column
    programs of ``small_m_gluon_wgmma`` (33-64 rows, 4 warps, scaled codes, pre-scaled
    activations); None: at 33-64 rows.  ``times``: int64 ``[programs, 4]``
    that each program fills with ``%globaltimer`` stamps (start, loop and stores done,
    finishing a block from (an awaiting finish: before its wait; the flagged finish: once its
    inputs are in), end;
    ``bench/diag_small_m_gluon_parts.py``).  ``slices_first``: the branch slices' place in the grid (the tests
    run both, so that either kind of program finishing a block is covered).  ``finish``:
    ``"await"`` (each block's last column program waits until the others are counted:
    ``AWAIT_SPLITS``; needs ``slices_first``), ``"flag"`` (that program reads the others'
    partials as flagged words until they are this launch's, no counters: ``FLAGGED``; needs
    ``slices_first``, 1-16 rows, ``mma.sync`` column programs) or ``"count"`` (the arrival that
    completes a block finishes it); None: ``default_tile``'s (``"count"`` with the slices last).
    ``codes_left``: the ``mma.sync`` column programs take the decoded codes as the dot's left
    operand (``CODES_LEFT``; needs ``BLOCK_N`` a multiple of ``16 * warps``); None:
    ``DEFAULT_CODES_LEFT`` where the tile allows it, else the right operand; ignored by the
    ``wgmma`` column programs.  ``dependent_launch``: with ``prescale`` on sm_90 and up, the
    layer is launched by programmatic dependent launch after the scaling pre-kernel
    (``GRID_DEP_WAIT``); None: ``DEFAULT_DEPENDENT_LAUNCH``; without the pre-kernel or with the
    ``wgmma`` column programs it is launched plainly.  Refuses, naming it, what
    ``gluon_layer_misfit`` finds missing."""
    m, k = x.shape
    kg, n, _ = qweight.shape
    r = l1.shape[1]
    block_m = block_rows(m)
    *default, pre, fin = default_tile(kg, n, block_m)
    block_n, split_k, warps, stages = tile or default
    prescale = pre if prescale is None else prescale
    if codes_left is None:  # (the default where the tile allows it)
        codes_left = DEFAULT_CODES_LEFT and codes_left_fits(block_n, warps)
    if finish is None:
        finish = fin if slices_first else "count"
    scaled_codes = uses_scaled_codes(m) if scaled_codes is None else scaled_codes
    wgmma = block_m == 64 if wgmma is None else wgmma
    if wgmma and not (block_m == 64 and warps == 4 and scaled_codes):
        raise ValueError(
            f"the wgmma column programs take 33-64 rows, 4 warps and scaled codes; got {m} rows, {warps} "
            f"warps, scaled codes {scaled_codes}"
        )
    prescale = prescale or wgmma  # (its column programs read pre-scaled activations only)
    codes_left = codes_left and not wgmma
    if codes_left and not codes_left_fits(block_n, warps):
        raise ValueError(
            f"codes as the dot's left operand need BLOCK_N a multiple of 16 * warps, got {block_n} columns, "
            f"{warps} warps"
        )
    if finish not in FINISHES or (finish in ("await", "flag") and not slices_first):
        raise ValueError(
            f"finish is 'await' or 'flag' (with the branch slices first in the grid) or 'count'; got {finish!r}, "
            f"slices first {slices_first}"
        )
    if finish == "flag" and (block_m != 16 or wgmma):
        raise ValueError(
            f"the flagged finish takes 1-16 rows and mma.sync column programs; got {m} rows, wgmma {wgmma}"
        )
    if stages < 2:
        raise ValueError(f"the ring needs at least 2 slots, got {stages}")
    misfit = gluon_layer_misfit(x, smooth_inv, qweight, wscale, fmt, l1, l2, strength)
    if misfit:
        raise ValueError(
            f"the Gluon small-M layer needs {misfit}; got {fmt}, x {x.dtype} {tuple(x.shape)} on "
            f"{x.device}, rank {l1.shape[1]}"
        )
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    part = torch.empty(split_k, m, n, device=x.device, dtype=torch.float32)
    n_blocks = triton.cdiv(n, block_n)
    n_la = triton.cdiv(r, LA_RANKS)
    slice_split = min(kg, 2 * split_k)
    _, cnt = zeroed_scratch(x.device, 0, n_blocks + n_la)  # (after the blocks': the rank chunks')
    src = x  # what the column programs read: raw x, or bf16(x * 1/s) padded (PRESCALED)
    dependent_launch = DEFAULT_DEPENDENT_LAUNCH if dependent_launch is None else dependent_launch
    dependent_launch = (
        dependent_launch and prescale and not wgmma and torch.cuda.get_device_capability(x.device)[0] >= 9
    )
    if prescale:
        from studio.kernels.small_m_triton import scaled_activations

        src = scaled_activations(x, smooth_inv, False, launch_dependents=dependent_launch)[0]
    if r:
        # (one split more: the reduced branch input of the awaiting finish, ``_reduce_slices``)
        la_part = torch.empty(slice_split + 1, m, r, device=x.device, dtype=torch.float32)
    else:  # no branch: no slice programs, and the branch arguments go unread (any valid pointer)
        l1, l2, strength, la_part = x, x, wscale, part
    bias_t = bias.float().contiguous() if bias is not None else out
    words = epochs = None
    if finish == "flag":  # (the other splits' partials, then the branch input: ``_finish_flagged``)
        words, epochs = flagged_scratch(
            x.device, (n, block_n, split_k, r), n_blocks * (split_k - 1) * 16 * block_n + 16 * r, n_blocks
        )
    grid = (n_la * slice_split + n_blocks * split_k,)
    launch = {}
    if finish == "flag" and (cap := one_wave_registers(x.device, grid[0], warps)):
        launch["maxnreg"] = cap  # (the whole grid resident: the finishes wait for the other programs)
    _w4_gluon_layer_kernel[grid](
        x, src, smooth_inv, qweight, wscale, l1, part, la_part, cnt, l2, strength, bias_t, out,
        m, n, kg, max(r, 1), n_la, strength.shape[0], max(rows_per_sample, 1),
        x.stride(0), src.stride(0), qweight.stride(0), wscale.stride(0), l1.stride(0), l2.stride(0),
        strength.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split_k, SLICE_SPLIT=slice_split, WARPS=warps, STAGES=stages,
        SCALED_CODES=scaled_codes, WGMMA=wgmma,
        PRESCALED=prescale, HAS_BRANCH=r > 0, HAS_BIAS=bias is not None, LA_R=LA_RANKS,
        OUT_TPW_N=min(32, block_n // 4),
        SLICES_FIRST=slices_first, AWAIT_SPLITS=finish in ("await", "flag"), num_warps=warps, times=times,
        TIMES=times is not None, CODES_LEFT=codes_left,
        GRID_DEP_WAIT=dependent_launch, launch_pdl=dependent_launch,
        FLAGGED=finish == "flag", words=words, epochs=epochs, **launch,
    )  # fmt: skip
    return out
