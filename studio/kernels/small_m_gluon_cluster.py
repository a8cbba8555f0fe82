"""The 16-row INT4 layer with its split-K sums added in distributed shared memory (H100 clusters).

``small_m_gluon_layer``'s column programs meet in L2: each writes fp32 partials, counts
itself in its block's counter, and the block's last program waits for the count, then
reads the partials and the branch input back.  Under the launch's own weight stream an L2
round trip took about 1 us, and the finish started 2-3 us after the block's last product
(``docs/results.md``, sixteenth to nineteenth sessions), as much as the whole gap to the
2.5x goal.  Here the ``SPLIT_K`` column programs of a block are one thread-block cluster
(``cluster_launch``), and the partials never leave the SMs:

- the pre-kernel (``_prepare_kernel``, launched first) computes the branch input
  ``bf16(x @ l1)`` in clusters of its own (``LA_CLUSTER`` CTAs split K, and add their
  partials in distributed shared memory in cluster order) and, with ``prescale``, the scaled
  activations ``bf16(x * 1/s)``; it lets the layer start at once
  (``griddepcontrol.launch_dependents``);
- the layer, launched by programmatic dependent launch, streams its run of K as
  ``small_m_gluon._column_partials`` does (codes as the dot's left operand), waiting for the
  pre-kernel before its first activation copies;
- each CTA writes its partials ``[BLOCK_N, 16]`` into its own shared memory (the ring's
  space, free once the product is done), and after a cluster barrier finishes
  ``BLOCK_N / SPLIT_K`` of the block's columns: it reads those columns' partials from every
  CTA of the cluster (``ld.shared::cluster``), adds them in split order, adds the branch
  ``bf16(bf16(x @ l1) * strength) @ l2`` (an ``mma.sync`` with ``l2`` as the left operand,
  loaded before the product) and the bias, and writes them; a second cluster barrier keeps
  every CTA's shared memory alive until the others have read it.

No counters, no scratch, no atomics: results are identical run to run.  The oracle is
``reference_small_m`` with ``scaled_codes=False`` (the same roundings).  Shared memory is
addressed by hand (inline PTX from ``global_smem``, the base of the kernel's dynamic shared
memory), because Gluon gives no address of a buffer; between the partials' store and the
last barrier the kernel therefore does nothing that the compiler would stage in shared
memory (no layout conversion: every tensor of the finish is in the product's layout).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from studio.kernels.cluster_launch import MAX_CLUSTER, launch_in_clusters
from studio.kernels.small_m_gluon import _column_partials, codes_left_fits
from studio.kernels.small_m_gluon_layer import LA_RANKS, _now, _slice_sum, gluon_layer_misfit

#: Columns of ``x`` each scaling CTA of the pre-kernel scales.
SCALE_COLS = 512

#: Most slots of the pre-kernel's ring (a CTA's whole run of groups in flight, up to this).
LA_MAX_STAGES = 13


@gluon.jit
def _cluster_arrive():
    """This thread has arrived at the cluster barrier; its shared-memory writes are released."""
    gl.inline_asm_elementwise(
        "barrier.cluster.arrive.release.aligned; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1
    )


@gluon.jit
def _cluster_wait():
    """Every thread of the cluster has arrived; their released writes are visible (acquire)."""
    gl.inline_asm_elementwise(
        "barrier.cluster.wait.acquire.aligned; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1
    )


@gluon.jit
def _launch_dependents():
    """Let the launch that depends on this one start now (``griddepcontrol.launch_dependents``)."""
    gl.inline_asm_elementwise(
        "griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1
    )


@gluon.jit
def _share(offs, vals):
    """fp32 ``vals`` into this CTA's shared memory at word ``offs`` from its base."""
    return gl.inline_asm_elementwise(
        "{ .reg .u32 a; mov.u32 a, global_smem; mad.lo.u32 a, $1, 4, a; st.shared.f32 [a], $2; mov.u32 $0, 0; }",
        "=r,r,r",
        [offs, vals],
        dtype=gl.int32,
        is_pure=False,
        pack=1,
    )


