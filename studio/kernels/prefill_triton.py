"""Triton kernels of the large-M path: 4-bit weights expanded to FP8, then cuBLAS FP8.

The maths and the reasons are in ``reference_prefill.py`` (the oracle).  Three stages:

1. ``_expand_weight_kernel``: every program first derives, for its ``BLOCK_N`` channels,
   the branch factors ``g[r]`` and the channel scale (the same few flops the reference
   does in torch), then unpacks ``GROUPS`` groups of 64 packed codes into FP8 codes
   re-scaled per channel (``_expand_codes``: one load, whole rows stored); one more grid
   column of programs writes the branch blocks ``[l2_hi | l2_lo | l2_hi]``, the zero tail,
   the channel scales and ``g`` (on top of column 0's codes, as before, they made those
   programs the slowest: 1-4 us at rank 96).
2. the activation pre-pass: by default the two launches of ``prepass_split_triton.py``; or
   ``_rowwise_prepass_kernel`` (``prepass="rows"``): per ``BLOCK_M`` rows, one pass over X for the row maxima
   and ``lora_act = x @ l1`` (bf16 dot), a second pass (mostly L2 hits) writing the FP8
   codes, then ``[a_hi | a_hi | a_lo]`` of ``lora_act * strength / (row_scale * g)``.
3. ``torch._scaled_mm`` with one scale per operand (``scaling="tensor"``, the default: every
   row and channel takes the largest scale; the statistics launch finds the rows' peak with
   an atomic max, the expansion programs derive the weights' from cached peaks) or with row
   scales on X and channel scales on W, bias and bf16 out: cuBLAS's FP8 GEMM, which
   Triton's reached only 83-93 % of (shared/KERNEL-FACTS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from studio.kernels import reference_prefill
from studio.kernels.quant_act import branch_dot_dtype
from studio.kernels.reference import FP8_MAX
from studio.kernels.reference_prefill import (
    K_ALIGN,
    branch_block,
    branch_bound,
    check_scaling,
    residual_max,
    total_k,
    weight_peaks,
)

_FP8_MAX = tl.constexpr(FP8_MAX)  # jit functions read only constexpr globals

#: The GEMMs ``w4_linear_prefill_triton`` takes (its ``gemm``): cuBLAS on an FP8 copy of the
#: weight, or ``expand_gemm_triton`` (the 4-bit codes expanded inside the GEMM).
GEMMS = ("cublas", "expand")

#: The GEMM ``w4_linear_prefill_triton`` takes when not told: cuBLAS at every row count.  The
#: expanding GEMM won only at 128 rows on 3072x12288 and 12288x3072 (1.15-1.18x the layer) and
#: lost elsewhere on H100 (bench/bench_expand_gemm.py, twenty-fifth session, docs/results.md);
#: it stays selectable (``gemm="expand"``), and needs no FP8 copy of the weight.
DEFAULT_GEMM = "cublas"

#: The pre-pass ``w4_linear_prefill_triton`` runs when not told: ``"rows"`` or ``"split"``
#: (``bench/bench_w4.py --prepass`` sets it to time the other one).
DEFAULT_PREPASS = "split"


@triton.jit
def _decode(codes, FP4: tl.constexpr):
    """4-bit codes (uint8 0..15) -> their FP8 values as fp32 (formats in reference.py)."""
    if FP4:
        byte = ((codes & 0x8) << 4) | ((codes & 0x7) << 2)
        return byte.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return codes.to(tl.float32) - 8.0


@triton.jit
def _split_e4m3(v):
    """``(hi, lo)`` FP8 with ``hi + lo`` ~ ``v`` (|v| <= 448), as ``reference_prefill.split_fp8``.

    ``hi`` is rounded in fp32 with integer/add tricks (ties to even, E4M3's 3 mantissa bits;
    multiples of 2**-9 below 2**-6) instead of an fp8 -> fp32 round trip: in the weight
    expansion that round trip came out wrong on H100 / Triton 3.6 (the lo block held values
    of the size of ``v``, bench/diag_prefill.py).  Checked equal to torch's cast on 2e5 values.
    """
    bits = v.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
    subnormal = (v + 24576.0) - 24576.0
    hi = tl.where(tl.abs(v) < 0.015625, subnormal, normal)
    return hi.to(tl.float8e4nv), (v - hi).to(tl.float8e4nv)


@triton.jit
def _stats_step(x_ptr, sinv_ptr, l1_ptr, offs_m, m_mask, kk, k_mask, offs_r, r_mask, stride_xm, stride_l1k,
                amax, la, DOT_DTYPE: tl.constexpr, out_ptr, KP, stride_om, scale, CODES: tl.constexpr):  # fmt: skip
    """One K tile of the row statistics: the running max of ``|x * smooth_inv|`` and ``la += x @ l1``.

    ``CODES``: also write the tile's FP8 codes of ``x * smooth_inv / scale`` (a calibrated
    peak), saturated at +-448, with zeros up to KP (``out_ptr`` / ``KP`` / ``stride_om`` /
    ``scale`` are unused otherwise)."""
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], m_mask[:, None] & k_mask[None, :], 0.0)
    sinv = tl.load(sinv_ptr + kk, k_mask, 0.0)
    xs = x.to(tl.float32) * sinv[None, :]
    amax = tl.maximum(amax, tl.max(tl.abs(xs), axis=1))
    if CODES:
        q = tl.minimum(tl.maximum(xs / scale, -_FP8_MAX), _FP8_MAX).to(tl.float8e4nv)
        tl.store(out_ptr + offs_m[:, None] * stride_om + kk[None, :], q, m_mask[:, None] & (kk < KP)[None, :])
    l1 = tl.load(l1_ptr + kk[:, None] * stride_l1k + offs_r[None, :], k_mask[:, None] & r_mask[None, :], 0.0)
    return amax, tl.dot(x.to(DOT_DTYPE), l1.to(DOT_DTYPE), la)


@triton.jit
def _write_codes(x_ptr, sinv_ptr, out_ptr, offs_m, m_mask, kk, K, KP, scale, stride_xm, stride_om):
    """FP8 codes of ``x * smooth_inv / scale`` at columns ``kk`` (zero from K up to KP)."""
    k_mask = kk < K
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], m_mask[:, None] & k_mask[None, :], 0.0)
    sinv = tl.load(sinv_ptr + kk, k_mask, 0.0)
    q = (x.to(tl.float32) * sinv[None, :] / scale[:, None]).to(tl.float8e4nv)
    tl.store(out_ptr + offs_m[:, None] * stride_om + kk[None, :], q, m_mask[:, None] & (kk < KP)[None, :])


@triton.jit
def _write_scale_and_tail(sx_ptr, out_ptr, offs_m, m_mask, scale, KP, KT, RB, stride_om,
                          BLOCK_M: tl.constexpr, TAIL_PAD: tl.constexpr):  # fmt: skip
    """The row scales, and zeros in the columns past the branch blocks up to the aligned K."""
    tl.store(sx_ptr + offs_m, scale, m_mask)
    offs_t = tl.arange(0, TAIL_PAD)
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + KP + 3 * RB + offs_t[None, :],
        tl.zeros([BLOCK_M, TAIL_PAD], dtype=tl.float32).to(tl.float8e4nv),
        m_mask[:, None] & (offs_t < KT - KP - 3 * RB)[None, :],
    )


@triton.jit
def _write_branch(out_ptr, str_ptr, g_ptr, offs_m, m_mask, rr, la, scale,
                  KP, R, RB, S, rows_per_sample, stride_sm, stride_om):  # fmt: skip
    """``[a_hi | a_hi | a_lo]`` of ``la * strength[row] / (scale * g)`` for the ranks ``rr``,
    saturated at +-448 (reached only past a calibrated peak)."""
    srow = (offs_m // rows_per_sample) % S
    st = tl.load(str_ptr + srow[:, None] * stride_sm + rr[None, :], m_mask[:, None] & (rr < R)[None, :], 0.0)
    g = tl.load(g_ptr + rr, rr < R, 1.0)
    v = la * st / (scale[:, None] * g[None, :])
    hi, lo = _split_e4m3(tl.minimum(tl.maximum(v, -_FP8_MAX), _FP8_MAX))
    dst = out_ptr + offs_m[:, None] * stride_om + KP + rr[None, :]
    mask = m_mask[:, None] & (rr < RB)[None, :]
    tl.store(dst, hi, mask)
    tl.store(dst + RB, hi, mask)
    tl.store(dst + 2 * RB, lo, mask)


@triton.jit
def _branch_factors(bound_ptr, str_ptr, R, S, stride_sm, S_PAD: tl.constexpr, R_PAD: tl.constexpr):
    """``g[r] = bound[r] * max_s |strength[s, r]|`` (>= 1e-30), zero past R is harmless."""
    offs_r = tl.arange(0, R_PAD)
    offs_s = tl.arange(0, S_PAD)
    st = tl.load(
        str_ptr + offs_s[:, None] * stride_sm + offs_r[None, :],
        (offs_s < S)[:, None] & (offs_r < R)[None, :],
        0.0,
    )
    bound = tl.load(bound_ptr + offs_r, offs_r < R, 0.0)
    return tl.maximum(bound * tl.max(tl.abs(st), axis=0), 1e-30)


@triton.jit
def _expanded_rows(q_ptr, ws_ptr, offs_n, n_mask, inv, pid_k, KG, stride_qg, stride_qn, stride_wsg,
                   FP4: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):  # fmt: skip
    """``[BLOCK_N, GROUPS * 64]`` FP8 codes ``code * group_scale * inv`` of groups
    ``pid_k * GROUPS ...`` for ``BLOCK_N`` channels (zero past ``KG`` groups and masked channels).

    One ``[BLOCK_N, GROUPS, 32]`` byte load; the low and high nibbles (columns ``j`` and
    ``32 + j`` of each group) joined into whole rows.  The weight expansion stores them;
    ``expand_gemm_triton`` feeds them to its dot, so both see the same bits.
    """
    grp = pid_k * GROUPS + tl.arange(0, GROUPS)
    offs_j = tl.arange(0, 32)
    ok = n_mask[:, None, None] & (grp < KG)[None, :, None]
    packed = tl.load(
        q_ptr + grp[None, :, None] * stride_qg + offs_n[:, None, None] * stride_qn + offs_j[None, None, :],
        ok,
        0,
    )
    ws = tl.load(
        ws_ptr + grp[None, :] * stride_wsg + offs_n[:, None], n_mask[:, None] & (grp < KG)[None, :], 0.0
    )
    f = (ws * inv[:, None])[:, :, None]
    low = (_decode(packed & 0xF, FP4) * f).to(tl.float8e4nv)
    high = (_decode(packed >> 4, FP4) * f).to(tl.float8e4nv)
    return tl.reshape(tl.permute(tl.join(low, high), (0, 1, 3, 2)), (BLOCK_N, GROUPS * 64))


@triton.jit
def _expand_codes(q_ptr, ws_ptr, out_ptr, offs_n, n_mask, inv, pid_k, KG,
                  stride_qg, stride_qn, stride_wsg, stride_on,
                  FP4: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):  # fmt: skip
    """Store ``_expanded_rows`` in one store per row.

    With a group per loop step (a ``[BLOCK_N, 32]`` load, two 32-byte stores per row)
    the autotuned kernel took 11.4 / 28.1 / 27.9 us on H100 at 3072x3072 / 3072x12288 /
    12288x3072; with whole rows it takes 8.3 / 25.3 / 24.5 us, the same bits
    (bench/diag_expand_weight.py, docs/results.md).
    """
    rows = _expanded_rows(q_ptr, ws_ptr, offs_n, n_mask, inv, pid_k, KG, stride_qg, stride_qn, stride_wsg,
                          FP4, BLOCK_N, GROUPS)  # fmt: skip
    cols = pid_k * GROUPS * 64 + tl.arange(0, GROUPS * 64)
    tl.store(
        out_ptr + offs_n[:, None] * stride_on + cols[None, :],
        rows,
        n_mask[:, None] & (cols < KG * 64)[None, :],
    )


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_N": bn, "GROUPS": gr}, num_warps=w)
        # bench/diag_expand_weight.py: 32 x 8 and 64 x 4 were the fastest tiles on the FLUX shapes
        for bn, gr, w in [(32, 8, 4), (64, 4, 4), (16, 16, 2), (32, 16, 4), (128, 4, 4), (64, 8, 4)]
    ],
    key=["N", "KG", "R_PAD"],
)
@triton.jit
def _expand_weight_kernel(
    q_ptr, ws_ptr, wmax_ptr, l2_ptr, bound_ptr, str_ptr, out_ptr, cs_ptr, g_ptr,
    N, KG, KP, KT, R, RB, S,
    stride_qg, stride_qn, stride_wsg, stride_l2n, stride_sm, stride_on,
    FP4: tl.constexpr, S_PAD: tl.constexpr, R_PAD: tl.constexpr, TAIL_PAD: tl.constexpr,
    TENSOR: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, BRANCH_ONLY: tl.constexpr = False,
):  # fmt: skip
    # BRANCH_ONLY: a grid of one column of programs writing the branch blocks, zero tail and
    # scales into an output that starts at the GEMM's column KP (for expand_gemm_triton)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    n_mask = offs_n < N
    r_mask = offs_r < R
    g = _branch_factors(bound_ptr, str_ptr, R, S, stride_sm, S_PAD, R_PAD)
    l2 = tl.load(
        l2_ptr + offs_n[:, None] * stride_l2n + offs_r[None, :], n_mask[:, None] & r_mask[None, :], 0.0
    ).to(tl.float32)
    if TENSOR:  # wmax_ptr holds reference_prefill.weight_peaks: one scale for every channel
        l2_peak = tl.load(wmax_ptr + 1 + offs_r, r_mask, 0.0)
        peak = tl.maximum(tl.load(wmax_ptr), tl.max(l2_peak * g, axis=0))
        cs = tl.zeros([BLOCK_N], dtype=tl.float32) + tl.maximum(peak / _FP8_MAX, 1e-30)
    else:
        need = tl.max(tl.abs(l2) * g[None, :], axis=1)
        wmax = tl.load(wmax_ptr + offs_n, n_mask, 0.0)
        cs = tl.maximum(tl.maximum(wmax, need) / _FP8_MAX, 1e-30)
    inv = 1.0 / cs
    branch_col = 0 if BRANCH_ONLY else KP  # the output column of the branch's first block
    if BRANCH_ONLY or pid_k == tl.cdiv(KG, GROUPS):  # the last column: branch, zero tail, scales
        hi, lo = _split_e4m3(l2 * g[None, :] * inv[:, None])
        dst = out_ptr + offs_n[:, None] * stride_on + branch_col + offs_r[None, :]
        mask = n_mask[:, None] & (offs_r < RB)[None, :]
        tl.store(dst, hi, mask)
        tl.store(dst + RB, lo, mask)
        tl.store(dst + 2 * RB, hi, mask)
        tail = KT - KP - 3 * RB  # zero columns up to the aligned K
        offs_t = tl.arange(0, TAIL_PAD)
        zeros = tl.zeros([BLOCK_N, TAIL_PAD], dtype=tl.float32).to(tl.float8e4nv)
        tl.store(
            out_ptr + offs_n[:, None] * stride_on + branch_col + 3 * RB + offs_t[None, :],
            zeros,
            n_mask[:, None] & (offs_t < tail)[None, :],
        )
        tl.store(cs_ptr + offs_n, cs, n_mask)
        tl.store(g_ptr + offs_r, g, offs_r < tl.where(pid_n == 0, R, 0))
    else:
        _expand_codes(q_ptr, ws_ptr, out_ptr, offs_n, n_mask, inv, pid_k, KG,
                      stride_qg, stride_qn, stride_wsg, stride_on, FP4, BLOCK_N, GROUPS)  # fmt: skip


def fits_prepass(config: triton.Config, r_pad: int) -> bool:
    """The ``l1`` tile ``[BLOCK_K, R_PAD]`` (bf16) must leave shared memory for the rest."""
    return config.kwargs["BLOCK_K"] * r_pad <= 64 * 1024


def _prune_prepass(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    r_pad = int(kwargs.get("R_PAD", named_args.get("R_PAD", 16)))
    keep = [c for c in configs if fits_prepass(c, r_pad)]
    return keep or configs[:1]


@triton.autotune(
    prune_configs_by={"early_config_prune": _prune_prepass},
    configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=st)
        for bm, bk, w, st in [
            (16, 128, 4, 1),
            (16, 256, 4, 1),
            (16, 512, 4, 1),
            (16, 512, 8, 1),
            (32, 256, 8, 1),
            # Taller row blocks re-read l1 (K x R) from L2 fewer times; two stages overlap loads.
            (64, 128, 8, 2),
            (64, 256, 8, 1),
            (128, 64, 8, 2),
            (128, 128, 8, 1),
        ]
    ],
    key=["M_BUCKET", "K", "R_PAD"],
)
@triton.jit
def _rowwise_prepass_kernel(
    x_ptr, sinv_ptr, l1_ptr, str_ptr, g_ptr, out_ptr, sx_ptr,
    M, K, KP, KT, R, RB, S, rows_per_sample, M_BUCKET,
    stride_xm, stride_l1k, stride_sm, stride_om,
    R_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, TAIL_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    m_mask = offs_m < M
    r_mask = offs_r < R
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    la = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        amax, la = _stats_step(x_ptr, sinv_ptr, l1_ptr, offs_m, m_mask, kk, kk < K, offs_r, r_mask,
                               stride_xm, stride_l1k, amax, la, DOT_DTYPE, out_ptr, KP, stride_om, 1.0,
                               False)  # fmt: skip
    scale = tl.maximum(amax / _FP8_MAX, 1e-12)
    for k0 in range(0, KP, BLOCK_K):
        _write_codes(x_ptr, sinv_ptr, out_ptr, offs_m, m_mask, k0 + tl.arange(0, BLOCK_K), K, KP, scale,
                     stride_xm, stride_om)  # fmt: skip
    _write_scale_and_tail(sx_ptr, out_ptr, offs_m, m_mask, scale, KP, KT, RB, stride_om, BLOCK_M, TAIL_PAD)
    if RB > 0:
        _write_branch(out_ptr, str_ptr, g_ptr, offs_m, m_mask, offs_r, la, scale,
                      KP, R, RB, S, rows_per_sample, stride_sm, stride_om)  # fmt: skip


def expand_weight_triton(
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    fmt: str,
    l2: torch.Tensor,
    bound: torch.Tensor,
    wmax: torch.Tensor | None,
    strength: torch.Tensor,
    config: dict | None = None,
    peaks: torch.Tensor | None = None,
    branch_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``wq [N, total_k]`` FP8, ``channel_scale [N]`` fp32, ``g [R]`` fp32); see the reference.

    ``config`` (BLOCK_N, GROUPS, num_warps) skips autotuning (tests, the interpreter).
    ``peaks`` (``reference_prefill.weight_peaks``) selects ``scaling="tensor"``: every
    channel then gets the largest channel scale, and ``wmax`` is not read.
    ``branch_only``: ``wq`` holds only the columns past the codes (``[N, total_k - Kp]``: the
    branch blocks and the zero tail), one small launch; ``expand_gemm_triton`` expands the
    codes inside its GEMM instead.
    """
    kg, n, _ = qweight.shape
    r = l2.shape[1]
    rb = branch_block(r)
    kp = kg * 64
    r_pad = max(16, triton.next_power_of_2(max(rb, 1)))
    kt = total_k(kp, r)
    wq = torch.empty(n, kt - kp if branch_only else kt, device=qweight.device, dtype=torch.float8_e4m3fn)
    cs = torch.empty(n, device=qweight.device, dtype=torch.float32)
    g = torch.empty(max(r, 1), device=qweight.device, dtype=torch.float32)
    l2 = l2 if r else l2.new_zeros(n, 1)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), 1 if branch_only else triton.cdiv(kg, meta["GROUPS"]) + 1)

    if branch_only and config is None:  # one column of programs: nothing to tune
        config = {"BLOCK_N": 32, "GROUPS": 1, "num_warps": 4}
    kernel = _expand_weight_kernel if config is None else _expand_weight_kernel.fn
    kernel[grid](
        qweight, wscale, wmax if peaks is None else peaks, l2, bound, strength, wq, cs, g,
        n, kg, kp, kt, r, rb, strength.shape[0],
        qweight.stride(0), qweight.stride(1), wscale.stride(0), l2.stride(0), strength.stride(0), wq.stride(0),
        FP4=fmt == "fp4", S_PAD=max(2, triton.next_power_of_2(strength.shape[0])), R_PAD=r_pad, TAIL_PAD=K_ALIGN,
        TENSOR=peaks is not None, BRANCH_ONLY=branch_only, **(config or {}),
    )  # fmt: skip
    return wq, cs, g[:r]


