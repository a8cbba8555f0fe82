"""The int4 weight-only baseline of bench/bench_w4.py: what runs, or why nothing can."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from int4_baselines import int4_weight_only  # noqa: E402


def test_cpu_gives_no_function_and_names_both_attempts() -> None:
    fn, label = int4_weight_only(torch.randn(64, 1024).bfloat16(), torch.zeros(64))
    assert fn is None
    assert "torchao:" in label and "aten:" in label


@pytest.mark.gpu
def test_gpu_baseline_runs_and_matches_the_bf16_layer_where_torchao_quantizes_the_real_weight() -> None:
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(256, 1024, generator=gen) * 0.02).bfloat16().cuda()
    bias = torch.randn(256, generator=gen).cuda() * 0.1
    x = torch.randn(16, 1024, generator=gen).bfloat16().cuda()
    fn, label = int4_weight_only(w, bias)
    assert fn is not None, label
    y = fn(x)
    assert y.shape == (16, 256) and y.dtype == torch.bfloat16
    if label.startswith("torchao"):  # the aten fallback times random codes, not this weight
        ref = torch.nn.functional.linear(x, w, bias.bfloat16()).float()
        assert ((y.float() - ref).norm() / ref.norm()).item() < 0.1