@gluon.jit
def _from_peer(offs, rank, take):
    """fp32 at word ``offs`` of the shared memory of the cluster's CTA ``rank`` where ``take``
    (else 0): ``mapa`` maps the local address into that CTA's window."""
    return gl.inline_asm_elementwise(
        "{ .reg .u32 a, r; .reg .pred p; setp.ne.u32 p, $3, 0; mov.u32 a, global_smem; mad.lo.u32 a, $1, 4, a; "
        "mapa.shared::cluster.u32 r, a, $2; mov.f32 $0, 0f00000000; @p ld.shared::cluster.f32 $0, [r]; }",
        "=f,r,r,r",
        [offs, rank, take],
        dtype=gl.float32,
        is_pure=False,
        pack=1,
    )


@gluon.jit
def _prepare_kernel(
    x, sinv, l1, xs, la, M, K, KG, R, stride_xm, stride_xsm, stride_l1k, stride_la,
    LA_CLUSTER: gl.constexpr, N_LA: gl.constexpr, STAGES: gl.constexpr, WARPS: gl.constexpr,
    LA_R: gl.constexpr, SCALE_COLS: gl.constexpr, PRESCALE: gl.constexpr, LAUNCH_DEPENDENTS: gl.constexpr,
):  # fmt: skip
    """Grid: ``N_LA`` clusters of ``LA_CLUSTER`` CTAs for the branch input (cluster ``c``: ranks
    ``c * LA_R ..``, its CTA ``s``: split ``s`` of K), then, with ``PRESCALE``, CTAs that scale
    ``SCALE_COLS`` columns of ``x`` each (in clusters too, none of which waits at a barrier)."""
    pid = gl.program_id(0)
    if LAUNCH_DEPENDENTS:
        _launch_dependents()
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[2, 0], warps_per_cta=[1, WARPS], instr_shape=[16, 8]
    )
    a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8)
    b_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8)
    if N_LA > 0:  # (compiled only with a branch: at rank 0 the copies of l1 would be masked per element)
        if pid < N_LA * LA_CLUSTER:
            chunk = pid // LA_CLUSTER
            rank = pid % LA_CLUSTER
            part = _slice_sum(chunk, rank, x, l1, M, KG, R, stride_xm, stride_l1k, 16, LA_CLUSTER, WARPS, STAGES, LA_R,
                              mma, a_op, b_op)  # fmt: skip
            # Every warp is done with the ring before its space takes the partials (64 * LA_R
            # bytes, less than one of the ring's slots of x and l1).
            gl.thread_barrier()
            m_c = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
            r_c = gl.arange(0, LA_R, layout=gl.SliceLayout(0, mma))
            offs = m_c[:, None] * LA_R + r_c[None, :]
            _share(offs, part)
            _cluster_arrive()
            _cluster_wait()
            if rank == 0:
                total = part
                for s in gl.static_range(1, LA_CLUSTER):
                    total += _from_peer(
                        offs, gl.full(offs.shape, s, gl.int32, mma), gl.full(offs.shape, 1, gl.int32, mma)
                    )
                r_g = chunk * LA_R + r_c
                mask = (m_c < M)[:, None] & (r_g < R)[None, :]
                gl.store(la + m_c[:, None] * stride_la + r_g[None, :], total.to(gl.bfloat16), mask=mask)
            _cluster_arrive()  # (every CTA's shared memory stays until CTA 0 has read it)
            _cluster_wait()
    if PRESCALE:
        if pid >= N_LA * LA_CLUSTER:
            flat: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [WARPS, 1], [1, 0])
            k = (pid - N_LA * LA_CLUSTER) * SCALE_COLS + gl.arange(
                0, SCALE_COLS, layout=gl.SliceLayout(0, flat)
            )
            m = gl.arange(0, 16, layout=gl.SliceLayout(1, flat))
            mask = (m < M)[:, None] & (k < K)[None, :]
            xv = gl.load(x + m[:, None] * stride_xm + k[None, :], mask=mask, other=0.0)
            v = gl.load(sinv + k, mask=k < K, other=0.0)
            gl.store(
                xs + m[:, None] * stride_xsm + k[None, :],
                (xv.to(gl.float32) * v[None, :]).to(gl.bfloat16),
                mask=mask,
            )


