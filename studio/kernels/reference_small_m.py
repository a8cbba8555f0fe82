"""Pure-torch reference of the small-M ("decode") path of the 4-bit linear.

Why a third path: with few rows (M <= 64: a decode step, a single small image) the layer is
bound by the 4-bit weight read, not by the tensor cores.  The fused path's FP8 pre-pass
then costs a launch and a round trip of X for nothing, and its tiles cover too few output
channels to keep the memory system busy.  This path keeps the activations in bf16
(``bf16(x * smooth_inv)``: more precise than the FP8 codes of the other two paths), decodes
the 4-bit codes to bf16 (exact: both formats' codes are small integers or FP8 values, which
bf16 holds exactly) and applies each group's scale in fp32 on the partial dot, as the fused
path does.  K is split across programs so that even N = 3072 gives the GPU enough parallel
weight streams; the splits are added in split order, with the bias (in the same launch up
to 16 rows, by a second small kernel above: ``small_m_triton.finish_for``).  The branch input
``x @ l1`` is one bf16 GEMM before (rounded to bf16), times the strengths, rounded again,
then a bf16 dot with ``l2``.
"""

from __future__ import annotations

import torch

from studio.kernels.reference import GROUP, padded_k, strength_rows, unpack_weight

#: ``w4_linear(path="auto")`` takes this path on the GPU up to this many rows.
SMALL_M_MAX = 64

#: Rows up to which the GPU kernel runs in one launch (``small_m_triton.finish_for``).
SMALL_M_ONE_LAUNCH = 16


def w4_linear_small_m(
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
    scaled_codes: bool = True,
) -> torch.Tensor:
    """The small-M layer in float32 with the kernel's roundings; shapes as ``studio.kernels.w4_linear``.

    ``scaled_codes`` (the ``tl`` kernel's default, ``small_m_triton.use_scaled_codes``, and
    the Gluon layer's above 16 rows; up to 16, where ``w4_linear`` runs it on Hopper, the Gluon
    layer, ``small_m_gluon_layer``, keeps the codes exact, as ``scaled_codes=False``): each code
    times its group scale is rounded to bf16 (``bf16(code * bf16(scale))``) and one dot runs
    over all of K, so that the sums need no work per group.  That rounding costs a relative
    error of at most 2**-9 per weight (about 2e-3 on the outputs), against the 4-bit codes' own
    of about 2**-4.  False: the codes exact, each group's partial dot scaled in fp32.
    """
    m, k = x.shape
    kp = padded_k(k)
    n, kg = qweight.shape[1], qweight.shape[0]
    xs = torch.nn.functional.pad(x.float() * smooth_inv.float(), (0, kp - k)).to(torch.bfloat16).float()
    codes = unpack_weight(qweight, fmt).view(n, kg, GROUP)  # exact in bf16
    if scaled_codes:
        scales = wscale.to(torch.bfloat16).t()[:, :, None]
        out = xs @ (codes.to(torch.bfloat16) * scales).float().view(n, kp).t()
    else:
        per_group = torch.einsum("mgj,ngj->mgn", xs.view(m, kg, GROUP), codes)
        out = (per_group * wscale.float()[None]).sum(1)
    if l1.shape[1]:
        rows = strength_rows(m, rows_per_sample, strength.shape[0]).to(x.device)
        la = (x.to(torch.bfloat16).float() @ l1.to(torch.bfloat16).float()).to(torch.bfloat16).float()
        la = (la * strength.float()[rows]).to(torch.bfloat16).float()
        out = out + la @ l2.to(torch.bfloat16).float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
