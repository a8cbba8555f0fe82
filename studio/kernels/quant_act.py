"""Triton pre-pass: one read of X gives FP8 activations, their scales and ``lora_act``.

Each program owns ``BLOCK_M`` rows and a slice of the K groups (grid axis 1,
for small M where one program per row block would leave the GPU idle).  Per group of 64
it loads X once, scales by ``smooth_inv``, writes FP8 codes and the per-(row, group)
scale, and accumulates ``X @ l1`` for the low-rank branch.  Slices add their partial
``lora_act`` with atomics (the buffer is zeroed by the launcher), already multiplied by
the strength row, which is exact because the branch is linear.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from studio.kernels.reference import GROUP


def _configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=st)
        # num_stages > 1 with BLOCK_M = 64 lost one K group of lora_act on H100 / Triton 3.6
        # (bench/diag_prepass.py); the loop prefetches by hand instead.
        for bm, w, st in [(16, 4, 1), (32, 4, 1), (32, 4, 3), (64, 4, 1), (64, 8, 1)]
    ]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    m = named_args["M"]
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))]
    return keep or configs[:1]


@triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "K", "R_PAD"],
    prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["la_ptr"],
)
@triton.jit
def _quant_act_kernel(
    x_ptr, sinv_ptr, l1_ptr, str_ptr, xq_ptr, xs_ptr, la_ptr,
    M, K, KG, R, S, rows_per_sample, M_BUCKET,
    stride_xm, stride_l1k, stride_sm, stride_xqm, stride_xsg, stride_lam,
    R_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, 64)
    offs_r = tl.arange(0, R_PAD)
    m_mask = offs_m < M
    r_mask = offs_r < R
    split = tl.num_programs(1)
    per = tl.cdiv(KG, split)
    g0 = pid_s * per
    g1 = tl.minimum(g0 + per, KG)
    la = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    # Loads of group g + 1 are issued before group g is used (register double buffer);
    # Triton's own pipelining of this loop lost a group with BLOCK_M = 64 (see configs).
    kk = g0 * 64 + offs_k
    x_next = tl.load(
        x_ptr + offs_m[:, None] * stride_xm + kk[None, :], m_mask[:, None] & (kk < K)[None, :], 0.0
    )
    sinv_next = tl.load(sinv_ptr + kk, kk < K, 0.0)
    l1_next = tl.load(
        l1_ptr + kk[:, None] * stride_l1k + offs_r[None, :], (kk < K)[:, None] & r_mask[None, :], 0.0
    )
    for g in range(g0, g1):
        x, sinv, l1 = x_next, sinv_next, l1_next
        kk = g * 64 + offs_k
        kn = kk + 64
        k_ok = kn < tl.minimum(K, g1 * 64)  # inside K and inside this program's slice
        x_next = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + kn[None, :], m_mask[:, None] & k_ok[None, :], 0.0
        )
        sinv_next = tl.load(sinv_ptr + kn, k_ok, 0.0)
        l1_next = tl.load(
            l1_ptr + kn[:, None] * stride_l1k + offs_r[None, :], k_ok[:, None] & r_mask[None, :], 0.0
        )
        xs = x.to(tl.float32) * sinv[None, :]
        scale = tl.maximum(tl.max(tl.abs(xs), axis=1) / 448.0, 1e-12)
        q = (xs / scale[:, None]).to(tl.float8e4nv)
        # Columns past K hold x = 0, so the padded tail of xq is written as zeros.
        tl.store(xq_ptr + offs_m[:, None] * stride_xqm + kk[None, :], q, m_mask[:, None])
        tl.store(xs_ptr + g * stride_xsg + offs_m, scale, m_mask)
        la = tl.dot(x.to(DOT_DTYPE), l1.to(DOT_DTYPE), la)
    srow = (offs_m // rows_per_sample) % S
    strength = tl.load(
        str_ptr + srow[:, None] * stride_sm + offs_r[None, :], m_mask[:, None] & r_mask[None, :], 0.0
    )
    la = la * strength
    la_ptrs = la_ptr + offs_m[:, None] * stride_lam + offs_r[None, :]
    la_mask = m_mask[:, None] & r_mask[None, :]
    if split == 1:
        tl.store(la_ptrs, la, la_mask)
    else:
        tl.atomic_add(la_ptrs, la, la_mask)


def branch_dot_dtype() -> tl.constexpr:
    """bf16 for the low-rank dots; fp16 under TRITON_INTERPRET (its bf16 dot is broken)."""
    return tl.float16 if os.environ.get("TRITON_INTERPRET") == "1" else tl.bfloat16


def _pick_split(m: int, kg: int, block_m: int) -> int:
    blocks = triton.cdiv(m, block_m)
    if blocks >= 64:
        return 1
    return max(1, min(kg // 4, triton.cdiv(128, blocks)))


def quantize_act_triton(
    x: torch.Tensor,
    smooth_inv: torch.Tensor,
    l1: torch.Tensor,
    strength: torch.Tensor,
    rows_per_sample: int,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the pre-pass; ``config`` (BLOCK_M, num_warps, num_stages) skips autotuning."""
    m, k = x.shape
    kg = -(-k // GROUP)
    r = l1.shape[1]
    xq = torch.empty(m, kg * GROUP, device=x.device, dtype=torch.float8_e4m3fn)
    xs = torch.empty(kg, m, device=x.device, dtype=torch.float32)
    la = torch.zeros(m, max(r, 1), device=x.device, dtype=torch.float32)  # atomics add into it

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]), _pick_split(m, kg, meta["BLOCK_M"]))

    kernel = _quant_act_kernel if config is None else _quant_act_kernel.fn
    kernel[grid](
        x, smooth_inv, l1, strength, xq, xs, la,
        m, k, kg, r, strength.shape[0], max(rows_per_sample, 1), min(triton.next_power_of_2(max(m, 16)), 8192),
        x.stride(0), l1.stride(0), strength.stride(0), xq.stride(0), xs.stride(0), la.stride(0),
        R_PAD=max(16, triton.next_power_of_2(r)), DOT_DTYPE=branch_dot_dtype(), **(config or {}),
    )  # fmt: skip
    return xq, xs, la[:, :r]