@gluon.jit
def _w4_cluster_layer_kernel(
    xs, sinv, qweight, wscale, la, l2, strength, bias, out,
    M, N, KG, R, S, rows_per_sample, stride_xsm, stride_qg, stride_wg, stride_la, stride_l2n, stride_sm, stride_om,
    BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr, WARPS: gl.constexpr, STAGES: gl.constexpr,
    PRESCALED: gl.constexpr, HAS_BRANCH: gl.constexpr, HAS_BIAS: gl.constexpr, GRID_DEP_WAIT: gl.constexpr,
    LA_R: gl.constexpr, EXCHANGE: gl.constexpr = True, times=None, TIMES: gl.constexpr = False,
):  # fmt: skip
    """Grid: ``n_blocks`` clusters of ``SPLIT_K`` CTAs; CTA ``s`` of cluster ``col`` streams split
    ``s`` of column block ``col`` and finishes its columns ``s * BLOCK_N / SPLIT_K ..``.
    ``EXCHANGE`` False, only for ``bench/diag_small_m_cluster.py`` (the launcher never sets
    it): each CTA takes its own partials for the sums, a wrong result that times the
    product and the cluster launch without the exchange.  ``TIMES``: each CTA writes four
    ``%globaltimer`` stamps to ``times[pid]`` (start, product done, past the first cluster
    barrier, end), for the diag."""
    pid = gl.program_id(0)
    if TIMES:
        gl.store(times + pid * 4, _now())
    col = pid // SPLIT_K
    pid_k = pid % SPLIT_K  # (the CTA's rank in its cluster)
    PER: gl.constexpr = BLOCK_N // SPLIT_K
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[2, 0], warps_per_cta=[1, WARPS], instr_shape=[16, 8]
    )
    a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8)
    b_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8)
    mma_t: gl.constexpr = gl.NVMMADistributedLayout(
        version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8]
    )
    a_t: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_t, k_width=8)
    b_t: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma_t, k_width=8)

    # What the finish reads that nothing in the launch or the pre-kernel writes, before the product.
    n_t = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma_t))
    m_t = gl.arange(0, 16, layout=gl.SliceLayout(0, mma_t))
    n_g = col * BLOCK_N + n_t
    mine_n = (n_t // PER == pid_k) & (n_g < N)
    if HAS_BIAS:
        b = gl.load(bias + n_g, mask=mine_n, other=0.0)
    if HAS_BRANCH:
        n_a = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, a_t))
        r_a = gl.arange(0, LA_R, layout=gl.SliceLayout(0, a_t))
        mine_a = (n_a // PER == pid_k) & (col * BLOCK_N + n_a < N)
        l2_ptrs = l2 + (col * BLOCK_N + n_a)[:, None] * stride_l2n + r_a[None, :]
        l2a = gl.load(l2_ptrs, mask=mine_a[:, None] & (r_a < R)[None, :], other=0.0)
        r_b = gl.arange(0, LA_R, layout=gl.SliceLayout(1, b_t))
        m_b = gl.arange(0, 16, layout=gl.SliceLayout(0, b_t))
        st_ptrs = strength + ((m_b // rows_per_sample) % S)[None, :] * stride_sm + r_b[:, None]
        st = gl.load(st_ptrs, mask=(r_b < R)[:, None] & (m_b < M)[None, :], other=0.0)

    acc = _column_partials(col, pid_k, xs, sinv, qweight, wscale, xs, M, N, KG, stride_xsm, stride_qg, stride_wg,
                           16, BLOCK_N, SPLIT_K, WARPS, STAGES, PRESCALED, False, mma, a_op, b_op, True,
                           GRID_DEP_WAIT, False)  # fmt: skip
    if HAS_BRANCH:  # (written by the pre-kernel: complete once the dependency wait has returned)
        la_ptrs = la + m_b[None, :] * stride_la + r_b[:, None]
        la_mask = (r_b < R)[:, None] & (m_b < M)[None, :]
        lat = gl.load(la_ptrs, mask=la_mask, other=0.0, cache_modifier=".cg")  # (used after the exchange)

    if TIMES:
        gl.store(times + pid * 4 + 1, _now())
    if EXCHANGE:
        # Every warp is done with the ring before its space takes the partials: 64 * BLOCK_N
        # bytes, less than the ring's codes alone (at least 2 slots of 32 x BLOCK_N bytes).
        gl.thread_barrier()
        offs = n_t[:, None] * 16 + m_t[None, :]
        _share(offs, acc)
        _cluster_arrive()
        _cluster_wait()
        if TIMES:
            gl.store(times + pid * 4 + 2, _now())
        take = (mine_n[:, None] & (m_t < M)[None, :]).to(gl.int32)
        total = gl.zeros([BLOCK_N, 16], gl.float32, mma_t)
        for s in gl.static_range(SPLIT_K):
            rank = gl.full(offs.shape, s, gl.int32, mma_t)
            total += gl.where(pid_k == s, acc, _from_peer(offs, rank, take * (pid_k != s).to(gl.int32)))
        _cluster_arrive()  # done reading the others' shared memory
    else:  # (a probe of what the exchange costs: each CTA's own partials as the result, wrong)
        total = acc
    if HAS_BRANCH:
        lat = (lat.to(gl.float32) * st).to(gl.bfloat16)
        branch = mma_v2(l2a, lat, gl.zeros([BLOCK_N, 16], gl.float32, mma_t))
        for r0 in range(LA_R, R, LA_R):
            l2a = gl.load(l2_ptrs + r0, mask=mine_a[:, None] & (r0 + r_a < R)[None, :], other=0.0)
            mask = (r0 + r_b < R)[:, None] & (m_b < M)[None, :]
            st = gl.load(st_ptrs + r0, mask=mask, other=0.0)
            lat = gl.load(la_ptrs + r0, mask=mask, other=0.0, cache_modifier=".cg")
            lat = (lat.to(gl.float32) * st).to(gl.bfloat16)
            branch = mma_v2(l2a, lat, branch)
        total += branch
    if HAS_BIAS:
        total += b[:, None]
    out_mask = mine_n[:, None] & (m_t < M)[None, :]
    gl.store(out + m_t[None, :] * stride_om + n_g[:, None], total.to(out.dtype.element_ty), mask=out_mask)
    if EXCHANGE:
        _cluster_wait()  # (the others may still read this CTA's shared memory until then)
    if TIMES:
        gl.store(times + pid * 4 + 3, _now())


def cluster_misfit(m: int, tile: tuple[int, int, int, int]) -> str:
    """What the cluster layer lacks for ``m`` rows at ``tile``, or ``""``."""
    block_n, split_k, warps, stages = tile
    if not 1 <= m <= 16:
        return f"1-16 rows, got {m}"
    if not 1 <= split_k <= MAX_CLUSTER:
        return f"a split of 1-{MAX_CLUSTER} (one cluster), got {split_k}"
    if block_n % split_k or not codes_left_fits(block_n, warps):
        return f"BLOCK_N a multiple of SPLIT_K and of 16 * warps, got {block_n} columns, {split_k} splits, {warps} warps"
    if stages < 2:
        return f"at least 2 ring slots, got {stages}"
    return ""


def cluster_tile(kg: int, n: int) -> tuple[int, int, int, int, bool]:
    """128 columns (64 up to 3072 outputs), 8 splits (4 up to 64 groups; at least 2 groups a
    split, and a power of two, so that it divides the columns), 4 warps, 4 slots, activations
    scaled by the pre-kernel.  Nothing is pinned per shape: no shape routes here."""
    most = max(1, min(4 if kg <= 64 else 8, kg // 2))
    return (64 if n <= 3072 else 128), 1 << (most.bit_length() - 1), 4, 4, True


def prepare(
    x: torch.Tensor,
    smooth_inv: torch.Tensor,
    l1: torch.Tensor,
    prescale: bool,
    la_cluster: int,
    launch_dependents: bool,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The pre-kernel (``_prepare_kernel``) where it has work: the activations the column
    programs read (``bf16(x * 1/s)`` with ``prescale``, else ``x`` itself), ``bf16(x @ l1)``
    ``[M, max(R, 1)]``, and whether it was launched."""
    m, k = x.shape
    r = l1.shape[1]
    n_la = triton.cdiv(r, LA_RANKS)
    la = torch.empty(m, max(r, 1), device=x.device, dtype=torch.bfloat16)
    xs = torch.empty_like(x) if prescale else x
    ctas = n_la * la_cluster + (
        triton.cdiv(triton.cdiv(k, SCALE_COLS), la_cluster) * la_cluster if prescale else 0
    )
    if ctas:
        src = l1 if r else x  # (at rank 0 the branch part is not compiled: any aligned pointer)
        launch_in_clusters(
            _prepare_kernel, ctas, la_cluster, "LA_CLUSTER",
            x, smooth_inv, src, xs, la, m, k, k // 64, max(r, 1), x.stride(0), xs.stride(0), src.stride(0),
            la.stride(0),
            LA_CLUSTER=la_cluster, N_LA=n_la, STAGES=min(triton.cdiv(k // 64, la_cluster), LA_MAX_STAGES - 1) + 1,
            WARPS=4, LA_R=LA_RANKS, SCALE_COLS=SCALE_COLS, PRESCALE=prescale, LAUNCH_DEPENDENTS=launch_dependents,
            num_warps=4,
        )  # fmt: skip
    return xs, la, ctas > 0


def launch_layer(
    xs: torch.Tensor, smooth_inv: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, la: torch.Tensor,
    l2: torch.Tensor, strength: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, r: int,
    rows_per_sample: int, tile: tuple[int, int, int, int], prescaled: bool, dependent: bool,
    clusters: bool = True, **probe: object,
) -> None:  # fmt: skip
    """``_w4_cluster_layer_kernel`` into ``out`` (a rank-``r`` branch; ``l2`` and ``strength``
    unread at rank 0).  ``clusters`` False (a plain launch) and ``probe`` (``EXCHANGE``,
    ``times``, ``TIMES``) only for ``bench/diag_small_m_cluster.py``."""
    kg, n, _ = qweight.shape
    block_n, split_k, warps, stages = tile
    args = (
        xs, smooth_inv, qweight, wscale, la, l2, strength, out if bias is None else bias, out,
        out.shape[0], n, kg, max(r, 1), strength.shape[0], max(rows_per_sample, 1),
        xs.stride(0), qweight.stride(0), wscale.stride(0), la.stride(0), l2.stride(0), strength.stride(0),
        out.stride(0),
    )  # fmt: skip
    kw = dict(
        BLOCK_N=block_n, SPLIT_K=split_k, WARPS=warps, STAGES=stages, PRESCALED=prescaled, HAS_BRANCH=r > 0,
        HAS_BIAS=bias is not None, GRID_DEP_WAIT=dependent, LA_R=LA_RANKS, num_warps=warps, launch_pdl=dependent,
        **probe,
    )  # fmt: skip
    ctas = triton.cdiv(n, block_n) * split_k
    if clusters:
        launch_in_clusters(_w4_cluster_layer_kernel, ctas, split_k, "SPLIT_K", *args, **kw)
    else:
        _w4_cluster_layer_kernel[(ctas,)](*args, **kw)


def w4_linear_small_m_cluster(
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
    la_cluster: int | None = None,
    dependent_launch: bool = True,
) -> torch.Tensor:
    """``[M, N]`` bf16 for 1-16 rows; shapes as ``studio.kernels.w4_linear``;
    ``reference_small_m`` with ``scaled_codes=False`` is its oracle.  ``tile``: (BLOCK_N,
    SPLIT_K, warps, stages), SPLIT_K being the cluster size (1-16); None: ``cluster_tile``'s.
    ``prescale``: the pre-kernel scales the activations (else the column programs do); None:
    ``cluster_tile``'s.  ``la_cluster``: CTAs per rank chunk of the branch input in the
    pre-kernel (1-16); None: 8, 16 from 128 groups.  ``dependent_launch``: the layer starts
    while the pre-kernel runs.  Refuses, naming it, what ``gluon_layer_misfit`` or
    ``cluster_misfit`` finds missing, and a GPU before sm_90."""
    m, k = x.shape
    kg, n, _ = qweight.shape
    r = l1.shape[1]
    *default, pre = cluster_tile(kg, n)
    tile = tuple(tile or default)
    prescale = pre if prescale is None else prescale
    la_cluster = la_cluster or (16 if kg >= 128 else 8)
    misfit = gluon_layer_misfit(x, smooth_inv, qweight, wscale, fmt, l1, l2, strength) or cluster_misfit(
        m, tile
    )
    if not misfit and torch.cuda.get_device_capability(x.device)[0] < 9:
        misfit = "an sm_90 GPU or later (thread-block clusters)"
    if misfit or not 1 <= la_cluster <= MAX_CLUSTER:
        raise ValueError(
            f"the cluster small-M layer needs {misfit or f'a pre-kernel cluster of 1-{MAX_CLUSTER}'}; got {fmt}, "
            f"x {x.dtype} {tuple(x.shape)} on {x.device}, rank {r}, tile {tile}, pre-kernel cluster {la_cluster}"
        )
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    xs, la, prepared = prepare(x, smooth_inv, l1, prescale, la_cluster, dependent_launch)
    if not r:  # no branch: its arguments go unread (any valid pointer)
        l2, strength = x, wscale
    bias_t = bias.float().contiguous() if bias is not None else None
    launch_layer(xs, smooth_inv, qweight, wscale, la, l2, strength, bias_t, out, r, rows_per_sample, tile, prescale,
                 dependent_launch and prepared)  # fmt: skip
    return out
