"""The large-M path's FP8 GEMM with the 4-bit weight expanded inside the kernel (opt-in).

``prefill_triton.w4_linear_prefill_triton`` expands the packed weight into an FP8 copy
``wq [N, total_k]`` (a launch that reads 4 bits and writes 8 bits per weight) and hands it to
cuBLAS's ``_scaled_mm``, which reads the 8 bits again.  Here the GEMM's weight operand is
expanded tile by tile in registers (``prefill_triton._expanded_rows``, the expansion's own
code, so the dot sees the same FP8 bits as cuBLAS does) and no FP8 copy of the weight is
made; only the branch columns past the codes come from a small precomputed buffer
(``expand_weight_triton(..., branch_only=True)``).  Few rows make few tiles, so the K loop may
be split (``SPLIT_K``): each slice stores its partial tile and the last to arrive adds them in
slice order, so the result does not change from launch to launch.

cuBLAS has no GEMM that takes 4-bit operands on Hopper and torch has none that unpacks them
on the fly, hence a Triton kernel.  Same result as ``_scaled_mm`` on the expanded weight up to
the fp32 summation order.  On H100 (``bench/bench_expand_gemm.py``, docs/results.md) the
expansion in registers costs about what the separate expansion launch does, and Triton's
mixed-input GEMM runs slower than cuBLAS: the layer won only at 128 rows on 3072x12288 and
12288x3072 (1.15-1.18x) and lost elsewhere, so it takes cuBLAS unless told
(``prefill_triton.DEFAULT_GEMM``; ``w4_linear_prefill_triton(..., gemm="expand")``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from studio.kernels.prefill_triton import _expanded_rows
from studio.kernels.split_k_scratch import partials_scratch, zeroed_scratch

#: Split-K partials are fp32 tiles of the whole output per slice; bounded so that the scratch
#: stays small (16 MB): only grids of few tiles (a few hundred rows) are split.
SPLIT_FLOATS = 4 << 20


def split_fits(split: int, m: int, n: int) -> bool:
    """Whether ``split`` K slices of an ``m`` x ``n`` output fit the split-K scratch."""
    return split == 1 or split * triton.next_power_of_2(max(m, 16)) * n <= SPLIT_FLOATS


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Row blocks no taller than the rows (at least 64, the smallest wgmma tile); K slices only
    where their partials fit ``SPLIT_FLOATS``."""
    m = int(kwargs.get("M_BUCKET", named_args.get("M_BUCKET", 64)))
    n = int(kwargs.get("N", named_args.get("N", 1)))
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, m) and split_fits(c.kwargs["SPLIT_K"], m, n)]
    return keep or configs[:1]


def _config(bm: int, bn: int, groups: int, warps: int, stages: int, split: int = 1) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "GROUPS": groups, "SPLIT_K": split}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


