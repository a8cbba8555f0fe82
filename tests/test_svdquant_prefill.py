"""The large-M path of the 4-bit linear (reference_prefill.py) on CPU: accuracy and range."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import module_args
from torch import nn

from adapters.base import inject, set_strength
from adapters.lora import LoraSpec
from adapters.svdquant import SVDQuantLinear
from studio import kernels
from studio.kernels import reference as ref
from studio.kernels import reference_prefill as rp


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _acts(rows: int, k: int) -> torch.Tensor:
    x = torch.randn(rows, k)
    x[:, 3] *= 40
    x[:, 17] *= 25
    return x


def _quantized(fmt: str, k: int = 200, n: int = 72, rank: int = 16) -> tuple[nn.Linear, SVDQuantLinear]:
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight[:, :4] *= 5
    return lin, SVDQuantLinear.from_linear(lin, _acts(256, k), rank=rank, fmt=fmt)


@pytest.mark.parametrize("fmt", ["int4", "fp4"])
def test_prefill_is_as_accurate_as_the_fused_maths(fmt: str) -> None:
    lin, q = _quantized(fmt)
    x = _acts(300, 200)
    dense = x.double() @ lin.weight.double().t() + lin.bias.double()
    fused = _rel(ref.w4_linear(*module_args(q, x)), dense)
    prefill = _rel(rp.w4_linear_prefill(*module_args(q, x)), dense)
    # The branch carries most of the output; split into hi + lo FP8 parts it adds ~2**-8.
    assert prefill < 1.15 * fused + 2e-3, (fused, prefill)


@pytest.mark.parametrize("fmt", ["int4", "fp4"])
def test_one_scale_per_operand_shares_the_largest_scales_and_stays_accurate(fmt: str) -> None:
    lin, q = _quantized(fmt)
    x = _acts(300, 200) * (torch.rand(300, 1) * 3 + 0.1)  # tokens of different sizes
    dense = x.double() @ lin.weight.double().t() + lin.bias.double()
    args = module_args(q, x)
    g, cs = rp.prefill_scales(q.l1, q.l2, q.smooth_inv, q.wscale, fmt, q.strength)
    g_t, cs_t = rp.prefill_scales(q.l1, q.l2, q.smooth_inv, q.wscale, fmt, q.strength, scaling="tensor")
    assert torch.equal(g, g_t) and torch.equal(cs_t, cs.max().expand_as(cs))
    peaks = rp.weight_peaks(q.l2, rp.residual_max(q.wscale, fmt))
    assert torch.equal(cs_t[0], (torch.maximum(peaks[0], (peaks[1:] * g).max()) / 448).clamp_min(1e-30))
    _, sx = rp.quantize_act_rowwise(x, q.smooth_inv, q.l1, q.strength, 1, g)
    _, sx_t = rp.quantize_act_rowwise(x, q.smooth_inv, q.l1, q.strength, 1, g, scaling="tensor")
    assert torch.equal(sx_t, sx.max().expand_as(sx))
    row = _rel(rp.w4_linear_prefill(*args), dense)
    tensor = _rel(rp.w4_linear_prefill(*args, scaling="tensor"), dense)
    assert tensor < 1.1 * row, (row, tensor)  # FP8 keeps its relative precision below the peak
    with pytest.raises(ValueError, match="scaling must be one of"):
        rp.w4_linear_prefill(*args, scaling="channel")


def test_one_fp8_copy_of_the_branch_would_not_be_enough() -> None:
    """The hi/lo split is what makes the appended branch accurate (one copy: 2**-4)."""
    torch.manual_seed(0)
    a, b = torch.randn(64, 32) * 3, torch.randn(40, 32) * 50
    exact = a @ b.t()
    one = a.to(torch.float8_e4m3fn).float() @ b.to(torch.float8_e4m3fn).float().t()
    (ah, al), (bh, bl) = rp.split_fp8(a), rp.split_fp8(b)
    ah, al, bh, bl = (t.float() for t in (ah, al, bh, bl))
    split = ah @ bh.t() + ah @ bl.t() + al @ bh.t()
    assert _rel(split, exact) < 0.1 * _rel(one, exact)
    assert _rel(split, exact) < 2e-3


def test_codes_stay_in_fp8_range_with_strong_loras_and_large_strengths() -> None:
    lin, q = _quantized("int4")
    model = nn.Sequential(q)
    inject(model, LoraSpec(targets=["0"], rank=8, alpha=8), "big")
    with torch.no_grad():
        model[0].adapters["big"].lora_B.normal_(0, 30.0)  # a branch far larger than the residual
    set_strength(model, "big", torch.tensor([5.0, -3.0]))
    x = _acts(2 * 40, 200)
    args = module_args(q, x, rows_per_sample=40)
    g, cs = rp.prefill_scales(q.l1, q.l2, q.smooth_inv, q.wscale, "int4", q.strength)
    xq, _ = rp.quantize_act_rowwise(x, q.smooth_inv, q.l1, q.strength, 40, g)
    wq = rp.expand_weight(q.qweight, q.wscale, "int4", q.l2, g, cs)
    assert xq.float().isfinite().all() and wq.float().isfinite().all()
    assert xq.float().abs().max() <= 448 and wq.float().abs().max() <= 448
    assert _rel(rp.w4_linear_prefill(*args), ref.w4_linear(*args)) < 0.02


@pytest.mark.parametrize("scaling", rp.SCALINGS)
def test_prefill_per_sample_strengths_equal_samples_alone(scaling: str) -> None:
    _, q = _quantized("fp4")
    model = nn.Sequential(q)
    inject(model, LoraSpec(targets=["0"], rank=4, alpha=4), "a")
    with torch.no_grad():
        model[0].adapters["a"].lora_B.normal_(0, 0.2)
    x = _acts(3 * 5, 200)
    set_strength(model, "a", torch.tensor([0.0, 1.0, -0.5]))
    batched = rp.w4_linear_prefill(*module_args(q, x, rows_per_sample=5), scaling=scaling)
    for i, s in enumerate([0.0, 1.0, -0.5]):
        set_strength(model, "a", s)
        args = module_args(q, x[5 * i : 5 * i + 5], rows_per_sample=5)
        alone = rp.w4_linear_prefill(*args, scaling=scaling)
        # Row scales are per token, so a sample's codes do not depend on its batch; the branch
        # factor g does (it follows the largest strength), which moves FP8 roundings only.
        # One scale for all rows follows the batch's largest token too, so every code of a
        # sample re-rounds: a gap of the size of one FP8 rounding (0.4-0.7 % here, as far as
        # either result is from the fused maths), where rows of the batch's largest token
        # keep their codes (the middle sample: gap ~1e-7).
        gap = _rel(batched[5 * i : 5 * i + 5], alone)
        assert gap < (3e-3 if scaling == "row" else 1e-2), gap
        assert gap < 1.5 * _rel(alone, ref.w4_linear(*args)) + 1e-6, gap


def test_w4_linear_path_argument() -> None:
    _, q = _quantized("int4")
    x = _acts(8, 200)
    args = module_args(q, x)
    assert torch.equal(kernels.w4_linear(*args, path="prefill"), rp.w4_linear_prefill(*args))
    assert torch.equal(kernels.w4_linear(*args), ref.w4_linear(*args))  # CPU: the fused maths
    with pytest.raises(ValueError, match="unknown path"):
        kernels.w4_linear(*args, path="fast")


def test_scaling_choice_reaches_the_large_m_path_and_is_checked_everywhere() -> None:
    _, q = _quantized("int4")
    x = _acts(8, 200)
    args = module_args(q, x)
    for scaling in rp.SCALINGS:
        want = rp.w4_linear_prefill(*args, scaling=scaling)
        assert torch.equal(kernels.w4_linear(*args, path="prefill", scaling=scaling), want)
    assert torch.equal(
        kernels.w4_linear(*args, path="prefill"), rp.w4_linear_prefill(*args, scaling="tensor")
    )
    with pytest.raises(ValueError, match="scaling must be one of"):
        kernels.w4_linear(*args, path="fused", scaling="rows")
    q.prefill_scaling = "per-token"
    with pytest.raises(ValueError, match="scaling must be one of"):
        q(x)
    q.prefill_scaling = "row"
    assert torch.equal(q(x), kernels.w4_linear(*args))  # CPU: the fused maths, whatever the scaling


def test_prefill_launcher_refuses_unknown_choices_before_any_launch() -> None:
    from studio.kernels.prefill_triton import w4_linear_prefill_triton

    _, q = _quantized("int4")
    args = module_args(q, _acts(8, 200))  # CPU tensors: a refusal must come before any launch
    with pytest.raises(ValueError, match="scaling must be one of"):
        w4_linear_prefill_triton(*args, scaling="both")
    with pytest.raises(ValueError, match="prepass must be"):
        w4_linear_prefill_triton(*args, prepass="one")
    with pytest.raises(ValueError, match="needs the split pre-pass"):
        w4_linear_prefill_triton(*args, prepass="rows", scaling="tensor")


def test_quantizing_twice_gives_the_same_codes() -> None:
    torch.manual_seed(3)
    lin = nn.Linear(320, 256)
    calib = _acts(128, 320)
    a = SVDQuantLinear.from_linear(lin, calib, rank=8)
    torch.rand(5)  # move the global generator on
    b = SVDQuantLinear.from_linear(lin, calib, rank=8)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.svd_up, b.svd_up)


@pytest.mark.parametrize("fmt", ["int4", "fp4"])
def test_small_m_reference_is_more_accurate_than_the_fp8_paths(fmt: str) -> None:
    """The small-M path keeps activations in bf16: closer to the 4-bit GEMM's exact value than FP8 codes."""
    from studio.kernels.reference_small_m import w4_linear_small_m

    lin, q = _quantized(fmt)
    x = _acts(24, 200).bfloat16().float()  # bf16 values (the models run in bf16), fp32 output
    args = list(module_args(q, x))
    no_branch = args[:5] + [q.l1[:, :0], q.l2[:, :0], q.strength[:, :0]] + args[8:]
    w = ref.dequantize_weight(q.qweight, q.wscale, fmt, 200).double()
    exact = (x.double() * q.smooth_inv.double()) @ w.t() + q.bias.double()
    small = _rel(w4_linear_small_m(*no_branch), exact)
    assert small < 0.2 * _rel(ref.w4_linear(*no_branch), exact), small
    # the default rounds each code times its scale to bf16 (2**-9 per weight): a little
    # further from the exact value than the exact codes, still far closer than FP8
    exact_codes = _rel(w4_linear_small_m(*no_branch, scaled_codes=False), exact)
    assert exact_codes < small < 4e-3, (exact_codes, small)
    assert small < 0.2 * _rel(rp.w4_linear_prefill(*no_branch), exact), small
    # With the branch (in bf16, as the fused path runs it)
    dense = x.double() @ q.dequantized_weight().double().t() + q.bias.double()
    assert _rel(w4_linear_small_m(*args), dense) < 4e-3
    # path="small" on the CPU runs this reference
    assert torch.equal(kernels.w4_linear(*args, path="small"), w4_linear_small_m(*args))


