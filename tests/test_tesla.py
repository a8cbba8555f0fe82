"""TESLA: identity at init, shapes, task isolation of gradients, task switching and merging."""

from __future__ import annotations

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
