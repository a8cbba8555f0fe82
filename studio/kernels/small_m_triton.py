"""Triton kernels of the small-M path: split-K bf16 x 4-bit GEMM with the branch, then a sum.

The maths and the reasons are in ``reference_small_m.py`` (the oracle).  Program
``(pid_n, pid_k)`` owns ``BLOCK_N`` output channels and one run of groups along K; per
group of 64 it loads the packed codes ``[BLOCK_N, 32]`` once (the bytes that bound this
path), decodes both nibbles to bf16, takes two K = 32 dots with the bf16 activations and
scales the partial sums by the group scale in fp32.  The branch input ``x @ l1`` comes from
one cuBLAS call before (``[M, R]``, a few KB); the programs of the first K split multiply
it by the strengths and meet ``l2`` in one more dot.  (Computing ``x @ l1`` inside the
split loop instead made every column block re-read ``l1`` from L2: with 96 ranks that was
three times the 4-bit weight bytes, +17-48 % time on H100.)  ``_sum_splits_kernel`` then
adds the ``SPLIT_K`` partial outputs and the bias.  ``reduce="atomic"`` instead adds each
split's partial into the fused path's zeroed fp32 workspace with atomics and lets the split
that arrives last (per column-block counter) add the bias and write the output: one launch
fewer and no ``SPLIT_K x M x N`` partials in memory (at M = 64, N = 3072, 16 splits, those are
12.6 MB against 4.7 MB of 4-bit weights); ``bench/diag_small_m.py`` times both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from studio.kernels.autotuned_launch import launch_autotuned
from studio.kernels.gemm_w4_triton import _workspace
from studio.kernels.prefill_triton import _decode
from studio.kernels.quant_act import branch_dot_dtype


def _split_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_N": bn, "SPLIT_K": sk}, num_warps=w, num_stages=st)
        for bn, sk, w, st in [
            (32, 4, 4, 3),
            (64, 2, 4, 3),
            (64, 4, 4, 4),
            (64, 8, 4, 4),
            (128, 4, 4, 4),
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


@triton.autotune(
    configs=_split_configs(),
    key=["M_BUCKET", "N", "KG", "R_PAD", "ATOMIC_SUM"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _w4_small_m_kernel(
    x_ptr, sinv_ptr, q_ptr, ws_ptr, la_ptr, l2_ptr, str_ptr, bias_ptr, part_ptr, cnt_ptr, out_ptr,
    M, K, N, KG, R, S, rows_per_sample, M_BUCKET,
    stride_xm, stride_qg, stride_qn, stride_wsg, stride_lam, stride_l2n, stride_sm, stride_om,
    FP4: tl.constexpr, HAS_BRANCH: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ATOMIC_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, 32)
    offs_r = tl.arange(0, R_PAD)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    per_split = tl.cdiv(KG, SPLIT_K)
    g_end = tl.minimum(pid_k * per_split + per_split, KG)
    for grp in range(pid_k * per_split, g_end):
        k_lo = grp * 64 + offs_j
        xmask_lo = m_mask[:, None] & (k_lo < K)[None, :]
        xmask_hi = m_mask[:, None] & (k_lo + 32 < K)[None, :]
        x_lo = tl.load(x_ptr + offs_m[:, None] * stride_xm + k_lo[None, :], xmask_lo, 0.0).to(tl.float32)
        x_hi = tl.load(x_ptr + offs_m[:, None] * stride_xm + k_lo[None, :] + 32, xmask_hi, 0.0).to(tl.float32)
        s_lo = tl.load(sinv_ptr + k_lo, k_lo < K, 0.0)
        s_hi = tl.load(sinv_ptr + k_lo + 32, k_lo + 32 < K, 0.0)
        packed = tl.load(
            q_ptr + grp * stride_qg + offs_n[:, None] * stride_qn + offs_j[None, :], n_mask[:, None], 0
        )
        w_lo = _decode(packed & 0xF, FP4).to(DOT_DTYPE)
        w_hi = _decode(packed >> 4, FP4).to(DOT_DTYPE)
        part = tl.dot((x_lo * s_lo[None, :]).to(DOT_DTYPE), tl.trans(w_lo))
        part = tl.dot((x_hi * s_hi[None, :]).to(DOT_DTYPE), tl.trans(w_hi), part)
        ws = tl.load(ws_ptr + grp * stride_wsg + offs_n, n_mask, 0.0)
        acc += part * ws[None, :]
    if HAS_BRANCH and pid_k == 0:
        r_mask = offs_r < R
        srow = (offs_m // rows_per_sample) % S
        st = tl.load(
            str_ptr + srow[:, None] * stride_sm + offs_r[None, :], m_mask[:, None] & r_mask[None, :], 0.0
        )
        la = tl.load(
            la_ptr + offs_m[:, None] * stride_lam + offs_r[None, :], m_mask[:, None] & r_mask[None, :], 0.0
        )
        l2 = tl.load(
            l2_ptr + offs_n[:, None] * stride_l2n + offs_r[None, :], n_mask[:, None] & r_mask[None, :], 0.0
        )
        acc = tl.dot((la.to(tl.float32) * st).to(DOT_DTYPE), tl.trans(l2.to(DOT_DTYPE)), acc)
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, n_mask, 0.0)[None, :]
        tl.store(
            out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask
        )
    elif ATOMIC_SUM:  # the workspace is zero between launches; the last split leaves it so
        ws_tile = part_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_tile, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()
        if tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel") == SPLIT_K - 1:
            tl.debug_barrier()
            total = tl.load(ws_tile, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(ws_tile, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), mask=mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, n_mask, 0.0)[None, :]
            tl.store(
                out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                total.to(out_ptr.dtype.element_ty),
                mask,
            )
    else:
        dst = part_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :]
        tl.store(dst, acc, mask)


@triton.jit
def _sum_splits_kernel(
    part_ptr, bias_ptr, out_ptr, M, N, stride_om,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        total += tl.load(part_ptr + s * M * N + offs, mask, 0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + offs % N, mask, 0.0)
    row, col = offs // N, offs % N
    tl.store(out_ptr + row * stride_om + col, total.to(out_ptr.dtype.element_ty), mask)


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
    reduce: str = "splits",
) -> torch.Tensor:
    """``[M, N]`` in ``x.dtype``; shapes as ``studio.kernels.w4_linear``, ``M <= 64`` expected.

    ``config`` (BLOCK_N, SPLIT_K, num_warps, num_stages) skips autotuning (tests, the interpreter).
    ``reduce``: how the K splits are added: ``"splits"`` (partials, then ``_sum_splits_kernel``)
    or ``"atomic"`` (in the kernel, see the module docstring).
    """
    if reduce not in ("splits", "atomic"):
        raise ValueError(f"reduce must be 'splits' or 'atomic', not {reduce!r}")
    x = x.contiguous()
    m, k = x.shape
    kg, n, _ = qweight.shape
    r = l1.shape[1]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    # The branch input: one bf16 GEMM (fp32 accumulation), rounded to bf16 as the reference does.
    la = x.to(torch.bfloat16) @ l1.to(torch.bfloat16) if r else x.new_zeros(m, 1, dtype=torch.bfloat16)
    if reduce == "atomic":
        part, cnt = _workspace(x.device, m, n, tiles=triton.cdiv(n, 16))
    else:  # room for the most splits autotuning may pick (or the forced config's)
        splits = max(c.kwargs["SPLIT_K"] for c in _split_configs()) if config is None else config["SPLIT_K"]
        part, cnt = torch.empty(splits, m, n, device=x.device, dtype=torch.float32), out
    l2 = l2 if r else l2.new_zeros(n, 1)
    bias_t = bias.float().contiguous() if bias is not None else out

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    split = launch_autotuned(
        _w4_small_m_kernel,
        grid,
        (
            x, smooth_inv, qweight, wscale, la, l2, strength, bias_t, part, cnt, out,
            m, k, n, kg, r, strength.shape[0], max(rows_per_sample, 1), triton.next_power_of_2(max(m, 16)),
            x.stride(0), qweight.stride(0), qweight.stride(1), wscale.stride(0), la.stride(0), l2.stride(0),
            strength.stride(0), out.stride(0),
        ),
        dict(
            FP4=fmt == "fp4", HAS_BRANCH=r > 0, HAS_BIAS=bias is not None,
            R_PAD=max(16, triton.next_power_of_2(max(r, 1))), DOT_DTYPE=branch_dot_dtype(),
            ATOMIC_SUM=reduce == "atomic", BLOCK_M=max(16, triton.next_power_of_2(m)),
        ),
        config,
        "SPLIT_K",
    )  # fmt: skip
    if split > 1 and reduce == "splits":
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](
            part, bias_t, out, m, n, out.stride(0), SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block
        )
    return out
