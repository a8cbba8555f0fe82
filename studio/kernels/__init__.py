"""Fused low-rank + 4-bit linear (SVDQuant style): typed launchers.

Each launcher runs the Triton kernel on a CUDA tensor (sm_90 is the target; any GPU
Triton supports with FP8 works) and the pure-torch reference in ``reference.py``
otherwise, or everywhere when ``STUDIO_KERNELS=reference``.  Shapes: ``M`` rows of
activations, ``K`` input features, ``Kp = KG * 64`` K padded to the group size, ``N``
output features, ``R`` total rank of the low-rank branch (SVD part + attached LoRAs,
padded to a multiple of 16 by the module), ``S`` strength rows (1, or one per sample).
"""

from __future__ import annotations

import os

import torch

from studio.kernels import reference, reference_prefill, reference_small_m
from studio.kernels.reference import FORMATS, GROUP, dequantize_weight, padded_k, quantize_weight
from studio.kernels.reference_small_m import SMALL_M_MAX, SMALL_M_ONE_LAUNCH

__all__ = [
    "FORMATS",
    "GROUP",
    "dequantize_weight",
    "gemm_w4",
    "padded_k",
    "quantize_act",
    "quantize_weight",
    "use_triton",
    "w4_linear",
    "PREFILL_MIN_M",
    "SMALL_M_MAX",
    "SMALL_M_ONE_LAUNCH",
    "pick_path",
]

