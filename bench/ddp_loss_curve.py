"""Data-parallel check: the LoRA pipeline on 1 and on 2 processes with the same global batch.

    python bench/ddp_loss_curve.py                 # 2 GPUs (NCCL)
    python bench/ddp_loss_curve.py --cpu           # 2 CPU processes (gloo), for a quick check

Runs ``accelerate launch --num_processes 1`` and ``--multi_gpu --num_processes 2`` on
``studio/train.py`` with the same config and global batch (the loop gives each process
batch_size / (processes x grad_accum) samples), reads both ``metrics.jsonl`` files and
prints the loss curves side by side with the largest difference.  Exits 1 when the
largest difference exceeds ``--tol``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def launch(num_processes: int, out: Path, args: argparse.Namespace) -> float:
    """Run one training; returns wall seconds."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    launcher += ["--multi_gpu"] if num_processes > 1 else []
    launcher += [
        f"--num_processes={num_processes}",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={29500 + num_processes + args.port_offset}",
    ]
    train = [
        str(ROOT / "studio" / "train.py"),
        f"--config={args.config}",
        f"--output_dir={out}",
        f"--max_steps={args.steps}",
        f"--batch_size={args.batch_size}",
        f"--grad_accum={args.grad_accum}",
        f"--seed={args.seed}",
        f"--mixed_precision={args.mixed_precision}",
        "--checkpoint_every=0",
        "--eval_every=0",
        "--trackers=[]",
        "--progress=false",
    ]
    train += ["--cpu=true"] if args.cpu else []
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    start = time.time()
    subprocess.run(launcher + train + args.overrides, check=True, env=env, cwd=ROOT)
    return time.time() - start


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def final_metrics(out: Path) -> dict[str, float]:
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    return {k: v for r in records for k, v in r.items() if k.startswith("eval/")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "lora.toml"))
    p.add_argument("--out", default=str(ROOT / "runs" / "ddp_check"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch_size", type=int, default=32, help="global batch, the same for both runs")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed_precision", default="no")
    p.add_argument("--cpu", action="store_true", help="train on CPU processes (gloo) instead of GPUs")
    p.add_argument("--tol", type=float, default=1e-2, help="largest allowed loss difference")
    p.add_argument("--port_offset", type=int, default=0)
    args, args.overrides = p.parse_known_args()  # the rest: --key=value options for studio/train.py

    out = Path(args.out)
    runs = {}
    for n in (1, 2):
        folder = out / f"np{n}"
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        wall = launch(n, folder, args)
        runs[n] = (losses(folder), final_metrics(folder), wall)

    one, two = runs[1][0], runs[2][0]
    steps = sorted(set(one) & set(two))
    diffs = [abs(one[s] - two[s]) for s in steps]
    print(f"\n{'step':>5} {'1 process':>12} {'2 processes':>12} {'|diff|':>10}")
    for s in steps:
        if s == 1 or s % 5 == 0 or s == steps[-1]:
            print(f"{s:>5} {one[s]:>12.6f} {two[s]:>12.6f} {abs(one[s] - two[s]):>10.2e}")
    worst = max(diffs)
    summary = {
        "steps": len(steps),
        "global_batch": args.batch_size,
        "grad_accum": args.grad_accum,
        "device": "cpu (gloo)" if args.cpu else "cuda (nccl)",
        "max_abs_diff": worst,
        "mean_abs_diff": sum(diffs) / len(diffs),
        "final_loss": {"np1": one[steps[-1]], "np2": two[steps[-1]]},
        "eval": {"np1": runs[1][1], "np2": runs[2][1]},
        "wall_s": {"np1": round(runs[1][2], 1), "np2": round(runs[2][2], 1)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nmax |loss diff| over {len(steps)} steps: {worst:.3e} (mean {summary['mean_abs_diff']:.3e})")
    print(json.dumps(summary))
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
