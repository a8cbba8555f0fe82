"""Pure-torch reference of the large-M ("prefill") path of the 4-bit linear.

Why a second path: on Hopper the fused kernel (``gemm_w4_triton``) pays a CUDA-core
rescale per group of 64 along K and cannot pipeline its register-held weight tile; at
large M it runs at 0.3-0.4x bf16 (docs/results.md).  cuBLAS FP8 (``torch._scaled_mm``)
runs at ~1.7x bf16 but takes one scale per row of each operand.  So for large M the layer

1. expands its packed 4-bit weight into an FP8 copy with one scale per output channel
   (``expand_weight``: exact up to one FP8 rounding of ``code * group_scale / channel_scale``;
   the 4-bit codes in memory stay the stored form, the FP8 copy is a per-call scratch);
2. quantizes the activations per token over the whole K (``quantize_act_rowwise``), in
   the same pass computing the low-rank branch input ``lora_act = x @ l1``;
3. appends the branch to the GEMM's K dimension, so one ``_scaled_mm`` computes
   ``x @ W.T + lora_act @ l2.T`` and the strengths stay a vector write (they scale
   activation columns, per sample when they differ).  One FP8 copy of the branch would
   cost 2**-4 relative precision on a term as large as the output itself (measured 0.035
   relative error, against 0.008 for the whole fused layer), so each factor is split into
   a high and a low FP8 part, ``a = a_hi + a_lo``, ``b = b_hi + b_lo``, and three blocks of
   ``Rb`` columns carry ``a_hi*b_hi + a_hi*b_lo + a_lo*b_hi`` (error ~2**-8, measured 0.001).

Sharing the row scales between the main and the appended columns needs a per-rank factor
``g[r]`` that keeps both sides inside FP8's range: ``|lora_act[m, r] * s| <= amax_k
|x_s[m, k]| * bound[r] * max|s[:, r]|`` with ``bound[r] = sum_k |l1[k, r] / smooth_inv[k]|``,
so activation codes ``lora_act * s / (row_scale * g)`` never exceed 448, and the channel
scale is raised where needed so that weight codes ``l2 * g / channel_scale`` do not either.
FP8 keeps its relative precision over its whole normal range, so the raised scales cost
accuracy only when they push residual codes below 2**-6 (measured in bench/bench_w4.py).
The branch runs in FP8 here, where the fused path keeps it in bf16.

Two scalings (``SCALINGS``).  ``"row"``: one scale per token and one per output channel, as
above.  ``"tensor"`` (the default): each operand takes the largest of those scales for all
its rows, so the GEMM is ``_scaled_mm`` with one scale per operand, which cuBLAS runs faster
on H100: at M = 4608 the GEMM took 3-13 % less time and the whole layer 5-11 % less, with
the same error against the bf16 layer (bench/diag_prefill_scaling.py, docs/results.md).
FP8 is a floating-point format, so a token or channel whose own maximum is below the shared
one keeps FP8's relative precision over a range of 2**14 below the largest value; only
values below 2**-6 of the scale's unit (subnormals) lose bits.  The bounds above hold with
the larger scales.  The price: a token's codes now depend on the largest token of its
batch, so a sample run alone and in a batch differ by FP8 roundings (about 0.5 %).

A calibrated activation peak (``act_peak``, with ``"tensor"`` only): the activations' one
scale is ``act_peak / 448``, fixed before the batch is seen, instead of the batch's largest
``|x * smooth_inv|``.  Then nothing waits for the batch's maximum, so the Triton pre-pass
reads X once (the measured one-scale pre-pass read it twice, 113 us of floor at
12288x3072, M = 4608), and a sample's codes no longer depend on its batch.  The price:
values above the peak saturate at +-448 (FP8 has no infinity), so the peak is the largest
calibration value times a headroom (``SVDQuantConfig.act_headroom``), and every launch
records the largest value it saw (``act_seen``) so that saturation is reported, not silent.
"""

from __future__ import annotations

import torch

from studio.kernels.reference import FP8_MAX, padded_k, strength_rows, unpack_weight

#: ``"row"``: per-token and per-channel scales; ``"tensor"``: one scale per operand (above).
SCALINGS = ("row", "tensor")
#: The scaling of the whole layer (``w4_linear_prefill`` and its Triton form) when not told.
DEFAULT_SCALING = "tensor"


