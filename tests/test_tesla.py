"""TESLA: identity at init, shapes, task isolation of gradients, task switching and merging."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_vit

from adapters import base
from adapters.base import AdapterError
from adapters.tesla import TeslaSpec, set_task, shared_parameters, task_parameters, use_task


def _model():
    torch.manual_seed(0)
    return tiny_vit().eval(), torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def test_identity_at_init_for_every_task() -> None:
    model, x = _model()
    before = model(x)
    base.inject(model, TeslaSpec(targets=["qkv", "fc1", "fc2"], tasks=["cls", "seg"]), "t")
    for task in (None, "cls", "seg"):
        set_task(model, "t", task)
        assert torch.equal(model(x), before)


def test_shapes_of_the_components() -> None:
    model, _ = _model()
    base.inject(model, TeslaSpec(targets=["fc1"], tasks=["a", "b", "c"], shared_rank=5, task_rank=3), "t")
    branch = model.blocks[0].mlp.fc1.adapters["t"]
    assert branch.shared_A.shape == (5, 32) and branch.shared_B.shape == (128, 5)
    assert set(branch.task_A) == {"a", "b", "c"}
    assert branch.task_A["b"].shape == (3, 32) and branch.task_B["b"].shape == (128, 3)


@pytest.mark.parametrize("task,other", [("cls", "seg"), ("seg", "cls")])
def test_task_parameters_get_gradients_only_from_their_own_task(task: str, other: str) -> None:
    model, x = _model()
    base.inject(model, TeslaSpec(targets=["qkv", "fc2"]), "t")
    base.mark_only_adapters_trainable(model, "t")
    with torch.no_grad():
        for p in base.adapter_parameters(model, "t"):
            p.add_(0.05 * torch.randn_like(p))
    with use_task(model, "t", task):
        model(x).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in task_parameters(model, "t", task))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared_parameters(model, "t"))
    assert all(p.grad is None for p in task_parameters(model, "t", other))


def test_tasks_give_different_outputs_and_use_task_restores() -> None:
    model, x = _model()
    base.inject(model, TeslaSpec(targets=["fc2"], default_task="cls"), "t")
    with torch.no_grad():
        for p in base.adapter_parameters(model, "t"):
            p.add_(0.1 * torch.randn_like(p))
        out_cls = model(x)
        with use_task(model, "t", "seg"):
            out_seg = model(x)
        assert not torch.allclose(out_cls, out_seg)
        assert torch.equal(model(x), out_cls)


def test_merge_bakes_the_active_task_and_refuses_a_switch() -> None:
    model, x = _model()
    base.inject(model, TeslaSpec(targets=["fc1", "fc2"]), "t")
    with torch.no_grad():
        for p in base.adapter_parameters(model, "t"):
            p.add_(0.1 * torch.randn_like(p))
        set_task(model, "t", "seg")
        live = model(x)
        base.merge(model, "t")
        torch.testing.assert_close(model(x), live, rtol=1e-4, atol=1e-5)
    with pytest.raises(AdapterError, match="merged"):
        set_task(model, "t", "cls")
    with pytest.raises(AdapterError, match="not 'depth'"):
        set_task(model, "t", "depth")


# --------------------------------------------------------------------------- the EndoARSS pipeline


def _task(**kw):
    from pipelines.endoarss import EndoArssConfig, EndoArssTask

    return EndoArssTask(EndoArssConfig(tiny=True, n_total=64, n_test=16, **kw))


def test_endoarss_model_shapes_and_identity_at_init() -> None:
    from pipelines.endoarss import SpatialMultiScaleAttention

    task = _task()
    torch.manual_seed(0)
    model = task.build_model().eval()
    x = task.test_data.images[:3]
    cls, seg = model(x, "cls"), model(x, "seg")
    assert cls.shape == (3, task.train_data.num_classes)
    assert seg.shape == (3, task.train_data.num_mask_classes, *x.shape[-2:])
    with torch.no_grad():
        for name in ("tesla", "lora"):
            base.set_strength(model, name, 0.0)
        assert torch.equal(model(x, "seg"), seg)  # fresh adapters change nothing
    sma = SpatialMultiScaleAttention(16, groups=4)
    assert sma(torch.randn(2, 16, 5, 7)).shape == (2, 16, 5, 7)


def test_pcgrad_projects_conflicting_gradients() -> None:
    from pipelines.endoarss import gradient_cosine, pcgrad

    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    out = pcgrad({"a": [g1, torch.ones(1), None], "b": [g2, None, torch.ones(1)]})
    # each projected onto the other's normal plane: a -> (0.5, 0.5), b -> (0, 1)
    torch.testing.assert_close(out[0], torch.tensor([0.5, 1.5]))
    assert torch.equal(out[1], torch.ones(1)) and torch.equal(out[2], torch.ones(1))
    assert gradient_cosine({"a": [g1], "b": [g2]}) == pytest.approx(-(0.5**0.5))


def test_pcgrad_loss_keeps_task_specific_gradients_to_their_own_task() -> None:
    task = _task(balance="pcgrad")
    torch.manual_seed(0)
    model = task.build_model()
    with torch.no_grad():
        for p in base.adapter_parameters(model, "tesla"):
            p.add_(0.05 * torch.randn_like(p))
    batch = [t[:8] for t in task.train_data.tensors()]
    losses = task.task_losses(model, batch)
    seg_only = torch.autograd.grad(losses["seg"], task_parameters(model, "tesla", "seg"))
    task.loss(model, batch).backward()
    for p, g in zip(task_parameters(model, "tesla", "seg"), seg_only):
        torch.testing.assert_close(p.grad, g)  # no cls gradient leaks into seg's component


@pytest.mark.parametrize("opts", [{"mode": "tesla"}, {"mode": "single", "tasks": ["cls"], "sma": False}])
def test_endoarss_pipeline_trains_saves_and_reloads(tmp_path, opts: dict) -> None:
    from pipelines import get_pipeline
    from pipelines.vision_common import load_vision
    from studio.config import TrainConfig
    from studio.loop import train

    task = get_pipeline("endoarss")({"tiny": True, "n_total": 64, "n_test": 16, **opts})
    cfg = TrainConfig(
        pipeline="endoarss",
        output_dir=str(tmp_path / "r"),
        max_steps=2,
        batch_size=16,
        progress=False,
        cpu=True,
    )
    result = train(task, cfg)
    _, model = load_vision(result.adapter_dir)
    again = task.evaluate(model)
    assert again["accuracy"] == pytest.approx(result.metrics["accuracy"])
    if opts["mode"] == "tesla":
        assert again["miou"] == pytest.approx(result.metrics["miou"])
        assert -1.0 <= result.metrics["grad_cosine"] <= 1.0


def _repro(name: str):
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    return importlib.import_module(name)


@pytest.mark.slow
def test_repro_endoarss_quick(tmp_path) -> None:
    rows = _repro("repro_endoarss").main(["--quick", "--out", str(tmp_path)])
    assert {r["variant"] for r in rows} == {"single x2", "shared LoRA", "TESLA"}
    assert all(-1.0 <= r["cosine"][0] <= 1.0 for r in rows if r["variant"] != "single x2")


@pytest.mark.slow
def test_repro_endoarss_workers_share_the_runs(tmp_path) -> None:
    """--workers: processes with their own memo files; the parent merges them and prints the table."""
    rows = _repro("repro_endoarss").main(["--quick", "--out", str(tmp_path), "--workers", "2"])
    # the quick plan has one seed: worker 0 ran everything, worker 1 had nothing to do
    assert sorted(p.name for p in tmp_path.glob("runs.w*.json")) == ["runs.w0.json"]
    assert {r["variant"] for r in rows} == {"single x2", "shared LoRA", "TESLA"}
    merged = json.loads((tmp_path / "runs.json").read_text())
    assert len(merged) == 4  # single x2 (two runs), shared, TESLA: one seed in the quick plan
    again = _repro("repro_endoarss").main(["--quick", "--out", str(tmp_path)])  # all from the memo
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]
