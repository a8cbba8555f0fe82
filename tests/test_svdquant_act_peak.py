"""The calibrated activation peak of the large-M path (CPU: reference maths and the module)."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import module_args
from torch import nn

from adapters.base import inject, set_strength
from adapters.lora import LoraSpec
from adapters.svdquant import (
    SVDQuantConfig,
    SVDQuantLinear,
    load_quantized,
    quantize_model,
    quantized_modules,
    saturated_layers,
    save_quantized,
)
from studio import kernels
from studio.kernels import reference as ref
from studio.kernels import reference_prefill as rp


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _acts(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    x[:, 3] *= 40
    return x


def _layer(headroom: float = 2.0) -> SVDQuantLinear:
    torch.manual_seed(0)
    return SVDQuantLinear.from_linear(
        nn.Linear(200, 72), _acts(256, 200), config=SVDQuantConfig(rank=16, act_headroom=headroom)
    )


def test_the_peak_is_the_calibration_peak_times_the_headroom() -> None:
    calib = _acts(256, 200)
    one, two = _layer(1.0), _layer(2.0)
    assert one.act_peak_value == pytest.approx(float((calib * one.smooth_inv).abs().max()), rel=1e-6)
    assert two.act_peak_value == pytest.approx(2 * one.act_peak_value, rel=1e-6)
    assert not two.use_act_peak and two.act_peak_args() == {}  # opt-in
    two.use_act_peak = True
    assert set(two.act_peak_args()) == {"act_peak", "act_seen"}
    two.prefill_scaling = "row"  # per-token scales never take a fixed peak
    assert two.act_peak_args() == {}


def test_quantize_model_takes_the_peak_over_every_token_not_only_the_kept_rows() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    batches = [torch.randn(40, 64) for _ in range(3)]
    batches[2][37, 5] = 500.0  # one loud token, beyond the 8 rows kept per batch
    quantize_model(model, batches, SVDQuantConfig(rank=8, calib_rows=8, act_headroom=1.0))
    q = quantized_modules(model)["0"]
    every = torch.cat(batches)
    assert q.act_peak_value == pytest.approx(float((every * q.smooth_inv).abs().max()), rel=1e-6)


def test_fixed_peak_codes_scale_saturation_and_record() -> None:
    q = _layer()
    q.rebuild_branch()
    x = _acts(40, 200, seed=1)
    g, _ = rp.prefill_scales(q.l1, q.l2, q.smooth_inv, q.wscale, q.fmt, q.strength, scaling="tensor")
    args = (x, q.smooth_inv, q.l1, q.strength, 1, g, "tensor")
    batch_peak = float((x * q.smooth_inv).abs().max())
    for peak_value, clipped in ((2.0 * batch_peak, False), (0.25 * batch_peak, True)):
        seen = torch.zeros(1)
        xq, sx = rp.quantize_act_rowwise(*args, torch.tensor([peak_value]), seen)
        assert torch.equal(sx, torch.full_like(sx, peak_value / rp.FP8_MAX))
        assert float(seen) == pytest.approx(batch_peak)
        assert bool(torch.isfinite(xq.float()).all())  # saturated at +-448, never NaN
        assert bool((xq[:, :200].float().abs() == rp.FP8_MAX).any()) == clipped
    # Without clipping the fixed peak is about as accurate as the measured one.
    layer_args = module_args(q, x)
    dense = x.double() @ q.dequantized_weight().double().t() + q.bias.double()
    measured = rp.w4_linear_prefill(*layer_args, scaling="tensor")
    fixed = rp.w4_linear_prefill(*layer_args, scaling="tensor", act_peak=q.act_peak)
    assert _rel(fixed, dense) < 1.2 * _rel(measured, dense)
    with pytest.raises(ValueError, match="needs scaling='tensor'"):
        rp.w4_linear_prefill(*layer_args, scaling="row", act_peak=q.act_peak)
    with pytest.raises(ValueError, match="one value"):
        kernels.w4_linear(*layer_args, path="prefill", act_peak=torch.ones(2))


def test_fixed_peak_samples_alone_equal_their_batch_exactly() -> None:
    q = _layer()
    model = nn.Sequential(q)
    inject(model, LoraSpec(targets=["0"], rank=4, alpha=4), "a")
    with torch.no_grad():
        model[0].adapters["a"].lora_B.normal_(0, 0.2)
    x = _acts(3 * 5, 200, seed=2)
    x[5:10] *= 3  # a louder sample: with a measured peak it would re-scale the others
    set_strength(model, "a", torch.tensor([0.0, 1.0, -0.5]))
    q.rebuild_branch()
    g, _ = rp.prefill_scales(q.l1, q.l2, q.smooth_inv, q.wscale, q.fmt, q.strength, scaling="tensor")
    batched, _ = rp.quantize_act_rowwise(x, q.smooth_inv, q.l1, q.strength, 5, g, "tensor", q.act_peak)
    for i in range(3):
        alone, _ = rp.quantize_act_rowwise(
            x[5 * i : 5 * i + 5], q.smooth_inv, q.l1, q.strength[i : i + 1], 5, g, "tensor", q.act_peak
        )
        assert torch.equal(alone.view(torch.uint8), batched[5 * i : 5 * i + 5].view(torch.uint8))


def test_saturated_layers_report_clipping_and_reset() -> None:
    q = _layer()
    model = nn.Sequential(q)
    q.use_act_peak = True
    q.rebuild_branch()
    quiet, loud = _acts(300, 200, seed=3), _acts(300, 200, seed=3) * 5
    kernels.w4_linear(*module_args(q, quiet), path="prefill", **q.act_peak_args())
    assert saturated_layers(model) == [] and float(q.act_seen) > 0
    kernels.w4_linear(*module_args(q, loud), path="prefill", **q.act_peak_args())
    assert saturated_layers(model) == ["0"]
    q.reset_act_seen()
    assert saturated_layers(model) == [] and float(q.act_seen) == 0
    with pytest.raises(ValueError, match="finite"):
        q.set_act_peak(float("nan"))


def test_the_peak_is_saved_and_old_or_bad_files_are_handled(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    quantize_model(model, [torch.randn(16, 64)], SVDQuantConfig(rank=8))
    peak = quantized_modules(model)["0"].act_peak_value
    save_quantized(model, tmp_path)
    back = load_quantized(nn.Sequential(nn.Linear(64, 32)), tmp_path)
    assert quantized_modules(back)["0"].act_peak_value == peak > 0
    state = dict(quantized_modules(model)["0"].state_dict())
    fresh = SVDQuantLinear(64, 32, 8, "int4", True)
    old = {k: v for k, v in state.items() if k != "act_peak"}  # a file from before the peak
    fresh.load_state_dict(old)
    assert fresh.act_peak_value == 0 and fresh.act_peak_args() == {}
    fresh.use_act_peak = True
    assert fresh.act_peak_args() == {}  # no peak: the measured path
    with pytest.raises(ValueError, match="act_peak"):
        fresh.load_state_dict({**state, "act_peak": torch.tensor([float("inf")])})
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), fresh(x)) and torch.isfinite(fresh(x)).all()
    assert _rel(fresh(x), ref.w4_linear(*module_args(fresh, x))) < 1e-6