# The tiles that were best somewhere in bench/bench_expand_gemm.py --every-config (H100, 128-1024
# rows, FLUX shapes).  Not kept: 64 x 128, 128 x 256 and one-group tiles (never best), and two
# dots on the low / high nibble halves of X instead of interleaving the codes (never best).
@triton.autotune(
    configs=[
        _config(64, 64, 2, 4, 4),
        _config(128, 64, 2, 4, 4),
        _config(128, 128, 2, 8, 3),
        _config(256, 128, 2, 8, 3),
        # K slices for grids of few tiles: the expansion in registers is most of the work, so
        # every SM should take a share
        _config(64, 64, 2, 4, 4, 2),
        _config(64, 64, 2, 4, 4, 4),
        _config(128, 64, 2, 4, 4, 2),
        _config(128, 64, 2, 4, 4, 4),
    ],
    key=["M_BUCKET", "N", "KG", "KB"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _expand_gemm_kernel(
    xq_ptr, sx_ptr, q_ptr, ws_ptr, cs_ptr, wb_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
    M, N, KG, KB, M_BUCKET,
    stride_xm, stride_qg, stride_qn, stride_wsg, stride_wbn, stride_om,
    FP4: tl.constexpr, ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    # The row blocks of one column block are neighbours in the grid: they run together and
    # read that block's 4-bit codes from DRAM once, the rest from L2.
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    cs = tl.load(cs_ptr + offs_n, n_mask, 1.0)
    inv = 1.0 / cs  # as the expansion's programs compute it: the same FP8 codes
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    kp = KG * 64
    steps = tl.cdiv(KG, GROUPS)
    per = tl.cdiv(steps, SPLIT_K)
    for kb in range(pid_k * per, tl.minimum(pid_k * per + per, steps)):
        cols = kb * GROUPS * 64 + tl.arange(0, GROUPS * 64)
        a = tl.load(
            xq_ptr + offs_m[:, None] * stride_xm + cols[None, :], m_mask[:, None] & (cols < kp)[None, :], 0.0
        )
        w = _expanded_rows(q_ptr, ws_ptr, offs_n, n_mask, inv, kb, KG, stride_qg, stride_qn, stride_wsg,
                           FP4, BLOCK_N, GROUPS)  # fmt: skip
        acc = tl.dot(a, tl.trans(w), acc)
    if pid_k == SPLIT_K - 1:  # the branch blocks and the zero tail (KB is a multiple of 64)
        for c0 in range(0, KB, 64):
            cols = c0 + tl.arange(0, 64)
            a = tl.load(xq_ptr + offs_m[:, None] * stride_xm + kp + cols[None, :], m_mask[:, None], 0.0)
            b = tl.load(wb_ptr + offs_n[:, None] * stride_wbn + cols[None, :], n_mask[:, None], 0.0)
            acc = tl.dot(a, tl.trans(b), acc)
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        # Each slice stores its partial tile; the last to arrive (a counter per tile) adds them
        # in slice order, so the sum is the same every launch, and resets the counter.
        tile = offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + pid_k * M * N + tile, acc, mask)
        tl.debug_barrier()
        if tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel") == SPLIT_K - 1:
            tl.debug_barrier()
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(SPLIT_K):
                acc += tl.load(part_ptr + s * M * N + tile, mask, 0.0, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + pid, 0)
            _epilogue(acc, sx_ptr, cs, bias_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, mask, stride_om,
                      ROW_SCALE, HAS_BIAS)  # fmt: skip
    else:
        _epilogue(acc, sx_ptr, cs, bias_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, mask, stride_om,
                  ROW_SCALE, HAS_BIAS)  # fmt: skip


@triton.jit
def _epilogue(acc, sx_ptr, cs, bias_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, mask, stride_om,
              ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    """``acc * row (or tensor) scale * channel scale + bias``, stored in the output's dtype."""
    if ROW_SCALE:
        acc = acc * tl.load(sx_ptr + offs_m, m_mask, 0.0)[:, None]
    else:
        acc = acc * tl.load(sx_ptr)
    acc = acc * cs[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, n_mask, 0.0).to(tl.bfloat16).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask)


def expand_gemm_triton(
    xq: torch.Tensor,
    sx: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    fmt: str,
    cs: torch.Tensor,
    wb: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: dict | None = None,
) -> torch.Tensor:
    """``(xq @ wq.T) * sx * cs + bias`` with ``wq``'s code columns expanded in the kernel.

    Args:
        xq: ``[M, total_k]`` float8_e4m3fn, row-major: the pre-pass's codes, branch blocks and
            zero tail (``quantize_act_rowwise_split_triton``).
        sx: ``[M, 1]`` fp32 row scales, or ``[1]``, one scale (``scaling="tensor"``).
        qweight: ``[KG, N, 32]`` uint8, two 4-bit codes per byte (layout in reference.py).
        wscale: ``[KG, N]`` fp32 group scales.
        fmt: ``"int4"`` or ``"fp4"``.
        cs: ``[N]`` fp32 channel scales (all equal with ``scaling="tensor"``): from
            ``expand_weight_triton``, whose ``1 / cs`` the codes are expanded with.
        wb: ``[N, total_k - 64 KG]`` float8_e4m3fn, the weight's columns past the codes
            (``expand_weight_triton(..., branch_only=True)``).
        bias: ``[N]`` or None; rounded to bf16 first, as ``_scaled_mm``'s bias is.
        out_dtype: bf16 or fp16 (or fp32).
        config: ``BLOCK_M``, ``BLOCK_N``, ``GROUPS``, ``SPLIT_K``, ``num_warps``, ``num_stages``;
            skips autotuning.
    Returns:
        ``[M, N]`` of ``out_dtype``.
    """
    m = xq.shape[0]
    kg, n, _ = qweight.shape
    kb = xq.shape[1] - kg * 64
    if fmt not in ("int4", "fp4"):
        raise ValueError(f"fmt must be 'int4' or 'fp4', not {fmt!r}")
    if wb.shape != (n, kb) or kb % 64 or cs.shape != (n,) or wscale.shape != (kg, n):
        raise ValueError(
            f"expand_gemm_triton: xq {tuple(xq.shape)}, qweight {tuple(qweight.shape)}, wscale "
            f"{tuple(wscale.shape)}, cs {tuple(cs.shape)}, wb {tuple(wb.shape)} do not fit together"
        )
    row_scale = sx.dim() == 2
    if sx.shape != ((m, 1) if row_scale else (1,)):
        raise ValueError(
            f"sx must be [M, 1] (row scales) or [1] (one scale), not {tuple(sx.shape)} for M = {m}"
        )
    out = torch.empty(m, n, device=xq.device, dtype=out_dtype)
    if m == 0:
        return out
    # partials for the most K slices autotuning may pick (a forced config's, whatever it is)
    fits = [c.kwargs["SPLIT_K"] for c in _expand_gemm_kernel.configs if split_fits(c.kwargs["SPLIT_K"], m, n)]
    most = max(fits) if config is None else config["SPLIT_K"]
    part = partials_scratch(xq.device, most * m * n if most > 1 else 1)
    _, cnt = zeroed_scratch(xq.device, 1, triton.cdiv(m, 64) * triton.cdiv(n, 64))  # left at zero

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    kernel = _expand_gemm_kernel if config is None else _expand_gemm_kernel.fn
    kernel[grid](
        xq, sx, qweight, wscale, cs, wb, bias if bias is not None else cs, out, part, cnt,
        m, n, kg, kb, min(triton.next_power_of_2(max(m, 16)), 8192),
        xq.stride(0), qweight.stride(0), qweight.stride(1), wscale.stride(0), wb.stride(0), out.stride(0),
        FP4=fmt == "fp4", ROW_SCALE=row_scale, HAS_BIAS=bias is not None, **(config or {}),
    )  # fmt: skip
    return out