def test_path_choice() -> None:
    assert kernels.pick_path(16, 3072, 3072, on_gpu=True) == "small"
    assert kernels.pick_path(64, 3072, 12288, on_gpu=True) == "small"  # N > K too, since scaled codes
    assert kernels.pick_path(65, 3072, 12288, on_gpu=True) == "prefill"  # the next row count
    assert kernels.pick_path(100, 3072, 3072, on_gpu=True) == "prefill"
    assert kernels.pick_path(100, 3072, 200, on_gpu=True) == "fused"
    assert kernels.pick_path(kernels.PREFILL_MIN_M, 3072, 3072, on_gpu=True) == "prefill"
    assert kernels.pick_path(4608, 3072, 200, on_gpu=True) == "fused"  # cuBLAS FP8 wants N % 16 == 0
    assert kernels.pick_path(4608, 3072, 3072, on_gpu=False) == "fused"  # the CPU runs the fused maths
    assert kernels.pick_path(4608, 3072, 3072, on_gpu=False, path="small") == "small"
    with pytest.raises(ValueError, match="unknown path"):
        kernels.pick_path(1, 1, 1, on_gpu=True, path="fast")


def test_small_path_launch_choices() -> None:
    """One launch up to 16 rows; the scaling pre-kernel above them, and for layers of at least
    2^24 weights at any row count (measured: docs/results.md, twelfth session)."""
    pytest.importorskip("triton")
    from studio.kernels import small_m_triton as sm

    assert sm.finish_for(16) == "last" and sm.finish_for(17) == "epilogue"
    assert not sm.use_prescale(16, 3072, 3072)
    assert (
        sm.use_prescale(16, 3072, 9216)
        and sm.use_prescale(16, 12288, 3072)
        and sm.use_prescale(1, 4096, 4096)
    )
    assert sm.use_prescale(17, 64, 64) and not sm.use_prescale(16, 4096, 4095)
    # the wgmma operand's order with the inline-PTX decode: INT4 bit-built codes as the left
    # operand on a GPU, up to 16 rows (thirteenth session); asm in that order above is refused
    assert sm.use_fragment_order("int4", True, True, False, 16)
    assert not sm.use_fragment_order("int4", True, True, False, 17)
    assert not any(
        sm.use_fragment_order(*args, 16)
        for args in [("fp4", True, True, False), ("int4", False, True, False), ("int4", True, False, False)]
    )
    assert not sm.use_fragment_order("int4", True, True, True, 16)  # (the interpreter has no inline PTX)
    x = torch.zeros(17, 64, dtype=torch.bfloat16)
    qw, ws = ref.quantize_weight(torch.randn(32, 64), "int4")
    args = (
        x,
        torch.ones(64),
        qw,
        ws,
        "int4",
        torch.zeros(64, 16),
        torch.zeros(32, 16),
        torch.ones(1, 16),
        1,
        None,
    )
    with pytest.raises(ValueError, match="fragment order is limited to M <= 16"):
        sm.w4_linear_small_m_triton(*args, magic=True, asm=True, fragment_order=True)


