"""The shared training loop (studio/loop.py): one step, accumulation, precision, checkpoints, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from adapters import base
from adapters.lora import LoraSpec
from studio import checkpoints as ckpt
from studio.config import ConfigError, TrainConfig
from studio.loop import lr_lambda, seeded_dataloader, train


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the CI box has two shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MlpTask:
    """A tiny regression task with LoRA on both linears of a fixed random MLP."""

    def __init__(self, n: int = 64, dropout: float = 0.0) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.sin(self.x @ torch.randn(8, 1, generator=g))
        self.dropout = dropout
        self.seen_dtypes: set[torch.dtype] = set()
        self.param_dtypes: set[torch.dtype] = set()

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        base.inject(model, LoraSpec(targets=["0", "2"], rank=2, alpha=2.0, dropout=self.dropout), "t")
        base.mark_only_adapters_trainable(model, "t")
        # The loop's autocast wraps the whole forward and hands back fp32 outputs, so look inside.
        model[2].register_forward_hook(lambda mod, args, out: self.seen_dtypes.add(out.dtype))
        return model

    def train_dataloader(self, batch_size: int, seed: int):
        return seeded_dataloader(TensorDataset(self.x, self.y), batch_size, seed)

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        x, y = batch
        out = model(x)
        self.param_dtypes |= {p.dtype for p in model.parameters() if p.requires_grad}
        return F.mse_loss(out.float(), y), {"out_mean": out.float().mean().item()}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device  # the loop hands back the model on its device
        return {"mse": F.mse_loss(model(self.x.to(device)).float(), self.y.to(device)).item()}

    def save_adapter(self, model: nn.Module, folder: Path) -> None:
        folder.mkdir(parents=True)
        state = {k: v.contiguous() for k, v in base.adapter_state_dict(model, "t").items()}
        save_file(state, str(folder / "adapter.safetensors"))


def cfg(tmp_path: Path, name: str = "run", **kw) -> TrainConfig:
    base_kw = dict(output_dir=str(tmp_path / name), max_steps=6, batch_size=8, lr=1e-2, progress=False)
    return TrainConfig(**{**base_kw, **kw})


def adapter(result) -> dict[str, torch.Tensor]:
    return load_file(str(next(result.adapter_dir.glob("*.safetensors"))))


def loss_log(folder: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in ckpt.read_metrics(folder) if "loss" in r]


def test_one_loop_step_lowers_the_loss(tmp_path):
    from pipelines.lora import LoraTask

    class Probe(LoraTask):
        """Remembers the batch the step trained on and scores it again after the step."""

        def loss(self, model, batch):
            self.batch = [t.clone() for t in batch]
            return super().loss(model, batch)

        def evaluate(self, model):
            return {"batch_loss": LoraTask.loss(self, model, self.batch).item()}

    result = train(Probe(), cfg(tmp_path, max_steps=1, batch_size=16, lr=1e-2, seed=0))
    before = result.losses[0]
    assert 2.0 < before < 2.6  # ~ln(10): a fresh LoRA on a random base model
    assert result.metrics["batch_loss"] < before - 1e-3
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert (result.adapter_dir / "adapter_config.json").is_file()


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    big = train(MlpTask(), cfg(tmp_path, "big", batch_size=8, grad_accum=1))
    acc = train(MlpTask(), cfg(tmp_path, "acc", batch_size=8, grad_accum=2))
    assert big.step == acc.step == 6
    for (k, a), b in zip(adapter(big).items(), adapter(acc).values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)
    assert big.losses == pytest.approx(acc.losses, abs=1e-6)
    assert any(a != 0 for a in adapter(big)["2.lora_B"].flatten())  # it did train


def test_bf16_autocast_keeps_adapter_params_fp32(tmp_path):
    task = MlpTask()
    result = train(task, cfg(tmp_path, mixed_precision="bf16", cpu=True))
    assert torch.bfloat16 in task.seen_dtypes  # the forward ran under autocast
    assert task.param_dtypes == {torch.float32}
    assert {t.dtype for t in adapter(result).values()} == {torch.float32}


def test_checkpoint_retention(tmp_path):
    train(MlpTask(), cfg(tmp_path, "keep2", max_steps=10, checkpoint_every=2, keep_checkpoints=2))
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "keep2")] == [8, 10]
    train(MlpTask(), cfg(tmp_path, "all", max_steps=6, checkpoint_every=2, keep_checkpoints=0))
    found = ckpt.list_checkpoints(tmp_path / "all")
    assert [s for s, _ in found] == [2, 4, 6]
    files = {p.name for p in found[0][1].iterdir()}
    assert {"trainer_state.json", "model.safetensors", "optimizer.bin", "scheduler.bin"} <= files
    # Checkpoints hold the trainable tensors only, never the base model.
    assert set(load_file(str(found[0][1] / "model.safetensors"))) == set(adapter_keys())


def adapter_keys() -> list[str]:
    model = MlpTask().build_model()
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_checkpoint_is_atomic_and_a_crash_resumes_from_the_last_whole_one(tmp_path, monkeypatch):
    from accelerate import Accelerator

    real_save = Accelerator.save_state
    calls = []

    def crashing_save(self, output_dir=None, **kw):
        calls.append(output_dir)
        if len(calls) == 2:  # the second checkpoint dies half-way through its files
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
            raise OSError("disk full")
        return real_save(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", crashing_save)
    config = cfg(tmp_path, max_steps=8, checkpoint_every=3)
    with pytest.raises(OSError, match="disk full"):
        train(MlpTask(), config)
    out = Path(config.output_dir)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [3]
    assert not (out / "checkpoint-6").exists() and (out / ".tmp-checkpoint-6").exists()
    monkeypatch.setattr(Accelerator, "save_state", real_save)

    config.resume = "latest"
    result = train(MlpTask(), config)
    assert result.start_step == 3 and result.step == 8
    assert not list(out.glob(".tmp-*"))
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [3, 6]


def test_resume_latest_gives_the_same_losses_and_adapter(tmp_path):
    """Dropout on (RNG restore) and 3 epochs of 4 batches (resume mid-epoch, across epochs)."""
    whole = train(MlpTask(n=32, dropout=0.2), cfg(tmp_path, "whole", max_steps=12, lr_schedule="cosine"))

    config = cfg(tmp_path, "parts", max_steps=12, lr_schedule="cosine", checkpoint_every=5)
    seen: list[int] = []
    first = train(
        MlpTask(n=32, dropout=0.2),
        config,
        on_progress=lambda step, total, loss: seen.append(step),
        should_stop=lambda: len(seen) >= 7,
    )
    assert first.stopped and first.step == 7
    assert [s for s, _ in ckpt.list_checkpoints(config.output_dir)] == [5, 7]
    (Path(config.output_dir) / "checkpoint-7").rename(Path(config.output_dir) / ".tmp-x")  # resume from 5
    config.resume = "latest"
    second = train(MlpTask(n=32, dropout=0.2), config)
    assert second.start_step == 5 and second.step == 12
    assert loss_log(tmp_path / "parts") == loss_log(tmp_path / "whole")
    assert len(loss_log(tmp_path / "whole")) == 12
    for (k, a), b in zip(adapter(whole).items(), adapter(second).values()):
        assert torch.equal(a, b), k


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    train(MlpTask(), cfg(tmp_path, max_steps=2, checkpoint_every=2))
    with pytest.raises(ConfigError, match="--resume latest"):
        train(MlpTask(), cfg(tmp_path, max_steps=2))


def test_batch_must_divide_over_accumulation(tmp_path):
    with pytest.raises(ConfigError, match="multiple of processes x grad_accum"):
        train(MlpTask(), cfg(tmp_path, batch_size=6, grad_accum=4))


def test_logs_jsonl_csv_and_eval(tmp_path):
    result = train(MlpTask(), cfg(tmp_path, max_steps=4, eval_every=2, trackers=["csv"], log_every=2))
    records = ckpt.read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    assert [r["step"] for r in records if "eval/mse" in r] == [2, 4]
    assert all("out_mean" in r and "lr" in r for r in records if "loss" in r)
    assert result.metrics["mse"] == records[-1]["eval/mse"]
    csv = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert csv[0] == "step,key,value" and any(ln.startswith("4,loss,") for ln in csv)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["max_steps"] == 4


def test_missing_tracker_is_a_clear_error_and_the_next_run_still_works(tmp_path):
    with pytest.raises(ConfigError, match="tracker.*nosuch|Unsupported logging capability: nosuch"):
        train(MlpTask(), cfg(tmp_path, "a", trackers=["nosuch"]))
    assert train(MlpTask(), cfg(tmp_path, "b", max_steps=1, mixed_precision="bf16", cpu=True)).step == 1


def test_resume_with_changed_settings_warns(tmp_path, capsys):
    train(MlpTask(), cfg(tmp_path, max_steps=2, checkpoint_every=2))
    train(MlpTask(), cfg(tmp_path, max_steps=3, lr=5e-3, resume="latest"))
    assert "warning: resuming with changed lr" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_gpu_keeps_adapter_params_fp32(tmp_path, precision):
    task = MlpTask()
    result = train(task, cfg(tmp_path, mixed_precision=precision, max_steps=20))
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    assert half in task.seen_dtypes and task.param_dtypes == {torch.float32}
    assert {t.dtype for t in adapter(result).values()} == {torch.float32}
    assert result.losses[-1] < result.losses[0]


def test_lr_schedules():
    c = TrainConfig(max_steps=10, warmup_steps=2, lr_schedule="cosine")
    f = lr_lambda(c)
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0] and f(10) == pytest.approx(0.0)
    assert lr_lambda(TrainConfig(max_steps=10, lr_schedule="linear"))(5) == pytest.approx(0.5)
    assert lr_lambda(TrainConfig(max_steps=10))(7) == 1.0
