"""Pure-torch reference of the fused low-rank + 4-bit linear: CPU fallback and test oracle.

Storage formats (shared with the Triton kernels, see ``studio/kernels/__init__.py``):

* Weights are quantized in groups of ``GROUP = 64`` along K.  ``K`` is zero-padded to
  ``Kp = KG * 64``.  Each group of 64 values of one output row is packed into 32 bytes:
  byte ``j`` holds element ``j`` in its low nibble and element ``j + 32`` in its high
  nibble, so the kernel unpacks two contiguous 32-wide halves without any interleave.
  The packed tensor is group-major, ``qweight[KG, N, 32]`` (uint8), so the tile a program
  reads for one group is one contiguous block.
* A nibble decodes to an FP8 E4M3 value ``c``; the weight is ``c * wscale[g, n]``:
  - ``int4``: offset-binary ``u`` in 0..15, ``c = u - 8`` (symmetric grid -7..7 is used).
  - ``fp4``: an E2M1 code (sign bit 3, magnitude bits 2..0).  Placing its bits into an
    E4M3 byte (sign -> bit 7, magnitude -> bits 4..2) gives ``c = e2m1 * 2**-6`` exactly;
    the ``2**6`` is folded into ``wscale``.
* Activations are quantized per token and per group of 64 along K to FP8 E4M3
  (``xq[M, Kp]``, scales ``xscale[KG, M]`` fp32), after multiplying by ``smooth_inv``.
  A per-(token, group) scale lets the pre-pass quantize in one read of X.
* The low-rank branch (SVD part plus attached LoRAs) is ``lora_act = X @ l1`` with
  ``l1[K, R]`` acting on the *raw* input, scaled per rank by a strength matrix row, then
  ``out += lora_act @ l2.T`` with ``l2[N, R]``.
"""

from __future__ import annotations

import torch

GROUP = 64
FP8_MAX = 448.0
#: Magnitudes of the 8 positive FP4 E2M1 codes.
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FORMATS = ("int4", "fp4")


def padded_k(k: int) -> int:
    return -(-k // GROUP) * GROUP


def strength_rows(m: int, rows_per_sample: int, n_strength_rows: int) -> torch.Tensor:
    """Index of the strength row used by each of ``m`` activation rows.

    Row ``i`` belongs to sample ``i // rows_per_sample``; a batch stacked ``k`` times
    (classifier-free guidance) reuses the strengths, hence the modulo.
    """
    return (torch.arange(m) // max(rows_per_sample, 1)) % n_strength_rows


# --------------------------------------------------------------------------- weights


def _pad_k(w: torch.Tensor) -> torch.Tensor:
    k = w.shape[1]
    return torch.nn.functional.pad(w, (0, padded_k(k) - k)) if k % GROUP else w


def _round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (4-bit, sign in bit 3) for values already scaled to |v| <= 6."""
    table = E2M1_VALUES.to(v.device)
    mag = (v.abs()[..., None] - table).abs().argmin(-1)
    sign = ((v < 0) & (mag > 0)).to(torch.uint8)
    return (sign << 3) | mag.to(torch.uint8)


def quantize_weight(w: torch.Tensor, fmt: str = "int4") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w[N, K]`` (any float) to (``qweight[KG, N, 32]`` uint8, ``wscale[KG, N]`` fp32)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown 4-bit format {fmt!r}; use one of {FORMATS}")
    w = _pad_k(w.float())
    n, kp = w.shape
    groups = w.view(n, kp // GROUP, GROUP)
    amax = groups.abs().amax(-1).clamp_min(1e-12)
    if fmt == "int4":
        scale = amax / 7.0
        codes = (torch.round(groups / scale[..., None]).clamp(-7, 7) + 8).to(torch.uint8)
        kernel_scale = scale
    else:
        scale = amax / 6.0
        codes = _round_e2m1(groups / scale[..., None])
        kernel_scale = scale * 64.0
    packed = codes[..., : GROUP // 2] | (codes[..., GROUP // 2 :] << 4)  # [N, KG, 32]
    return packed.permute(1, 0, 2).contiguous(), kernel_scale.t().contiguous()


def decode_codes(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """FP8 value (as float32) of 4-bit codes (uint8 holding 0..15)."""
    codes = codes.to(torch.int32)
    if fmt == "int4":
        return (codes - 8).float()
    byte = ((codes & 0x8) << 4) | ((codes & 0x7) << 2)
    return byte.to(torch.uint8).view(torch.float8_e4m3fn).float()


def unpack_weight(qweight: torch.Tensor, fmt: str) -> torch.Tensor:
    """Codes as FP8 values, ``[N, Kp]`` float32 (scales not applied)."""
    lo = decode_codes(qweight & 0xF, fmt)
    hi = decode_codes(qweight >> 4, fmt)
    full = torch.cat([lo, hi], -1)  # [KG, N, 64]
    return full.permute(1, 0, 2).reshape(qweight.shape[1], -1)


def dequantize_weight(qweight: torch.Tensor, wscale: torch.Tensor, fmt: str, k: int) -> torch.Tensor:
    """Float32 ``[N, K]`` weight that the packed codes and scales stand for."""
    vals = unpack_weight(qweight, fmt)
    n, kp = vals.shape
    w = vals.view(n, kp // GROUP, GROUP) * wscale.t()[..., None].float()
    return w.view(n, kp)[:, :k]


# --------------------------------------------------------------------------- activations


def quantize_act(
    x: torch.Tensor,
    smooth_inv: torch.Tensor,
    l1: torch.Tensor,
    strength: torch.Tensor,
    rows_per_sample: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference pre-pass.  See ``studio.kernels.quantize_act`` for shapes."""
    m, k = x.shape
    xs = _pad_k(x.float() * smooth_inv.float())
    groups = xs.view(m, -1, GROUP)
    scale = (groups.abs().amax(-1) / FP8_MAX).clamp_min(1e-12)
    xq = (groups / scale[..., None]).to(torch.float8_e4m3fn).view(m, -1)
    lora_act = x.float() @ l1.float()
    rows = strength_rows(m, rows_per_sample, strength.shape[0]).to(x.device)
    lora_act = lora_act * strength.float()[rows]
    return xq, scale.t().contiguous(), lora_act


def dequantize_act(xq: torch.Tensor, xscale: torch.Tensor) -> torch.Tensor:
    m, kp = xq.shape
    return (xq.float().view(m, kp // GROUP, GROUP) * xscale.t()[..., None]).view(m, kp)


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
    """Reference main GEMM in float32.  See ``studio.kernels.gemm_w4`` for shapes."""
    kp = xq.shape[1]
    w = dequantize_weight(qweight, wscale, fmt, kp)
    out = dequantize_act(xq, xscale) @ w.t()
    # The kernel feeds the branch to a bf16 tensor-core dot; round the same way.
    out = out + lora_act.to(torch.bfloat16).float() @ l2.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


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
) -> torch.Tensor:
    xq, xscale, lora_act = quantize_act(x, smooth_inv, l1, strength, rows_per_sample)
    return gemm_w4(xq, xscale, qweight, wscale, fmt, lora_act, l2, bias, x.dtype)
