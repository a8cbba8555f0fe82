"""SVDQuant on CPU: reference kernels vs float64, packing, quantizer, LoRA branch semantics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapters.base import adapter_state_dict, inject, load_adapter_state_dict, remove, set_strength
from adapters.lora import LoraSpec
from adapters.svdquant import SVDQuantConfig, SVDQuantLinear, load_quantized, quantize_model, save_quantized
from studio.kernels import reference as ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_e2m1_codes_map_to_e4m3_by_bit_placement() -> None:
    codes = torch.arange(16, dtype=torch.uint8)
    vals = ref.decode_codes(codes, "fp4")
    expect = torch.cat([ref.E2M1_VALUES, -ref.E2M1_VALUES]) * 2.0**-6
    assert torch.equal(vals, expect.float())
    assert torch.equal(ref.decode_codes(codes, "int4"), torch.arange(16).float() - 8)


@pytest.mark.parametrize("fmt", ["int4", "fp4"])
def test_pack_round_trip_and_error_bound(fmt: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(24, 200)  # K = 200: padded to 256
    qw, ws = ref.quantize_weight(w, fmt)
    assert qw.shape == (4, 24, 32) and qw.dtype == torch.uint8 and ws.shape == (4, 24)
    dq = ref.dequantize_weight(qw, ws, fmt, 200)
    # Re-quantizing the dequantized weight gives back the same codes (exact grid points).
    qw2, ws2 = ref.quantize_weight(dq, fmt)
    assert torch.equal(qw2, qw) and torch.allclose(ws2, ws, rtol=1e-6)
    step = ws.t().repeat_interleave(64, 1)[:, :200] * (1.0 if fmt == "int4" else 64.0)
    assert ((dq - w).abs() <= step * (0.5 if fmt == "int4" else 1.0) + 1e-6).all()
    assert (ref.unpack_weight(qw, fmt)[:, 200:] == 0).all()  # padded tail is exact zero


def test_reference_gemm_matches_float64_dense() -> None:
    torch.manual_seed(1)
    m, k, n, r = 7, 150, 40, 16
    x = torch.randn(m, k)
    sinv, l1 = torch.rand(k) + 0.5, torch.randn(k, r) * 0.1
    l2, bias = (torch.randn(n, r) * 0.1).to(torch.bfloat16), torch.randn(n)
    strength = torch.rand(2, r)
    qw, ws = ref.quantize_weight(torch.randn(n, k), "int4")
    xq, xs, la = ref.quantize_act(x, sinv, l1, strength, rows_per_sample=4)
    out = ref.gemm_w4(xq, xs, qw, ws, "int4", la, l2, bias, torch.float32)
    xd = ref.dequantize_act(xq, xs).double()[:, :k]
    wd = ref.dequantize_weight(qw, ws, "int4", k).double()
    rows = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    la64 = (x.double() @ l1.double()) * strength.double()[rows]
    dense = xd @ wd.t() + la64.to(torch.bfloat16).double() @ l2.double().t() + bias.double()
    assert _rel(out, dense) < 1e-5
    assert _rel(la, la64) < 1e-6
    # FP8 per-(token, group) activations: within FP8 precision of x * smooth_inv.
    assert _rel(xd, x.double() * sinv.double()) < 2**-4


def _layer(k: int = 128, n: int = 48, rank: int = 16, fmt: str = "int4") -> tuple[nn.Linear, SVDQuantLinear]:
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    calib = torch.randn(256, k)
    calib[:, 3] *= 40
    calib[:, 17] *= 25
    return lin, SVDQuantLinear.from_linear(lin, calib, rank=rank, fmt=fmt)


@pytest.mark.parametrize("fmt", ["int4", "fp4"])
def test_from_linear_beats_naive_4bit(fmt: str) -> None:
    lin, q = _layer(fmt=fmt)
    naive = SVDQuantLinear.from_linear(
        lin, torch.zeros(1, 128), config=SVDQuantConfig(rank=0, fmt=fmt, alphas=(None,))
    )
    x = torch.randn(64, 128)
    x[:, 3] *= 40
    x[:, 17] *= 25
    with torch.no_grad():
        y = lin(x)
        err_q, err_naive = _rel(q(x), y), _rel(naive(x), y)
    assert err_q < 0.06 and err_q < 0.7 * err_naive
    assert _rel(q.dequantized_weight(), lin.weight.detach()) < 0.1


def _lora_model(rank: int = 4) -> tuple[nn.Module, SVDQuantLinear]:
    _, q = _layer()
    model = nn.Sequential(q)
    inject(model, LoraSpec(targets=["0"], rank=rank, alpha=rank), "a")
    with torch.no_grad():
        model[0].adapters["a"].lora_B.normal_(0, 0.2)
    return model, q


def test_lora_attach_strength_detach_is_exact() -> None:
    _, q = _layer()
    q(torch.randn(2, 128))  # builds the fused branch tensors
    before = (q.l1.clone(), q.l2.clone(), q.strength.clone())
    model = nn.Sequential(q)
    inject(model, LoraSpec(targets=["0"], rank=4), "a")
    host = model[0]
    assert host.adapters["a"].fused_into_base and q.l1.shape == (128, 32)  # 16 + 4 padded to 32
    with torch.no_grad():
        host.adapters["a"].lora_B.normal_()
        x = torch.randn(3, 5, 128)
        set_strength(model, "a", 0.0)
        base = model(x)
        set_strength(model, "a", 0.7)
        y = model(x)
        want = base + 0.7 * host.adapters["a"].delta(x, x)
        assert _rel(y, want) < 1e-2  # the fused branch runs in bf16
        packed = (q.qweight.data_ptr(), q.qweight._version, q.l1.data_ptr(), q.l1._version)
        host.set_strength("a", 0.3)  # a vector write (timed in bench/bench_w4.py), no re-pack
        assert (q.qweight.data_ptr(), q.qweight._version, q.l1.data_ptr(), q.l1._version) == packed
    remove(model, "a")
    assert model[0] is q
    assert (
        torch.equal(q.l1, before[0]) and torch.equal(q.l2, before[1]) and torch.equal(q.strength, before[2])
    )


def test_per_sample_strengths_equal_running_samples_alone() -> None:
    model, _ = _lora_model()
    strengths = [0.0, 1.0, -0.5]
    x = torch.randn(3, 6, 128)
    with torch.no_grad():
        set_strength(model, "a", torch.tensor(strengths))
        batched = model(x)
        cfg_batch = model(torch.cat([x, x]))  # classifier-free guidance stacks the batch twice
        for i, s in enumerate(strengths):
            set_strength(model, "a", s)
            alone = model(x[i : i + 1])
            assert torch.allclose(batched[i], alone[0], rtol=1e-5, atol=1e-5)
            assert torch.allclose(cfg_batch[3 + i], alone[0], rtol=1e-5, atol=1e-5)


def test_two_loras_independent_and_state_dict_reload() -> None:
    model, q = _lora_model()
    inject(model, LoraSpec(targets=["0"], rank=8), "b")
    host = model[0]
    x = torch.randn(4, 128)
    with torch.no_grad():
        host.adapters["b"].lora_B.normal_(0, 0.2)
        set_strength(model, "a", 0.0)
        y_b = model(x)
        want = q.__class__.forward(q, x)  # both branches fused: a at 0, b at 1
        assert torch.equal(y_b, want)
        sd = adapter_state_dict(model, "b")
        assert set(sd) == {"0.lora_A", "0.lora_B"}
        load_adapter_state_dict(model, "b", {k: v * 0 for k, v in sd.items()})
        set_strength(model, "a", 1.0)
        only_a = model(x)
        remove(model, "b")
        assert torch.allclose(model(x), only_a, atol=1e-6)


def test_lora_trains_through_autograd_on_the_4bit_base() -> None:
    model, _ = _lora_model()
    branch = model[0].adapters["a"]
    loss = model(torch.randn(4, 128)).pow(2).mean()
    loss.backward()
    assert branch.lora_B.grad is not None and branch.lora_B.grad.abs().sum() > 0


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(96, 64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_quantize_model_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model, fresh = _Tiny(), _Tiny()
    fresh.load_state_dict(model.state_dict())
    calib = [torch.randn(16, 96) for _ in range(3)]
    x = torch.randn(8, 96)
    with torch.no_grad():
        y = model(x)
        errors = quantize_model(model, calib, SVDQuantConfig(rank=8))
        assert set(errors) == {"fc1", "fc2"} and max(errors.values()) < 0.1
        yq = model(x)
        assert _rel(yq, y) < 0.1
        save_quantized(model, tmp_path)
        load_quantized(fresh, tmp_path)
        assert isinstance(fresh.fc1, SVDQuantLinear)
        assert torch.equal(fresh(x), yq)