#: Rows from which ``w4_linear`` takes the large-M path on the GPU: every row count above the
#: small-M path's.  On H100 (bench/diag_prefill_scaling.py --fused, docs/results.md, twenty-sixth
#: session) it beat the fused path at 80, 128, 192 and 255 rows on all four FLUX shapes, by
#: 1.0-2.5x (tied only on 3072x12288 at 80 rows), as it does from 256 rows (bench/bench_w4.py),
#: and on six smaller layers from 640x640 to 5120x1280 by 0.99-2.65x; on 320x320 the fused path
#: won, 14 against 17 us, where launches dominate and both lose to bf16 (5 us).
#: Its error against the float layer is 1.04-1.05x the fused path's at every row count (the FP8
#: rounding of the expanded weight codes; tests/test_kernels_gpu.py).  So the fused path runs
#: only where cuBLAS FP8 cannot (N % 16 != 0).
PREFILL_MIN_M = SMALL_M_MAX + 1
PATHS = ("auto", "fused", "prefill", "small")


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` lives on a CUDA device and the Triton path is not switched off."""
    return t.is_cuda and os.environ.get("STUDIO_KERNELS", "triton") != "reference"


def quantize_act(
    x: torch.Tensor,
    smooth_inv: torch.Tensor,
    l1: torch.Tensor,
    strength: torch.Tensor,
    rows_per_sample: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-pass: quantize activations and compute the low-rank branch input, one read of X.

    Args:
        x: ``[M, K]`` bf16/fp16/fp32, row-major (``x.stride(1) == 1``).
        smooth_inv: ``[K]`` fp32, 1 / smoothing factor per input channel.
        l1: ``[K, R]`` bf16 (or fp32), the branch's down projection acting on the raw ``x``.
        strength: ``[S, R]`` fp32, per-rank strengths; row ``((i // rows_per_sample) % S)``
            scales activation row ``i``.
        rows_per_sample: rows of ``x`` per sample (tokens per image).
    Returns:
        ``xq [M, Kp]`` float8_e4m3fn (``x * smooth_inv`` / scale, zero past K),
        ``xscale [KG, M]`` fp32 (one scale per row and group of 64),
        ``lora_act [M, R]`` fp32 (``(x @ l1) * strength[row]``).
    """
    if use_triton(x):
        from studio.kernels.quant_act import quantize_act_triton

        return quantize_act_triton(x.contiguous(), smooth_inv, l1, strength, rows_per_sample)
    return reference.quantize_act(x, smooth_inv, l1, strength, rows_per_sample)


def gemm_w4(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    fmt: str,
    lora_act: torch.Tensor,
    l2: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Main GEMM: ``out = dq(xq) @ dq(qweight).T + lora_act @ l2.T + bias``.

    Args:
        xq: ``[M, Kp]`` float8_e4m3fn, from ``quantize_act``.
        xscale: ``[KG, M]`` fp32.
        qweight: ``[KG, N, 32]`` uint8, two 4-bit codes per byte (layout in reference.py).
        wscale: ``[KG, N]`` fp32, per-group weight scales (FP8-value units).
        fmt: ``"int4"`` or ``"fp4"`` (E2M1).
        lora_act: ``[M, R]`` fp32, strengths already applied.
        l2: ``[N, R]`` bf16, the branch's up projection.
        bias: ``[N]`` fp32 or None.
        out_dtype: dtype of the result (bf16 on the GPU path).
    Returns:
        ``[M, N]`` tensor of ``out_dtype``.
    """
    if use_triton(xq):
        from studio.kernels.gemm_w4_triton import gemm_w4_triton

        return gemm_w4_triton(xq, xscale, qweight, wscale, fmt, lora_act, l2, bias, out_dtype)
    return reference.gemm_w4(xq, xscale, qweight, wscale, fmt, lora_act, l2, bias, out_dtype)


def pick_path(m: int, k: int, n: int, on_gpu: bool, path: str = "auto") -> str:
    """The path ``w4_linear`` takes for ``m`` rows, ``k`` inputs, ``n`` outputs (``path`` if forced)."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; use one of {PATHS}")
    if path != "auto":
        return path
    if not on_gpu:
        return "fused"  # the CPU reference runs the fused maths
    if m <= SMALL_M_MAX:
        # Measured on H100 (bench/bench_w4.py, docs/results.md): the small-M path won on all
        # four FLUX shapes at M = 16 and, since its scaled codes (eleventh session), at M = 64
        # too: INT4 rank 32, 17.2 / 27.8 / 28.7 / 31.0 us against the fused path's 26.6 /
        # 37.0 / 39.1 / 69.5 us (where N > K the fused one had won at M = 64 before).
        return "small"
    # (cuBLAS FP8 needs N % 16 == 0: the large-M path would pad other N; the fused kernel does not)
    return "prefill" if m >= PREFILL_MIN_M and n % 16 == 0 else "fused"


def w4_linear(
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
    path: str = "auto",
    bound: torch.Tensor | None = None,
    wmax: torch.Tensor | None = None,
    peaks: torch.Tensor | None = None,
    scaling: str | None = None,
    act_peak: torch.Tensor | None = None,
    act_seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole layer on ``x [M, K]``; returns ``[M, N]`` in ``x.dtype``.

    Argument shapes as in ``quantize_act`` and ``gemm_w4``.  ``path``: ``"fused"`` (pre-pass
    then the fused GEMM), ``"prefill"`` (the large-M path), ``"small"`` (the small-M path:
    bf16 activations, split-K), or ``"auto"``: on the GPU the small-M path up to
    ``SMALL_M_MAX`` rows, the large-M path from ``PREFILL_MIN_M`` rows (the next row count) and
    the fused one where ``N % 16 != 0`` (cuBLAS FP8's constraint); the CPU reference runs the
    fused maths.  ``bound`` / ``wmax`` / ``peaks``: the large-M path's
    weight-only factors (``reference_prefill.branch_bound`` / ``residual_max`` / ``weight_peaks``),
    cached by callers.  ``scaling``: the large-M path's FP8 scales, ``"tensor"`` (one per
    operand) or ``"row"`` (per token and channel); None: ``reference_prefill.DEFAULT_SCALING``.
    ``act_peak [1]`` fp32: the large-M path's calibrated activation peak (``"tensor"`` only;
    one read of X, values beyond it saturate) and ``act_seen [1]`` fp32, raised in place to
    each large-M batch's peak (``reference_prefill``'s docstring).
    """
    if scaling is not None or act_peak is not None:  # refused on every path, not only where used
        resolved = reference_prefill.DEFAULT_SCALING if scaling is None else scaling
        reference_prefill.check_act_peak(reference_prefill.check_scaling(resolved), act_peak)
    chosen = pick_path(x.shape[0], x.shape[1], qweight.shape[1], use_triton(x), path)
    if x.shape[0] == 0:  # an empty batch (no kernel launches a zero-size grid)
        return x.new_zeros(0, qweight.shape[1])
    args = (x, smooth_inv, qweight, wscale, fmt, l1, l2, strength, rows_per_sample, bias)
    if chosen == "small":
        if use_triton(x):
            from studio.kernels.small_m_gluon_layer import use_gluon_layer, w4_linear_small_m_gluon
            from studio.kernels.small_m_triton import w4_linear_small_m_triton

            if use_gluon_layer(*args[:8]):
                return w4_linear_small_m_gluon(*args)
            return w4_linear_small_m_triton(*args)
        return reference_small_m.w4_linear_small_m(*args)
    if chosen == "prefill":
        if use_triton(x):
            from studio.kernels.prefill_triton import w4_linear_prefill_triton

            return w4_linear_prefill_triton(
                *args,
                bound=bound,
                wmax=wmax,
                peaks=peaks,
                scaling=scaling,
                act_peak=act_peak,
                act_seen=act_seen,
            )
        return reference_prefill.w4_linear_prefill(
            *args, scaling=scaling, act_peak=act_peak, act_seen=act_seen
        )
    xq, xscale, lora_act = quantize_act(x, smooth_inv, l1, strength, rows_per_sample)
    return gemm_w4(xq, xscale, qweight, wscale, fmt, lora_act, l2, bias, x.dtype)