def test_pinned_small_m_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Swept shapes run their measured tile on sm_90 only, by row bucket; anything else autotunes
    (fourteenth session), and every pinned tile is one the autotuner's pruning would allow."""
    pytest.importorskip("triton")
    from studio.kernels import small_m_tiles as tiles

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert tiles.pinned_tile(1, 48, 12288, cuda) == tiles.pinned_tile(16, 48, 12288, cuda)
    assert tiles.pinned_tile(16, 48, 12288, cuda) == dict(BLOCK_N=128, SPLIT_K=4, num_warps=4, num_stages=5)
    assert tiles.pinned_tile(40, 48, 12288, cuda) == dict(BLOCK_N=128, SPLIT_K=2, num_warps=4, num_stages=4)
    assert tiles.pinned_tile(24, 48, 12288, cuda) == dict(BLOCK_N=128, SPLIT_K=4, num_warps=4, num_stages=4)
    assert tiles.pinned_tile(100, 48, 12288, cuda) is None  # (not a small-M row count)
    assert tiles.pinned_tile(16, 48, 4096, cuda) is None
    assert tiles.pinned_tile(16, 48, 12288, torch.device("cpu")) is None
    for (_, kg, _), (_, split, _, _) in tiles.PINNED_TILES.items():
        assert split <= kg // 2
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert tiles.pinned_tile(16, 48, 12288, cuda) is None