def quantize_act_rowwise_triton(
    x: torch.Tensor,
    smooth_inv: torch.Tensor,
    l1: torch.Tensor,
    strength: torch.Tensor,
    rows_per_sample: int,
    g: torch.Tensor,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``xq [M, total_k]`` FP8, ``row_scale [M, 1]`` fp32); ``x`` row-major.

    ``config`` (BLOCK_M, BLOCK_K, num_warps, num_stages) skips autotuning.
    """
    m, k = x.shape
    r = l1.shape[1]
    rb = branch_block(r)
    kp = -(-k // 64) * 64
    kt = total_k(kp, r)
    xq = torch.empty(m, kt, device=x.device, dtype=torch.float8_e4m3fn)
    sx = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    l1 = l1 if r else l1.new_zeros(k, 1)
    g = g if r else torch.ones(1, device=x.device)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]),)

    kernel = _rowwise_prepass_kernel if config is None else _rowwise_prepass_kernel.fn
    kernel[grid](
        x, smooth_inv, l1, strength, g, xq, sx,
        m, k, kp, kt, r, rb, strength.shape[0], max(rows_per_sample, 1), min(triton.next_power_of_2(max(m, 16)), 8192),
        x.stride(0), l1.stride(0), strength.stride(0), xq.stride(0),
        R_PAD=max(16, triton.next_power_of_2(max(rb, 1))), DOT_DTYPE=branch_dot_dtype(), TAIL_PAD=K_ALIGN,
        **(config or {}),
    )  # fmt: skip
    return xq, sx


def w4_linear_prefill_triton(
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
    bound: torch.Tensor | None = None,
    wmax: torch.Tensor | None = None,
    prepass: str | None = None,
    scaling: str | None = None,
    peaks: torch.Tensor | None = None,
    act_peak: torch.Tensor | None = None,
    act_seen: torch.Tensor | None = None,
    gemm: str | None = None,
) -> torch.Tensor:
    """The large-M layer on the GPU; shapes as ``studio.kernels.w4_linear``.

    ``bound`` (``branch_bound(l1, smooth_inv)``), ``wmax`` (``residual_max(wscale, fmt)``) and
    ``peaks`` (``weight_peaks(l2, wmax)``) depend on the weights only; callers that run the
    layer many times pass them cached.  ``prepass``: ``"rows"`` (one launch, 16-row blocks)
    or ``"split"`` (statistics split along K, then the codes: ``prepass_split_triton.py``);
    both give the reference's codes.  None: ``DEFAULT_PREPASS``.  ``scaling``: ``"row"``
    (per-token and per-channel scales) or ``"tensor"`` (one scale per operand; split
    pre-pass only); None: ``reference_prefill.DEFAULT_SCALING``.  ``act_peak [1]`` fp32
    (``"tensor"`` only): a calibrated activation peak, so the pre-pass reads X once
    (``prepass_split_triton.quantize_act_rowwise_split_triton``); ``act_seen [1]`` fp32 is
    raised to the batch's peak when given.  ``gemm``: ``"cublas"`` (the weight expanded into
    an FP8 copy, then ``_scaled_mm``) or ``"expand"`` (``expand_gemm_triton``: the codes
    expanded inside the GEMM, no FP8 copy of the weight); None: ``DEFAULT_GEMM``.
    """
    gemm = DEFAULT_GEMM if gemm is None else gemm
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS}, not {gemm!r}")
    prepass = DEFAULT_PREPASS if prepass is None else prepass
    scaling = check_scaling(reference_prefill.DEFAULT_SCALING if scaling is None else scaling)
    if prepass not in ("rows", "split"):
        raise ValueError(f"prepass must be 'rows' or 'split', not {prepass!r}")
    if scaling == "tensor" and prepass == "rows":
        raise ValueError("scaling='tensor' needs the split pre-pass (prepass='split')")
    reference_prefill.check_act_peak(scaling, act_peak)
    x = x.contiguous()
    if bound is None:
        bound = branch_bound(l1, smooth_inv) if l1.shape[1] else torch.zeros(1, device=x.device)
    if wmax is None and (scaling == "row" or peaks is None):  # one scale reads only the peaks
        wmax = residual_max(wscale, fmt)
    if scaling == "tensor" and peaks is None:
        peaks = weight_peaks(l2, wmax)
    wq, cs, g = expand_weight_triton(
        qweight,
        wscale,
        fmt,
        l2,
        bound,
        wmax,
        strength,
        peaks=peaks if scaling == "tensor" else None,
        branch_only=gemm == "expand",
    )
    if prepass == "split":  # a calibrated peak needs "tensor", which needs "split" (checked above)
        from studio.kernels.prepass_split_triton import quantize_act_rowwise_split_triton

        xq, sx = quantize_act_rowwise_split_triton(
            x,
            smooth_inv,
            l1,
            strength,
            rows_per_sample,
            g,
            scaling=scaling,
            act_peak=act_peak,
            act_seen=act_seen,
        )
    else:
        xq, sx = quantize_act_rowwise_triton(x, smooth_inv, l1, strength, rows_per_sample, g)
    if gemm == "expand":
        from studio.kernels.expand_gemm_triton import expand_gemm_triton

        sx = sx.view(-1)[:1] if scaling == "tensor" else sx
        out = expand_gemm_triton(xq, sx, qweight, wscale, fmt, cs, wq, bias, torch.bfloat16)
        return out if x.dtype == torch.bfloat16 else out.to(x.dtype)
    if scaling == "tensor":  # every row / channel holds the same scale: cuBLAS's one-scale GEMM
        sx, cs = sx.view(-1)[:1], cs[:1]
    return _scaled_mm_with_bias(xq, sx, wq, cs, bias, qweight.shape[1], x.dtype)


def _scaled_mm_with_bias(
    xq: torch.Tensor,
    sx: torch.Tensor,
    wq: torch.Tensor,
    cs: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """cuBLAS FP8 ``xq @ wq.T`` with the scales (``sx [M, 1]`` and ``cs [N]``, or one element
    each) and bias; ``[M, n]`` in ``dtype``."""
    if n % 16:  # cuBLAS FP8 wants N % 16 == 0: zero codes and unit scales for the extra rows
        pad = 16 - n % 16
        wq = torch.cat([wq, wq.new_zeros(pad, wq.shape[1])])
        cs = cs if cs.numel() == 1 else torch.cat([cs, cs.new_ones(pad)])
        bias = None if bias is None else torch.cat([bias.float(), bias.new_zeros(pad).float()])
    bias16 = None if bias is None else bias.to(torch.bfloat16)
    scale_b = cs if cs.numel() == 1 else cs.view(1, -1)
    out = torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=scale_b, bias=bias16, out_dtype=torch.bfloat16)
    out = out if n % 16 == 0 else out[:, :n].contiguous()
    return out if dtype == torch.bfloat16 else out.to(dtype)