def check_scaling(scaling: str) -> str:
    """``scaling`` itself, or a ValueError naming the choices."""
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, not {scaling!r}")
    return scaling


#: Largest |code| of each format, in the FP8 units ``wscale`` multiplies (see reference.py).
CODE_MAX = {"int4": 7.0, "fp4": 6.0 * 2.0**-6}


def branch_block(r: int) -> int:
    """``Rb``: ``r`` rounded up to 16 (FP8 GEMM alignment); the branch adds ``3 * Rb`` to K."""
    return -(-r // 16) * 16


#: The GEMM's K (codes + branch blocks + zero tail) is a multiple of this: cuBLAS FP8 ran
#: 10-28 % slower with K = 3072 + 96 than with K = 3072 on H100 (bench/diag_prefill.py).
K_ALIGN = 128


def total_k(kp: int, r: int) -> int:
    """Columns of both GEMM operands: ``Kp + 3 Rb`` rounded up to ``K_ALIGN``."""
    return -(-(kp + 3 * branch_block(r)) // K_ALIGN) * K_ALIGN


def split_fp8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` float8_e4m3fn with ``hi + lo`` ~ ``v`` to ~2**-8 relative."""
    hi = v.to(torch.float8_e4m3fn)
    return hi, (v - hi.float()).to(torch.float8_e4m3fn)


def branch_bound(l1: torch.Tensor, smooth_inv: torch.Tensor) -> torch.Tensor:
    """``[R]`` fp32: ``sum_k |l1[k, r] / smooth_inv[k]|`` (depends on the weights only)."""
    return (l1.float().abs() / smooth_inv.float()[:, None]).sum(0)


def residual_max(wscale: torch.Tensor, fmt: str) -> torch.Tensor:
    """``[N]`` fp32: the largest |dequantized weight| each channel can hold."""
    return wscale.float().amax(0) * CODE_MAX[fmt]


def weight_peaks(l2: torch.Tensor, wmax: torch.Tensor) -> torch.Tensor:
    """``[1 + R]`` fp32: ``max_n wmax[n]`` then ``max_n |l2[n, r]|`` per rank (weights only).

    With them ``scaling="tensor"``'s channel scale is ``max(peaks[0], max_r peaks[1 + r] *
    g[r]) / 448`` (exactly the largest ``prefill_scales`` channel scale: scaling by ``g[r] >= 0``
    keeps the order), so each expansion program derives it without reading every channel.
    """
    return torch.cat([wmax.float().amax().reshape(1), l2.float().abs().amax(0)])


def prefill_scales(
    l1: torch.Tensor,
    l2: torch.Tensor,
    smooth_inv: torch.Tensor,
    wscale: torch.Tensor,
    fmt: str,
    strength: torch.Tensor,
    bound: torch.Tensor | None = None,
    wmax: torch.Tensor | None = None,
    scaling: str = "row",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``g [R]``, ``channel_scale [N]``), both fp32; see the module docstring.  With
    ``scaling="tensor"`` every channel's scale is the largest one."""
    bound = branch_bound(l1, smooth_inv) if bound is None else bound
    wmax = residual_max(wscale, fmt) if wmax is None else wmax
    g = (bound * strength.float().abs().amax(0)).clamp_min(1e-30)
    need = (l2.float().abs() * g).amax(1) if l2.shape[1] else torch.zeros_like(wmax)
    peak = torch.maximum(wmax, need)
    if check_scaling(scaling) == "tensor":
        peak = peak.amax().expand_as(peak)
    return g, (peak / FP8_MAX).clamp_min(1e-30)


def check_act_peak(scaling: str, act_peak: torch.Tensor | None) -> None:
    """A ValueError unless ``act_peak`` is None or one value with ``"tensor"``.  Its value is
    not read here (that would wait for the GPU on every call): ``SVDQuantLinear`` checks it
    when it is set."""
    if act_peak is None:
        return
    if scaling != "tensor":
        raise ValueError(f"a calibrated activation peak needs scaling='tensor', not {scaling!r}")
    if act_peak.numel() != 1:
        raise ValueError(f"act_peak must hold one value, not {act_peak.numel()}")


def quantize_act_rowwise(
    x: torch.Tensor,
    smooth_inv: torch.Tensor,
    l1: torch.Tensor,
    strength: torch.Tensor,
    rows_per_sample: int,
    g: torch.Tensor,
    scaling: str = "row",
    act_peak: torch.Tensor | None = None,
    act_seen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``xq [M, total_k]`` float8_e4m3fn, ``row_scale [M, 1]`` fp32): codes, ``[hi | hi | lo]``, zeros.

    With ``scaling="tensor"`` every row's scale is the largest one, or ``act_peak [1]`` / 448
    when given (codes beyond +-448 saturate); ``act_seen [1]`` fp32, when given, is raised in
    place to the largest ``|x * smooth_inv|`` of the batch."""
    check_act_peak(check_scaling(scaling), act_peak)
    m, k = x.shape
    r = l1.shape[1]
    xs = x.float() * smooth_inv.float()
    peak = xs.abs().amax(1, keepdim=True)
    if act_seen is not None and m:
        act_seen.copy_(torch.maximum(act_seen, peak.amax().reshape(act_seen.shape)))
    if act_peak is not None:
        peak = act_peak.float().reshape(1, 1).expand_as(peak)
    elif scaling == "tensor":
        peak = peak.amax().expand_as(peak)
    scale = (peak / FP8_MAX).clamp_min(1e-12)
    rb = branch_block(r)
    out = torch.zeros(m, total_k(padded_k(k), r), dtype=torch.float8_e4m3fn, device=x.device)
    out[:, :k] = (xs / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    if r:
        lora_act = x.to(torch.bfloat16).float() @ l1.to(torch.bfloat16).float()
        rows = strength_rows(m, rows_per_sample, strength.shape[0]).to(x.device)
        lora_act = lora_act * strength.float()[rows]
        kp = padded_k(k)
        hi, lo = split_fp8((lora_act / (scale * g)).clamp(-FP8_MAX, FP8_MAX))
        out[:, kp : kp + r], out[:, kp + rb : kp + rb + r], out[:, kp + 2 * rb : kp + 2 * rb + r] = hi, hi, lo
    return out, scale


def expand_weight(
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    fmt: str,
    l2: torch.Tensor,
    g: torch.Tensor,
    channel_scale: torch.Tensor,
) -> torch.Tensor:
    """``[N, total_k]`` float8_e4m3fn: weight codes re-scaled per channel, ``[hi | lo | hi]``, zeros."""
    n = qweight.shape[1]
    r = l2.shape[1]
    vals = unpack_weight(qweight, fmt)  # [N, Kp]
    kp = vals.shape[1]
    inv = 1.0 / channel_scale.float()
    w = vals.view(n, kp // 64, 64) * (wscale.t().float() * inv[:, None])[..., None]
    rb = branch_block(r)
    out = torch.zeros(n, total_k(kp, r), dtype=torch.float8_e4m3fn, device=qweight.device)
    out[:, :kp] = w.view(n, kp).to(torch.float8_e4m3fn)
    if r:
        hi, lo = split_fp8(l2.float() * g * inv[:, None])
        out[:, kp : kp + r], out[:, kp + rb : kp + rb + r], out[:, kp + 2 * rb : kp + 2 * rb + r] = hi, lo, hi
    return out


def w4_linear_prefill(
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
    scaling: str | None = None,
    act_peak: torch.Tensor | None = None,
    act_seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of the whole large-M path in float32; shapes as ``studio.kernels.w4_linear``;
    ``scaling`` as in ``SCALINGS`` (None: ``DEFAULT_SCALING``); ``act_peak`` / ``act_seen`` as in
    ``quantize_act_rowwise``."""
    scaling = DEFAULT_SCALING if scaling is None else scaling
    g, channel_scale = prefill_scales(l1, l2, smooth_inv, wscale, fmt, strength, scaling=scaling)
    xq, row_scale = quantize_act_rowwise(
        x, smooth_inv, l1, strength, rows_per_sample, g, scaling, act_peak, act_seen
    )
    wq = expand_weight(qweight, wscale, fmt, l2, g, channel_scale)
    out = (xq.float() * row_scale) @ (wq.float() * channel_scale[:, None]).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
