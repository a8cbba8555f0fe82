"""The large-M pre-pass in two launches: row statistics split along K, then the codes.

Same outputs as ``reference_prefill.quantize_act_rowwise`` and as the one-launch
``prefill_triton._rowwise_prepass_kernel``.  Why a second design: that kernel takes 16-row
blocks so that M = 4608 still makes 288 programs, and each program reads the whole
``l1 [K, R]`` from L2 for its ``x @ l1`` dot.  At K = 12288 that is 226 MB of L2 reads at
R = 32 and 680 MB at R = 96, against 113 MB of X; the measured pre-pass (183 us at
12288x3072, M = 4608, rank 32) is twice its memory floor, and 64 more ranks cost the layer
+18 % there (docs/results.md).  Taller row blocks alone left too few programs.  Here:

1. ``_row_stats_kernel``, grid (row blocks of up to 128 rows, ``SPLITS`` slices of K): the
   row maxima of ``|x * smooth_inv|`` and the partial ``x @ l1`` of its slice, written as
   per-slice partials (no atomics: the summation order is fixed).  Tall blocks read ``l1``
   4-8x less often; the K slices keep the program count up.
2. ``_row_codes_kernel``, grid (row blocks, column blocks over the GEMM's K): reduces the
   partial maxima of its rows, writes its tile of FP8 codes (a streaming pass over X);
   column block 0 also writes the row scales, the branch blocks ``[a_hi | a_hi | a_lo]``
   (from the summed partials, 32 ranks at a time) and the zero tail.

``w4_linear_prefill_triton`` uses it by default (``prefill_triton.DEFAULT_PREPASS``): on H100
it cut the whole layer's time by 4-13 % at M = 4608 (docs/results.md).  ``bench/diag_prefill.py``
times both pre-passes; ``bench/diag_split_prepass.py`` shows where codes differ from the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from studio.kernels.autotuned_launch import launch_autotuned
from studio.kernels.prefill_triton import (
    _FP8_MAX,
    _stats_step,
    _write_branch,
    _write_codes,
    _write_scale_and_tail,
)
from studio.kernels.quant_act import branch_dot_dtype
from studio.kernels.reference_prefill import K_ALIGN, branch_block, check_act_peak, check_scaling, total_k

#: Ranks from which the statistics launch leaves ``x @ l1`` to cuBLAS (``torch.mm``, bf16 in,
#: fp32 out; a second read of X) and computes only the row maxima (``branch_by_cublas``), and
#: from ``CUBLAS_BRANCH_MIN_R_MANY_ROWS`` ranks at ``MANY_ROWS`` rows.  Triton's dots take
#: power-of-two widths and the launch's fp32 accumulator must stay in registers, so 129-256
#: ranks took 256-wide dots in 32-row blocks that each re-read all of ``l1``.  On H100
#: (bench/diag_rank_dots.py, docs/results.md, twenty-sixth session), at rank 160 the layer
#: took 137 / 289 / 416 / 458 us with cuBLAS against 187 / 351 / 451 / 657 (the FLUX.1 shapes,
#: M = 4608), and cuBLAS won at 1024 rows too.  At rank 96 it won at 4608 rows on three shapes
#: (tied on 12288x3072; one partial to add instead of the launch's 2-8 K slices) but lost by
#: 3-5 % at 1024 rows on three; at rank 32 its extra read of X lost everywhere.
CUBLAS_BRANCH_MIN_R = 129
CUBLAS_BRANCH_MIN_R_MANY_ROWS = 65
MANY_ROWS = 4096


def branch_by_cublas(m: int, r: int) -> bool:
    """Whether the statistics launch leaves ``x @ l1`` (``m`` rows, ``r`` ranks) to cuBLAS."""
    return r >= CUBLAS_BRANCH_MIN_R or (r >= CUBLAS_BRANCH_MIN_R_MANY_ROWS and m >= MANY_ROWS)


#: Rows up to which the statistics launch may take 16-row blocks and 16-32 K slices: with
#: few rows the grid is small and each program's loop is latency-bound (with only the tiles
#: above, the pre-pass took 12.5 us for 128 rows of K = 3072 and 29.5 us at K = 12288 on H100,
#: bench/bench_expand_gemm.py);
#: above, the partials of that many slices would cost more than they save.
FEW_ROWS = 1024


def _prune_stats(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """The fp32 ``x @ l1`` accumulator ``[BLOCK_M, R_PAD]`` must stay in registers; the tiles
    for few rows (``FEW_ROWS``) only there."""
    r_pad = int(kwargs.get("R_PAD", named_args.get("R_PAD", 16)))
    m_bucket = int(kwargs.get("M_BUCKET", named_args.get("M_BUCKET", 8192)))  # not named: many rows
    keep = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] * r_pad <= 8192 and (m_bucket <= FEW_ROWS or not _for_few_rows(c))
    ]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


def _for_few_rows(config: triton.Config) -> bool:
    return config.kwargs["BLOCK_M"] < 32 or config.kwargs["SPLITS"] > 8


# num_stages=1 throughout: on H100 / Triton 3.6 the software-pipelined variants (2 and 3
# stages) of this loop gave wrong ``x @ l1`` partials for some shapes (the row maxima were
# right); every tile below was correct unpipelined (bench/diag_split_prepass.py, 2026-11-23).
@triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "SPLITS": sp}, num_warps=w, num_stages=1)
        for bm, bk, sp, w in [
            (32, 128, 2, 4),
            (32, 256, 4, 4),
            (64, 128, 2, 8),
            (64, 128, 4, 8),
            (64, 64, 8, 4),
            (128, 64, 4, 8),
            (128, 64, 8, 8),
            # few rows only (FEW_ROWS): more programs, shorter loops
            (16, 128, 8, 4),
            (16, 128, 16, 4),
            (32, 128, 16, 4),
            (32, 64, 32, 4),
            (64, 64, 16, 4),
        ]
    ],
    key=["M_BUCKET", "K", "R_PAD", "CODES"],
    prune_configs_by={"early_config_prune": _prune_stats},
)
@triton.jit
def _row_stats_kernel(
    x_ptr, sinv_ptr, l1_ptr, amax_ptr, la_ptr, peak_ptr, out_ptr, fixed_ptr,
    M, K, KP, R, M_BUCKET, stride_xm, stride_l1k, stride_om,
    R_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, TENSOR: tl.constexpr, CODES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    m_mask = offs_m < M
    r_mask = offs_r < R
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLITS) * BLOCK_K
    k_start = pid_s * per_split
    k_stop = tl.minimum(k_start + per_split, K)
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    la = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    scale = 1.0  # unused without codes
    if CODES:  # a calibrated peak: the codes are written in the same pass (tiles never cross splits)
        scale = tl.maximum(tl.load(fixed_ptr) / _FP8_MAX, 1e-12)
    for k0 in range(k_start, k_stop, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        amax, la = _stats_step(x_ptr, sinv_ptr, l1_ptr, offs_m, m_mask, kk, kk < k_stop, offs_r, r_mask,
                               stride_xm, stride_l1k, amax, la, DOT_DTYPE, out_ptr, KP, stride_om, scale,
                               CODES)  # fmt: skip
    if TENSOR or CODES:  # the largest row maximum of all: max is exact, so the order of atomics is not seen
        tl.atomic_max(peak_ptr, tl.max(amax, axis=0))
    else:
        tl.store(amax_ptr + pid_s * M + offs_m, amax, m_mask)
    tl.store(
        la_ptr + (pid_s * M + offs_m[:, None]) * R + offs_r[None, :], la, m_mask[:, None] & r_mask[None, :]
    )


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w)
        for bm, bk, w in [(16, 512, 4), (32, 256, 4), (64, 128, 4), (64, 256, 8), (128, 128, 8)]
    ],
    key=["M_BUCKET", "KP", "R"],
)
@triton.jit
def _row_codes_kernel(
    x_ptr, sinv_ptr, amax_ptr, la_ptr, str_ptr, g_ptr, out_ptr, sx_ptr, peak_ptr,
    M, K, KP, KT, R, RB, S, rows_per_sample, M_BUCKET, n_splits, n_la,
    stride_xm, stride_sm, stride_om,
    TAIL_PAD: tl.constexpr, TENSOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    CODES: tl.constexpr = True,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    if TENSOR:
        amax += tl.load(peak_ptr)
    else:
        for s in range(n_splits):
            amax = tl.maximum(amax, tl.load(amax_ptr + s * M + offs_m, m_mask, 0.0))
    scale = tl.maximum(amax / _FP8_MAX, 1e-12)
    if CODES:  # else the statistics launch wrote them (a calibrated peak): only column 0's part
        _write_codes(x_ptr, sinv_ptr, out_ptr, offs_m, m_mask, pid_k * BLOCK_K + tl.arange(0, BLOCK_K), K, KP,
                     scale, stride_xm, stride_om)  # fmt: skip
    if pid_k == 0:
        _write_scale_and_tail(
            sx_ptr, out_ptr, offs_m, m_mask, scale, KP, KT, RB, stride_om, BLOCK_M, TAIL_PAD
        )
        offs_c = tl.arange(0, 32)
        for r0 in range(0, RB, 32):  # 32 ranks at a time keeps the tile in registers at any rank
            rr = r0 + offs_c
            la = tl.zeros([BLOCK_M, 32], dtype=tl.float32)
            for s in range(n_la):
                la += tl.load(
                    la_ptr + (s * M + offs_m[:, None]) * R + rr[None, :],
                    m_mask[:, None] & (rr < R)[None, :],
                    0.0,
                )
            _write_branch(out_ptr, str_ptr, g_ptr, offs_m, m_mask, rr, la, scale,
                          KP, R, RB, S, rows_per_sample, stride_sm, stride_om)  # fmt: skip


#: The finishing launch's tile when the statistics launch wrote the codes (``BLOCK_K`` unused):
#: 16-row blocks, as 64-row ones left it latency-bound (9 us at rank 32, M = 4608, H100).
_FINISH = {"BLOCK_M": 16, "BLOCK_K": 64, "num_warps": 4}


@dataclass
class FixedPeak:
    """A calibrated activation peak for the statistics launch: ``peak [1]`` fp32 (the codes'
    scale is ``peak / 448``), ``xq [M, total_k]`` FP8 that receives the codes, and ``seen [1]``
    fp32 raised to the batch's largest ``|x * smooth_inv|``."""

    peak: torch.Tensor
    xq: torch.Tensor
    seen: torch.Tensor