@pytest.mark.parametrize("path", ["fused", "prefill", "small"])
def test_an_empty_batch_gives_an_empty_output(path: str) -> None:
    qweight, wscale = ref.quantize_weight(torch.randn(32, 128), "int4")
    x = torch.zeros(0, 128)
    args = (x, torch.ones(128), qweight, wscale, "int4", torch.zeros(128, 16), torch.zeros(32, 16))
    out = kernels.w4_linear(*args, torch.ones(1, 16), 1, None, path=path)
    assert out.shape == (0, 32) and out.dtype == x.dtype


def test_the_layer_takes_empty_batches() -> None:
    _, q = _quantized("int4")
    for shape in [(0, 200), (0, 5, 200), (2, 0, 200)]:
        assert q(torch.zeros(shape)).shape == (*shape[:-1], 72)


def test_bad_calibration_or_weights_get_a_clear_error() -> None:
    lin = nn.Linear(64, 16)
    calib = torch.randn(32, 64)
    calib[3, 5] = float("nan")
    with pytest.raises(ValueError, match="calibration activations hold 1 NaN/inf"):
        SVDQuantLinear.from_linear(lin, calib, rank=8)
    with pytest.raises(ValueError, match="have 65 features; the layer takes 64"):
        SVDQuantLinear.from_linear(lin, torch.randn(32, 65), rank=8)
    with pytest.raises(ValueError, match="no calibration activations"):
        SVDQuantLinear.from_linear(lin, torch.randn(0, 64), rank=8)
    with torch.no_grad():
        lin.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="weight hold 1 NaN/inf"):
        SVDQuantLinear.from_linear(lin, torch.randn(32, 64), rank=8)


def test_quantize_model_names_the_bad_layer_and_changes_nothing() -> None:
    from adapters.svdquant import SVDQuantConfig, quantize_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    with torch.no_grad():
        model[2].weight[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^2: the layer's weight hold 1 NaN/inf"):
        quantize_model(model, [torch.randn(8, 64)], SVDQuantConfig(rank=8))
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Linear)  # the good layer too
