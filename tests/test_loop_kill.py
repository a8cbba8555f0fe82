"""A real training process killed with SIGKILL mid-run, resumed, ends with the uninterrupted adapter."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio import checkpoints as ckpt
from studio.config import config_from_args
from studio.train import build_task

ROOT = Path(__file__).resolve().parent.parent
# 96 training images at batch 32: 3 batches an epoch, so the run crosses epochs; dropout
# exercises the RNG restore.
ARGS = [
    f"--config={ROOT / 'configs' / 'lora.toml'}",
    "--max_steps=20",
    "--checkpoint_every=6",
    "--eval_every=0",
    "--trackers=[]",
    "--progress=false",
    "--pipeline_options.n_test=1701",
    "--pipeline_options.dropout=0.1",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the CI box has two shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def launch(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(ROOT / "studio" / "train.py"), *ARGS, f"--output_dir={out}", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in ckpt.read_metrics(out) if "loss" in r]


@pytest.mark.slow
def test_sigkill_then_resume_latest_gives_the_uninterrupted_adapter(tmp_path):
    from studio.loop import train

    killed = tmp_path / "killed"
    proc = launch(killed, "--pipeline_options.step_delay_s=0.2")
    deadline = time.time() + 240
    while not (killed / "checkpoint-12").exists():
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()}"
        assert time.time() < deadline, "no checkpoint-12 within 240 s"
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.wait(timeout=30)
    assert proc.returncode == -9
    assert not (killed / "adapter").exists()
    assert max(s for s, _ in losses(killed)) < 20

    # Resume and the uninterrupted reference run in this process (same thread count).
    config = config_from_args([*ARGS, f"--output_dir={killed}", "--resume=latest"])
    resumed = train(build_task(config), config)
    assert (resumed.start_step, resumed.step) == (12, 20)
    config = config_from_args([*ARGS, f"--output_dir={tmp_path / 'whole'}"])
    whole = train(build_task(config), config)

    steps, values = zip(*losses(killed))
    assert list(steps) == [s for s, _ in losses(tmp_path / "whole")] == list(range(1, 21))
    assert list(values) == pytest.approx([v for _, v in losses(tmp_path / "whole")], abs=1e-6)
    a = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"adapters differ by {worst}"
    assert not list(killed.glob(".tmp-*"))
