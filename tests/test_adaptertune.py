"""AdapterTune: exact start at the pretrained function, step-0 gradients, placement, refusal to merge."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_vit

from adapters import base
from adapters.adaptertune import AdapterTuneSpec, block_targets
from adapters.base import AdapterError


def _vit_and_batch():
    torch.manual_seed(0)
    model = tiny_vit().eval()
    return model, torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_step0_features_are_bit_equal_to_the_base() -> None:
    model, x = _vit_and_batch()
    before = model.forward_features(x)
    names = base.inject(model, AdapterTuneSpec(targets=[r"blocks\.\d+"], rank=8), "at")
    assert names == ["blocks.0", "blocks.1"]
    assert torch.equal(model.forward_features(x), before)


def test_step0_gradient_to_down_is_exactly_zero_and_to_up_is_not() -> None:
    model, x = _vit_and_batch()
    base.inject(model, AdapterTuneSpec(targets=[r"blocks\.\d+"], rank=8), "at")
    base.mark_only_adapters_trainable(model, "at")
    model(x).logsumexp(-1).mean().backward()
    for _, host in base.iter_hosts(model):
        branch = host.adapters["at"]
        assert torch.count_nonzero(branch.down.weight.grad) == 0
        assert torch.count_nonzero(branch.down.bias.grad) == 0
        assert branch.up.weight.grad.abs().sum() > 0
        assert branch.up.bias.grad.abs().sum() > 0


def test_small_init_ablation_moves_the_output_and_zero_init_does_not() -> None:
    model, x = _vit_and_batch()
    before = model(x)
    base.inject(model, AdapterTuneSpec(targets=[r"blocks\.\d+"], init="small", small_std=0.1), "s")
    assert not torch.allclose(model(x), before)


def test_placement_every_k_and_last_half() -> None:
    assert block_targets("blocks", 6, "every2") == ["blocks.0", "blocks.2", "blocks.4"]
    assert block_targets("blocks", 6, "last_half") == ["blocks.3", "blocks.4", "blocks.5"]
    assert block_targets("blocks", 4, "last") == ["blocks.3"]
    with pytest.raises(AdapterError, match="unknown placement"):
        block_targets("blocks", 4, "middle")
    model, _ = _vit_and_batch()
    names = base.inject(model, AdapterTuneSpec(targets=[r"blocks\.\d+"], start=1), "late")
    assert names == ["blocks.1"]


def test_merge_is_refused_clearly_and_changes_nothing() -> None:
    model, x = _vit_and_batch()
    base.inject(model, AdapterTuneSpec(targets=[r"blocks\.\d+"], init="small", small_std=0.1), "at")
    out = model(x)
    with pytest.raises(AdapterError, match="cannot be merged"):
        base.merge(model, "at")
    assert torch.equal(model(x), out)


def test_parameter_count_and_spec_round_trip() -> None:
    model, _ = _vit_and_batch()
    spec = AdapterTuneSpec(targets=["blocks.0"], rank=4, alpha=0.5, init="small")
    base.inject(model, spec, "at")
    dim = 32
    assert sum(p.numel() for p in base.adapter_parameters(model, "at")) == 2 * dim * 4 + 4 + dim
    assert AdapterTuneSpec.from_dict(spec.to_dict()) == spec


def test_non_block_targets_are_rejected_with_the_pattern_named() -> None:
    model, _ = _vit_and_batch()
    with pytest.raises(AdapterError, match="head"):
        base.inject(model, AdapterTuneSpec(targets=["head"]), "at")


# --------------------------------------------------------------------------- the pipeline


def _run(tmp_path, pipeline: str, options: dict, steps: int = 3):
    from pipelines import get_pipeline
    from studio.config import TrainConfig
    from studio.loop import train

    task = get_pipeline(pipeline)(options)
    config = TrainConfig(
        pipeline=pipeline,
        output_dir=str(tmp_path / "run"),
        max_steps=steps,
        batch_size=16,
        progress=False,
        cpu=True,
    )
    return task, train(task, config)


@pytest.mark.parametrize("mode", ["adaptertune", "head", "lora", "full"])
def test_pipeline_trains_saves_and_reloads_every_mode(tmp_path, mode: str) -> None:
    from pipelines.vision_common import load_vision

    opts = {"mode": mode, "tiny": True, "n_train": 64, "n_test": 48, "rank": 4}
    task, result = _run(tmp_path, "adaptertune", opts)
    assert result.losses and all(torch.isfinite(torch.tensor(result.losses)))
    shares = {"head": (0, 0.05), "adaptertune": (0.01, 0.5), "lora": (0.01, 0.5), "full": (1.0, 1.0)}
    low, high = shares[mode]
    assert low <= result.metrics["trainable_share"] <= high
    _, model = load_vision(result.adapter_dir)
    assert task.evaluate(model)["accuracy"] == pytest.approx(result.metrics["accuracy"])


def test_pipeline_adapter_folder_is_a_studio_adaptertune_adapter(tmp_path) -> None:
    import json

    _, result = _run(
        tmp_path, "adaptertune", {"tiny": True, "n_train": 32, "n_test": 32, "placement": "last"}, 1
    )
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["method"] == "adaptertune"
    assert config["spec"]["targets"] == ["backbone.blocks.1"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "pipeline,extra",
    [
        ("adaptertune", ["--pipeline_options.n_train", "32"]),
        ("salt", ["--pipeline_options.n_train", "16", "--pipeline_options.source_steps", "1"]),
        ("endoarss", ["--pipeline_options.n_total", "48"]),
    ],
)
def test_train_script_runs_each_vision_pipeline(tmp_path, pipeline: str, extra: list[str]) -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        str(root / "studio" / "train.py"),
        "--pipeline",
        pipeline,
        "--output_dir",
        str(tmp_path),
    ]
    cmd += ["--max_steps", "1", "--batch_size", "8", "--cpu", "true", "--progress", "false"]
    cmd += ["--pipeline_options.tiny", "true", "--pipeline_options.n_test", "16", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"done: {pipeline} step 1/1" in out.stdout
    assert (tmp_path / "adapter" / "heads.safetensors").is_file()


def _repro(name: str):
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    return importlib.import_module(name)


@pytest.mark.slow
def test_repro_adaptertune_quick(tmp_path) -> None:
    tables = _repro("repro_adaptertune").main(["--quick", "--out", str(tmp_path)])
    assert {r["mode"] for r in tables["main"]} == {"head", "adaptertune", "lora", "full"}
    shares = {r["mode"]: r["share"] for r in tables["main"]}
    assert shares["head"] < shares["adaptertune"] < shares["full"] == 1.0
    assert (tmp_path / "adaptertune_elbow.png").stat().st_size > 1000