@dataclass
class RowStats:
    """The statistics launch's partials: ``amax [splits, M]`` and ``la [splits, M, R]`` fp32,
    of which the first ``used`` splits hold the row maxima and ``x @ l1`` of their K slices
    (``la_slices`` of ``la`` where given: one where ``branch_by_cublas``);
    with one scale for all rows (``one_scale``, ``scaling="tensor"``) ``amax [1]`` holds the
    largest row maximum instead (no per-row maxima are kept)."""

    amax: torch.Tensor
    la: torch.Tensor
    used: int
    one_scale: bool = False
    #: Slices of ``la`` that hold ``x @ l1`` when not ``used`` (1: cuBLAS computed it whole).
    la_slices: int | None = None

    @property
    def la_parts(self) -> int:
        """How many leading slices of ``la`` to add up for ``x @ l1``."""
        return self.used if self.la_slices is None else self.la_slices


def row_stats_triton(
    x: torch.Tensor,
    smooth_inv: torch.Tensor,
    l1: torch.Tensor,
    config: dict | None = None,
    scaling: str = "row",
    fixed: FixedPeak | None = None,
) -> RowStats:
    """The first launch: per-slice row maxima of ``|x * smooth_inv|`` and partials of ``x @ l1``.

    ``x [M, K]`` row-major bf16, ``smooth_inv [K]`` fp32, ``l1 [K, R]`` bf16 (R may be 0).
    ``config``: the statistics kernel's meta-parameters plus ``num_warps`` / ``num_stages``.
    ``scaling="tensor"``: the largest row maximum only (``RowStats.one_scale``).  ``fixed``
    (``"tensor"`` only): the calibrated peak; the launch also writes the codes into
    ``fixed.xq`` and raises ``fixed.seen`` to the batch's peak, and the returned
    ``RowStats.amax`` is ``fixed.peak`` (what the codes were scaled by).
    """
    tensor = check_scaling(scaling) == "tensor"
    check_act_peak(scaling, None if fixed is None else fixed.peak)
    m, k = x.shape
    whole_branch = l1 if branch_by_cublas(m, l1.shape[1]) else None
    r = 0 if whole_branch is not None else l1.shape[1]  # the ranks the launch's own dot covers
    l1 = l1 if r else l1.new_zeros(k, 1)
    # Partial buffers for the most splits autotuning may pick (or the forced config's).
    r_pad = max(16, triton.next_power_of_2(max(r, 1)))
    tiles = _prune_stats(_row_stats_kernel.configs, {}, R_PAD=r_pad, M_BUCKET=_bucket(m))
    splits = max(c.kwargs["SPLITS"] for c in tiles) if config is None else config["SPLITS"]
    la = torch.empty(splits, m, max(r, 1), device=x.device, dtype=torch.float32)
    if fixed is not None:  # the batch's peak goes to the caller's record; amax is not written
        amax = fixed.seen
    elif tensor:  # the atomic maximum starts from zero; no per-row maxima are written
        amax = torch.zeros(1, device=x.device, dtype=torch.float32)
    else:
        amax = torch.empty(splits, m, device=x.device, dtype=torch.float32)
    out, peak = (fixed.xq, fixed.peak) if fixed is not None else (x, amax)  # unread without codes
    kp = -(-k // 64) * 64
    strides = (x.stride(0), l1.stride(0), out.stride(0))

    def stats_grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]), meta["SPLITS"])

    used = launch_autotuned(
        _row_stats_kernel,
        stats_grid,
        (x, smooth_inv, l1, amax, la, amax, out, peak, *(m, k, kp, max(r, 1), _bucket(m)), *strides),
        {
            "R_PAD": r_pad,
            "DOT_DTYPE": branch_dot_dtype(),
            "TENSOR": tensor,
            "CODES": fixed is not None,
        },
        config,
        "SPLITS",
    )
    if whole_branch is None:
        return RowStats(peak if fixed is not None else amax, la, used, tensor)
    la = branch_input(x, whole_branch).unsqueeze(0)
    return RowStats(peak if fixed is not None else amax, la, used, tensor, la_slices=1)


