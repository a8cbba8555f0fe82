"""SALT: identity at init, parameter count, gradient isolation, ReLU clamp, merge, regulariser."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_vit
from torch import nn

from adapters import base
from adapters.salt import SaltLayer, SaltSpec, parameter_count, salt_regularizer


def _linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 24))


def test_identity_at_init_within_1e5_and_exact_delta() -> None:
    model = _linear_model()
    x = torch.randn(5, 32)
    before = model(x)
    base.inject(model, SaltSpec(targets=["0", "2"], rank_ratio=0.5, lora_rank=4), "s")
    for _, host in base.iter_hosts(model):
        branch: SaltLayer = host.adapters["s"]
        w = host.base_layer.weight
        rebuilt = (branch.u_top * branch.singular_values()) @ branch.v_top.T
        s_rest = torch.linalg.svdvals(w.double())[branch.s_top.numel() :].float()
        rebuilt = rebuilt + (branch.u_rest * s_rest) @ branch.v_rest.T
        torch.testing.assert_close(rebuilt, w, rtol=0, atol=1e-5)  # W' = U ReLU(S') V^T = W
        assert torch.count_nonzero(branch.delta_weight()) == 0
    assert torch.equal(model(x), before)


def test_parameter_count_formula() -> None:
    spec = SaltSpec(targets=["0", "2"], rank_ratio=0.5, lora_rank=4)
    # layer 0: W 16x32, k=16, r=8 -> 2*8 + 2*8*4 = 80; layer 2: W 24x16, k=16 -> 80
    assert parameter_count(16, 32, spec) == 80
    assert parameter_count(24, 16, SaltSpec(top_rank=3, lora_rank=2)) == 2 * 3 + 2 * 13 * 2
    assert parameter_count(24, 16, SaltSpec(rank_ratio=1.0, lora_rank=4)) == 32  # SVD-only
    model = _linear_model()
    base.inject(model, spec, "s")
    assert sum(p.numel() for p in base.adapter_parameters(model, "s")) == 160


def test_gradients_reach_only_salt_parameters() -> None:
    torch.manual_seed(0)
    model = tiny_vit()
    base.inject(model, SaltSpec(targets=["qkv", "fc1", "patch_embed.proj"], lora_rank=2), "s")
    base.mark_only_adapters_trainable(model, "s")
    with torch.no_grad():
        for p in base.adapter_parameters(model, "s"):
            p.add_(0.01 * torch.randn_like(p))
    model(torch.randn(2, 3, 16, 16)).pow(2).mean().backward()
    salt_ids = {id(p) for p in base.adapter_parameters(model, "s")}
    for name, p in model.named_parameters():
        if id(p) in salt_ids:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_negative_singular_values_clamp_to_zero() -> None:
    model = _linear_model()
    base.inject(model, SaltSpec(targets=["0"], top_rank=4, lora_rank=0), "s")
    host = model[0]
    branch: SaltLayer = host.adapters["s"]
    with torch.no_grad():
        branch.shift.copy_(-2.0 * branch.s_top)  # a*s + b = -s < 0
    assert torch.equal(branch.singular_values(), torch.zeros(4))
    adapted = host.base_layer.weight + branch.delta_weight()
    s = torch.linalg.svdvals(host.base_layer.weight)
    s_new = torch.linalg.svdvals(adapted)
    torch.testing.assert_close(s_new[:12], s[4:], atol=1e-5, rtol=1e-5)  # top 4 directions removed
    assert s_new[12:].abs().max() < 1e-5


def test_merge_matches_live_output_and_regulariser_is_the_change_norm() -> None:
    model = _linear_model()
    base.inject(model, SaltSpec(targets=["0", "2"], lora_rank=3, reg_weight=0.5), "s")
    with torch.no_grad():
        for p in base.adapter_parameters(model, "s"):
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(7, 32)
    live = model(x)
    change = sum(h.adapters["s"].delta_weight().pow(2).sum() for _, h in base.iter_hosts(model))
    torch.testing.assert_close(salt_regularizer(model, "s"), 0.5 * change, rtol=1e-4, atol=1e-6)
    base.merge(model, "s")
    torch.testing.assert_close(model(x), live, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- the pipeline


def _task(mode: str, **kw):
    from pipelines.salt import SaltConfig, SaltTask

    opts = dict(mode=mode, tiny=True, n_train=20, n_test=16, n_source=32, source_steps=3, **kw)
    return SaltTask(SaltConfig(**opts))


def test_salt_segmenter_starts_at_the_source_model_and_merges(tmp_path) -> None:
    torch.manual_seed(0)
    plain = _task("decoder")
    ref = plain.build_model()
    salt = _task("salt")
    model = salt.build_model()
    x = salt.test_data.images[:4]
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))  # same source-trained decoder, identity adapter
        for p in base.adapter_parameters(model, "salt"):
            p.add_(0.05 * torch.randn_like(p))
        live = model(x)
        base.merge(model, "salt")
        torch.testing.assert_close(model(x), live, rtol=1e-4, atol=1e-4)


def test_salt_pipeline_trains_saves_and_reloads(tmp_path) -> None:
    from pipelines.vision_common import load_vision
    from studio.config import TrainConfig
    from studio.loop import train

    task = _task("salt", reg_weight=0.1)
    cfg = TrainConfig(
        pipeline="salt", output_dir=str(tmp_path / "r"), max_steps=3, batch_size=8, progress=False, cpu=True
    )
    result = train(task, cfg)
    assert 0.0 <= result.metrics["dice"] <= 1.0 and result.metrics["hd95"] >= 0.0
    _, model = load_vision(result.adapter_dir)
    assert task.evaluate(model)["dice"] == pytest.approx(result.metrics["dice"])


def test_dice_and_hd95_on_known_masks() -> None:
    from pipelines.vision_common import dice, hd95

    target = torch.zeros(1, 16, 16, dtype=torch.long)
    target[0, 4:8, 4:8] = 1
    assert dice(target, target) == 1.0 and hd95(target, target) == 0.0
    shifted = torch.roll(target, 3, dims=2)
    assert dice(shifted, target) == pytest.approx(2 * 4 / 32)
    assert hd95(shifted, target) == pytest.approx(3.0)
    # A class absent from the ground truth is ignored (MONAI ignore_empty); its stray pixels
    # still cost the overlapped class.
    stray = target.clone()
    stray[0, 4, 4] = 2
    assert dice(stray, target) == pytest.approx(2 * 15 / 31)
    missed = torch.zeros_like(target)
    assert dice(missed, target) == 0.0 and hd95(missed, target) == pytest.approx(16 * 2**0.5)


def test_docs_python_example_runs() -> None:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "vision_adapters.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "vision_adapters.md", "exec"), {})


def _repro(name: str):
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    return importlib.import_module(name)


@pytest.mark.slow
def test_repro_salt_quick(tmp_path) -> None:
    result = _repro("repro_salt").main(["--quick", "--out", str(tmp_path)])
    rows = {r["mode"]: r for r in result["rows"]}
    assert set(rows) == {"salt", "lora", "svd", "decoder"}
    assert rows["decoder"]["trainable"] < rows["svd"]["trainable"] < rows["salt"]["trainable"]
    assert all(0.0 <= d <= 1.0 for r in rows.values() for d in r["dice"])
