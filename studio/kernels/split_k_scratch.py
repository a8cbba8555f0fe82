"""Zeroed scratch for split-K kernels that finish inside their launch: fp32 sums and counters.

``gemm_w4_triton``'s split-K adds partial tiles into the fp32 buffer and counts arrivals per
tile; ``small_m_triton``'s one-launch form counts arrivals per column block.  In both, the
program that completes a tile finishes it and zeroes what it used, so the buffers are zero
between launches and no launch pays for a memset.  One pair per device and CUDA stream:
launches on one stream run one after another and never share a counter while it counts;
launches on two streams may overlap, so each stream gets its own pair.
"""

from __future__ import annotations

import torch

_SCRATCH: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}


def zeroed_scratch(device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This stream's zeroed fp32 buffer (``>= floats``) and int32 counters (``>= counters``)."""
    key = _stream_key(device)
    have = _SCRATCH.get(key)
    if have is None or have[0].numel() < floats or have[1].numel() < counters:
        acc = torch.zeros(max(floats, 1 << 16), device=device, dtype=torch.float32)
        cnt = torch.zeros(max(counters, 1024), device=device, dtype=torch.int32)
        _SCRATCH[key] = have = (acc, cnt)
    return have


_PARTIALS: dict[tuple[torch.device, int], torch.Tensor] = {}


def partials_scratch(device: torch.device, floats: int) -> torch.Tensor:
    """This stream's fp32 buffer (``>= floats``) for split-K partials that are stored, not added
    (``expand_gemm_triton``): its contents are left behind, so it is kept apart from the zeroed
    buffer that ``zeroed_scratch`` hands out."""
    key = _stream_key(device)
    have = _PARTIALS.get(key)
    if have is None or have.numel() < floats:
        _PARTIALS[key] = have = torch.empty(max(floats, 1 << 16), device=device, dtype=torch.float32)
    return have


def _stream_key(device: torch.device) -> tuple[torch.device, int]:
    """(device, current CUDA stream): one set of buffers per stream (module docstring)."""
    return device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