def branch_input(x: torch.Tensor, l1: torch.Tensor) -> torch.Tensor:
    """``x @ l1`` in fp32 ``[M, R]`` from operands rounded to bf16, as the launch's own dot and
    ``reference_prefill`` round them (cuBLAS with fp32 output on the GPU)."""
    x16, l16 = x.to(torch.bfloat16), l1.to(torch.bfloat16)
    if x.is_cuda:
        return torch.mm(x16, l16, out_dtype=torch.float32)
    return x16.float() @ l16.float()  # the interpreter's tests: the same sums in fp32


def row_codes_triton(
    x: torch.Tensor,
    smooth_inv: torch.Tensor,
    stats: RowStats,
    r: int,
    strength: torch.Tensor,
    rows_per_sample: int,
    g: torch.Tensor,
    config: dict | None = None,
    written: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The second launch: (``xq [M, total_k]`` FP8, ``row_scale [M, 1]`` fp32) from ``stats``.

    ``r`` is the branch's rank (``l1.shape[1]``); ``strength [S, r]`` and ``g [r]`` fp32 as in
    ``quantize_act_rowwise_split_triton``.  ``config``: the codes kernel's meta-parameters
    plus ``num_warps``.  One scale for all rows when ``stats.one_scale``.  ``written``: the
    ``xq`` whose codes the statistics launch already wrote (a calibrated peak); then one
    program per row block writes only the scales, the branch blocks and the tail.
    """
    m, k = x.shape
    rb = branch_block(r)
    kp = -(-k // 64) * 64
    kt = total_k(kp, r)
    xq = torch.empty(m, kt, device=x.device, dtype=torch.float8_e4m3fn) if written is None else written
    sx = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    g = g if r else torch.ones(1, device=x.device)
    if written is not None:  # a small launch, not worth tuning: 64-row blocks, 32 ranks at a time
        config = config or dict(_FINISH)

    def codes_grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(kp, meta["BLOCK_K"]) if written is None else 1)

    codes = _row_codes_kernel if config is None else _row_codes_kernel.fn
    codes[codes_grid](
        x, smooth_inv, stats.amax, stats.la, strength, g, xq, sx, stats.amax,
        m, k, kp, kt, r, rb, strength.shape[0], max(rows_per_sample, 1), _bucket(m), stats.used,
        stats.la_parts, x.stride(0), strength.stride(0), xq.stride(0),
        TAIL_PAD=K_ALIGN, TENSOR=stats.one_scale, CODES=written is None, **(config or {}),
    )  # fmt: skip
    return xq, sx


def _bucket(m: int) -> int:
    """The autotuning key's row bucket."""
    return min(triton.next_power_of_2(max(m, 16)), 8192)


def quantize_act_rowwise_split_triton(
    x: torch.Tensor,
    smooth_inv: torch.Tensor,
    l1: torch.Tensor,
    strength: torch.Tensor,
    rows_per_sample: int,
    g: torch.Tensor,
    config: dict | None = None,
    scaling: str = "row",
    act_peak: torch.Tensor | None = None,
    act_seen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``xq [M, total_k]`` FP8, ``row_scale [M, 1]`` fp32); ``x [M, K]`` row-major, as the reference.

    ``l1 [K, R]`` bf16, ``strength [S, R]`` fp32, ``g [R]`` fp32 (``prefill_scales``).  ``config``:
    ``{"stats": {...}, "codes": {...}}`` with each kernel's meta-parameters and ``num_warps`` (and
    ``num_stages`` for the statistics) skips autotuning (tests, the interpreter).  ``scaling``:
    ``reference_prefill.SCALINGS``.

    ``act_peak [1]`` fp32 (``"tensor"`` only): a calibrated peak, the reference's
    ``quantize_act_rowwise(..., "tensor", act_peak, act_seen)``.  The activations' one scale is
    ``act_peak / 448``, so X is read once: the statistics launch writes the codes (saturated at
    +-448) beside its row maxima and ``x @ l1`` partials, and the second launch writes only the
    row scales, the branch blocks and the zero tail (``config["codes"]`` then takes its
    ``BLOCK_M`` and ``num_warps``).  ``act_seen [1]`` fp32, when given, is raised to the
    batch's largest ``|x * smooth_inv|`` (an atomic max; compare it with ``act_peak`` to see
    saturation).
    """
    fixed = written = None
    if act_peak is not None:
        m, k = x.shape
        written = torch.empty(
            m, total_k(-(-k // 64) * 64, l1.shape[1]), device=x.device, dtype=torch.float8_e4m3fn
        )
        seen = torch.zeros(1, device=x.device) if act_seen is None else act_seen
        fixed = FixedPeak(act_peak.float().reshape(1), written, seen)
    stats = row_stats_triton(x, smooth_inv, l1, config["stats"] if config else None, scaling, fixed)
    return row_codes_triton(
        x, smooth_inv, stats, l1.shape[1], strength, rows_per_sample, g, config["codes"] if config else None,
        written,
    )  # fmt: skip
