"""Triton main GEMM: 4-bit weights unpacked to FP8 in registers, FP8 tensor-core dot.

The kernel computes ``C^T = W X^T`` so the unpacked weight tile is the first dot operand
(held in registers) while activation tiles stream through shared memory (measured ~25%
faster on H100 than the other order, see shared/KERNEL-FACTS.md).  Per group of 64 along
K: two K=32 FP8 dots (the low and high nibbles of the packed bytes are the two contiguous
halves of the group, so no interleave is needed), then ``acc += d * wscale[n] * xscale[m]``
in fp32.  Epilogue: ``acc += l2 @ lora_act^T`` (bf16 dot, the strengths are already in
``lora_act``), bias, bf16 store.

Split-K (for small M): each K slice adds its fp32 partial tile into a workspace with
atomics; the slice that arrives last (per-tile counter) runs the epilogue, writes the
output and zeroes the workspace tile and counter again, so one launch does everything.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from studio.kernels.quant_act import branch_dot_dtype
from studio.kernels.split_k_scratch import zeroed_scratch


def _configs() -> list[triton.Config]:
    out = []
    for bn, bm, warps, stages in [
        (128, 128, 8, 3),
        (128, 256, 8, 3),
        (256, 128, 8, 3),
        (128, 128, 4, 4),
        (128, 64, 4, 4),
    ]:
        out.append(
            triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "SPLIT_K": 1}, num_warps=warps, num_stages=stages)
        )
    for bn, bm, split in [(64, 16, 1), (64, 16, 2), (64, 16, 4), (128, 16, 4), (64, 32, 2), (64, 64, 2)]:
        out.append(triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "SPLIT_K": split}, num_warps=4, num_stages=4))
    return out


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    m = named_args["M"]
    if m <= 64:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))]
    else:
        keep = [c for c in configs if c.kwargs["SPLIT_K"] == 1 and c.kwargs["BLOCK_M"] >= 64]
    return keep or configs[:1]


@triton.jit
def _unpack(codes, FP4: tl.constexpr):
    """4-bit codes (uint8 0..15) -> FP8 E4M3 values (see reference.py for the formats)."""
    if FP4:
        byte = ((codes & 0x8) << 4) | ((codes & 0x7) << 2)
        return byte.to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    # 0x6400 | u is the fp16 1024 + u; subtracting 1032 leaves u - 8 exactly.
    half = (codes.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
    return half.to(tl.float8e4nv)


@triton.autotune(
    configs=_configs(), key=["M_BUCKET", "N", "KG", "FP4"], prune_configs_by={"early_config_prune": _prune}
)
@triton.jit
def _w4_gemm_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, la_ptr, l2_ptr, bias_ptr, out_ptr, acc_ptr, cnt_ptr,
    M, N, KG, R, M_BUCKET,
    stride_xqm, stride_xsg, stride_wg, stride_wn, stride_wsg, stride_lam, stride_l2n, stride_om,
    FP4: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    GROUP_RESCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.cdiv(M, BLOCK_M)
    # Grouped order: 8 consecutive programs walk down N for one strip of M rows.
    group = 8 * num_m
    first_n = (pid // group) * 8
    size_n = tl.minimum(num_n - first_n, 8)
    pid_n = first_n + (pid % group) % size_n
    pid_m = (pid % group) // size_n

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    offs_j = tl.arange(0, 32)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_j[None, :]
    x_ptrs = xq_ptr + offs_m[:, None] * stride_xqm + offs_j[None, :]

    per = tl.cdiv(KG, SPLIT_K)
    g0 = pid_k * per
    g1 = tl.minimum(g0 + per, KG)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    # The weight path is not a plain dot operand, so Triton's pipeliner leaves its loads
    # exposed; prefetch the next group's bytes and scales into registers by hand.
    n_lim = tl.where(g0 < g1, N, 0)
    m_lim = tl.where(g0 < g1, M, 0)
    wb_next = tl.load(w_ptrs + g0 * stride_wg, mask=(offs_n < n_lim)[:, None], other=0)
    wsc_next = tl.load(ws_ptr + g0 * stride_wsg + offs_n, mask=offs_n < n_lim, other=0.0)
    xsc_next = tl.load(xs_ptr + g0 * stride_xsg + offs_m, mask=offs_m < m_lim, other=0.0)
    for g in range(g0, g1):
        wb, wsc, xsc = wb_next, wsc_next, xsc_next
        n_lim = tl.where(g + 1 < g1, N, 0)
        m_lim = tl.where(g + 1 < g1, M, 0)
        wb_next = tl.load(w_ptrs + (g + 1) * stride_wg, mask=(offs_n < n_lim)[:, None], other=0)
        wsc_next = tl.load(ws_ptr + (g + 1) * stride_wsg + offs_n, mask=offs_n < n_lim, other=0.0)
        xsc_next = tl.load(xs_ptr + (g + 1) * stride_xsg + offs_m, mask=offs_m < m_lim, other=0.0)
        x0 = tl.load(x_ptrs + g * 64, mask=m_mask[:, None], other=0.0)
        x1 = tl.load(x_ptrs + g * 64 + 32, mask=m_mask[:, None], other=0.0)
        if GROUP_RESCALE:
            d = tl.dot(_unpack(wb & 0xF, FP4), tl.trans(x0))
            d = tl.dot(_unpack(wb >> 4, FP4), tl.trans(x1), d)
            acc += d * (wsc[:, None] * xsc[None, :])
        else:  # timing probe only (bench/diag_gemm.py): wrong maths, no per-group rescale
            acc = tl.dot(_unpack(wb & 0xF, FP4), tl.trans(x0), acc)
            acc = tl.dot(_unpack(wb >> 4, FP4), tl.trans(x1), acc)

    tile_mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K > 1:
        part_ptrs = acc_ptr + offs_m[None, :] * N + offs_n[:, None]
        tl.atomic_add(part_ptrs, acc, mask=tile_mask, sem="relaxed")
        tl.debug_barrier()
        tile = pid_m * num_n + pid_n
        prev = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if prev == SPLIT_K - 1:
            tl.debug_barrier()
            acc = tl.load(part_ptrs, mask=tile_mask, other=0.0, cache_modifier=".cg")
            tl.store(part_ptrs, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), mask=tile_mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)
            _epilogue(acc, offs_n, offs_m, n_mask, m_mask, la_ptr, l2_ptr, bias_ptr, out_ptr, R,
                      stride_lam, stride_l2n, stride_om, HAS_BIAS, DOT_DTYPE)  # fmt: skip
    else:
        _epilogue(acc, offs_n, offs_m, n_mask, m_mask, la_ptr, l2_ptr, bias_ptr, out_ptr, R,
                  stride_lam, stride_l2n, stride_om, HAS_BIAS, DOT_DTYPE)  # fmt: skip


@triton.jit
def _epilogue(acc, offs_n, offs_m, n_mask, m_mask, la_ptr, l2_ptr, bias_ptr, out_ptr, R,
              stride_lam, stride_l2n, stride_om, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr):  # fmt: skip
    offs_r = tl.arange(0, 16)
    for r0 in range(0, R, 16):
        rr = r0 + offs_r
        r_mask = rr < R
        l2 = tl.load(
            l2_ptr + offs_n[:, None] * stride_l2n + rr[None, :], n_mask[:, None] & r_mask[None, :], 0.0
        )
        la = tl.load(
            la_ptr + offs_m[:, None] * stride_lam + rr[None, :], m_mask[:, None] & r_mask[None, :], 0.0
        )
        acc = tl.dot(l2.to(DOT_DTYPE), tl.trans(la.to(DOT_DTYPE)), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[:, None]
    out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


def _bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 16)), 8192)


def gemm_w4_triton(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    fmt: str,
    lora_act: torch.Tensor,
    l2: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: dict | None = None,
    group_rescale: bool = True,
) -> torch.Tensor:
    """Launch the GEMM; ``config`` (BLOCK_N, BLOCK_M, SPLIT_K, num_warps, num_stages) skips autotuning."""
    m = xq.shape[0]
    kg, n, _ = qweight.shape
    r = l2.shape[1]
    out = torch.empty(m, n, device=xq.device, dtype=out_dtype)
    acc, cnt = zeroed_scratch(xq.device, m * n, m * n // 256 + 1)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    kernel = _w4_gemm_kernel if config is None else _w4_gemm_kernel.fn
    kernel[grid](
        xq, xscale, qweight, wscale, lora_act, l2, bias if bias is not None else wscale, out, acc, cnt,
        m, n, kg, r, _bucket(m),
        xq.stride(0), xscale.stride(0), qweight.stride(0), qweight.stride(1), wscale.stride(0),
        lora_act.stride(0), l2.stride(0), out.stride(0),
        FP4=fmt == "fp4", HAS_BIAS=bias is not None, DOT_DTYPE=branch_dot_dtype(), GROUP_RESCALE=group_rescale, **(config or {}),
    )  # fmt: skip
    return out
