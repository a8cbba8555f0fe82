"""The core contract, checked for every registered method on every tiny model.

A method enters the matrix through METHOD_SPECS: a function from a tiny case to a spec,
or None where the method does not apply to that model (the reason is in the comment).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import CASES, TinyCase

from adapters import base
from adapters.base import AdapterError, AdapterSpec
from adapters.lora import LoraSpec


def _lora(case: TinyCase) -> AdapterSpec:
    return LoraSpec(targets=case.linear_targets + case.conv_targets, rank=3, alpha=6.0)


def _lora_pissa(case: TinyCase) -> AdapterSpec:
    return LoraSpec(targets=case.linear_targets + case.conv_targets, rank=2, init="pissa", use_rslora=True)


def _optional(method: str, factory_name: str):
    """Spec factories that live beside each method (added as the methods land)."""

    def make(case: TinyCase) -> AdapterSpec | None:
        module = __import__(f"adapters.{method}", fromlist=[factory_name])
        return getattr(module, factory_name)(case.linear_targets, case.conv_targets, case.block_targets)

    return make


METHOD_SPECS = {
    "lora": _lora,
    "lora-pissa": _lora_pissa,
}
# Methods added by later issues provide `matrix_spec(linear, conv, blocks) -> spec | None`.
for _method in sorted(base.methods()):
    if _method != "lora":
        METHOD_SPECS[_method] = _optional(_method, "matrix_spec")

MATRIX = [(m, c) for m in METHOD_SPECS for c in CASES]


def _setup(method: str, case: TinyCase):
    torch.manual_seed(0)
    model = case.build().eval()
    spec = METHOD_SPECS[method](case)
    if spec is None:
        pytest.skip(f"{method} does not apply to the {case.name} model (see its matrix_spec)")
    return model, spec


def _perturb(model: torch.nn.Module, name: str, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in base.adapter_parameters(model, name):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _inputs(case: TinyCase, batch: int = 3) -> dict:
    return case.inputs(batch, torch.Generator().manual_seed(7))


def test_every_method_is_in_the_matrix() -> None:
    assert set(base.methods()) <= set(METHOD_SPECS)


@pytest.mark.parametrize("method,case", MATRIX, ids=[f"{m}-{c.name}" for m, c in MATRIX])
def test_fresh_adapter_changes_nothing_and_unload_is_exact(method: str, case: TinyCase) -> None:
    model, spec = _setup(method, case)
    inputs = _inputs(case)
    before = case.run(model, inputs)
    weights = copy.deepcopy(model.state_dict())
    adapted = base.inject(model, spec, "a")
    assert adapted, "the spec adapted no module"
    assert torch.equal(case.run(model, inputs), before)
    _perturb(model, "a")
    assert not torch.allclose(case.run(model, inputs), before), "perturbed adapter should change output"
    if base.get_method(spec.method).layers[0].mergeable:
        base.merge(model, "a")
        base.unmerge(model, "a")
    base.unload(model)
    after = model.state_dict()
    assert list(after) == list(weights)
    assert all(torch.equal(after[k], weights[k]) for k in weights)
    assert torch.equal(case.run(model, inputs), before)


@pytest.mark.parametrize("method,case", MATRIX, ids=[f"{m}-{c.name}" for m, c in MATRIX])
def test_merged_equals_unmerged(method: str, case: TinyCase) -> None:
    model, spec = _setup(method, case)
    inputs = _inputs(case)
    base.inject(model, spec, "a")
    _perturb(model, "a")
    base.set_strength(model, "a", 0.7)
    with torch.no_grad():
        live = case.run(model, inputs)
        mergeable = all(h.adapters["a"].mergeable for _, h in base.iter_hosts(model))
        if not mergeable:
            weights = copy.deepcopy(model.state_dict())
            with pytest.raises(AdapterError, match="cannot be merged"):
                base.merge(model, "a")
            assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
            return
        base.merge(model, "a")
        merged = case.run(model, inputs)
    torch.testing.assert_close(merged, live, rtol=1e-4, atol=1e-4)
    with pytest.raises(AdapterError, match="merged"):
        base.set_strength(model, "a", 1.0)


@pytest.mark.parametrize("method,case", MATRIX, ids=[f"{m}-{c.name}" for m, c in MATRIX])
def test_state_dict_round_trip_is_bit_exact(method: str, case: TinyCase) -> None:
    model, spec = _setup(method, case)
    base.inject(model, spec, "a")
    _perturb(model, "a")
    saved = {k: v.clone() for k, v in base.adapter_state_dict(model, "a").items()}
    inputs = _inputs(case)
    with torch.no_grad():
        expected = case.run(model, inputs)
    fresh = case.build().eval()
    fresh.load_state_dict(base.unload(copy.deepcopy(model)).state_dict())
    base.inject(fresh, spec, "a")
    base.load_adapter_state_dict(fresh, "a", saved)
    with torch.no_grad():
        assert torch.equal(case.run(fresh, inputs), expected)


@pytest.mark.parametrize("method,case", MATRIX, ids=[f"{m}-{c.name}" for m, c in MATRIX])
def test_only_adapter_parameters_train(method: str, case: TinyCase) -> None:
    model, spec = _setup(method, case)
    base.inject(model, spec, "a")
    _perturb(model, "a")
    n_trainable = base.mark_only_adapters_trainable(model, "a")
    assert n_trainable > 0
    out = case.run(model.train(), _inputs(case))
    out.float().pow(2).mean().backward()
    adapter_ids = {id(p) for p in base.adapter_parameters(model, "a")}
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            assert p.requires_grad
        else:
            assert p.grad is None, f"base parameter {name} received a gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in base.adapter_parameters(model, "a"))


@pytest.mark.parametrize("method,case", MATRIX, ids=[f"{m}-{c.name}" for m, c in MATRIX])
def test_one_optimizer_step_lowers_the_loss(method: str, case: TinyCase) -> None:
    model, spec = _setup(method, case)
    base.inject(model, spec, "a")
    base.mark_only_adapters_trainable(model, "a")
    inputs = _inputs(case, batch=4)
    with torch.no_grad():
        target = case.run(model, inputs) + 0.5
    opt = torch.optim.Adam(list(base.adapter_parameters(model, "a")), lr=1e-3)
    losses = []
    for _ in range(3):
        # eval mode: the DiT drops class labels at random in train mode (CFG training)
        loss = (case.run(model, inputs) - target).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method,case", MATRIX, ids=[f"{m}-{c.name}" for m, c in MATRIX])
def test_per_sample_strengths_equal_running_each_sample_alone(method: str, case: TinyCase) -> None:
    model, spec = _setup(method, case)
    base.inject(model, spec, "a")
    _perturb(model, "a")
    base.inject(model, LoraSpec(targets=case.linear_targets, rank=2), "b")
    _perturb(model, "b", seed=2)
    inputs = _inputs(case)
    strengths_a = torch.tensor([0.0, 1.0, 0.5])
    strengths_b = torch.tensor([1.0, -0.5, 0.25])
    base.set_strength(model, "a", strengths_a)
    base.set_strength(model, "b", strengths_b)
    with torch.no_grad():
        batched = case.run(model, inputs)
        for i in range(3):
            base.set_strength(model, "a", float(strengths_a[i]))
            base.set_strength(model, "b", float(strengths_b[i]))
            row = {k: (v[i : i + 1] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in inputs.items()}
            torch.testing.assert_close(case.run(model, row), batched[i : i + 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["keys", "update", "training", "forward"])
def test_reserved_adapter_names_are_refused_and_change_nothing(name: str) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    before = [type(m) for m in model.modules()]
    with pytest.raises(AdapterError, match="reserved"):
        base.inject(model, LoraSpec(targets=["0"], rank=2), name)
    assert [type(m) for m in model.modules()] == before
