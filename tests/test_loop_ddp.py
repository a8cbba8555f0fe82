"""Data-parallel training on two CPU processes (gloo) matches one process at the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from studio import checkpoints as ckpt
from studio.config import config_from_args
from studio.train import build_task

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_one_process_loss_curve(tmp_path):
    from studio.loop import train

    args = [
        f"--config={ROOT / 'configs' / 'lora.toml'}",
        "--max_steps=6",
        "--batch_size=16",
        "--grad_accum=2",
        "--checkpoint_every=0",
        "--eval_every=0",
        "--trackers=[]",
        "--progress=false",
        "--cpu=true",
    ]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2"]
    launch += ["--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]
    launch += [f"--main_process_port={free_port()}", str(ROOT / "studio" / "train.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = subprocess.run(
        launch + args + [f"--output_dir={tmp_path / 'np2'}"], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("done: lora step 6/6") == 1  # printed by the main process only

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = config_from_args(args + [f"--output_dir={tmp_path / 'np1'}"])
        train(build_task(config), config)
    finally:
        torch.set_num_threads(threads)
    two = [r["loss"] for r in ckpt.read_metrics(tmp_path / "np2") if "loss" in r]
    one = [r["loss"] for r in ckpt.read_metrics(tmp_path / "np1") if "loss" in r]
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, abs=1e-5)
    assert one[-1] < one[0]
