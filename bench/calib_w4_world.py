"""Synthetic vs real-prompt calibration of `studio quantize` on the tiny world's UNet (CPU).

    python bench/calib_w4_world.py [--threads 1] [--json out.json]

The fp32 pipeline ``assets/diffusion-tiny`` samples held-out prompts (the world's test set,
data seed 2, image seed 500, 20 DPM-Solver++ steps, the pipeline's default guidance) and
its UNet calls (every step, the CFG batch) are recorded.  The UNet is then quantized by
``adapters.svdquant.quantize_model`` (rank 32, INT4 and FP4, global seed 0) calibrated
either on ``studio quantize``'s synthetic batches (4 batches, seed 0 as the CLI, and seeds 1,
2) or on the UNet calls of other prompts (world data seed 10, image seeds 0, 1, 2;
``--prompt-sets`` of prompts x steps, 4 x 4 being ``studio quantize --calib-prompts``'s
default steps, what that command records), and the relative error of its noise prediction
``|eps_q - eps| / |eps|`` on the held-out calls is printed (all calls pooled, and the worst
call).  The spread over calibration seeds is the noise floor of the comparison.  "naive" (rank 0, no smoothing) needs no calibration and is the floor to beat.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.svdquant import SVDQuantConfig, quantize_model, quantized_modules  # noqa: E402
from studio.calibration import record_denoiser_calls  # noqa: E402
from studio.commands.quantize import calibration_batches  # noqa: E402


@dataclass
class CalibBenchConfig:
    #: Real-prompt calibration sets: (world prompts, sampling steps each); the first is the CLI default.
    prompt_sets: tuple[tuple[int, int], ...] = ((4, 4), (4, 20), (16, 4))
    #: World data seed of the calibration prompts (other prompts than the held-out ones).
    calib_data_seed: int = 10
    #: Image seeds of the calibration prompts (prompt i samples from seed + i); all of them for the
    #: first prompt set, the first one for the others (the spread over seeds is the noise floor).
    calib_seeds: tuple[int, ...] = (0, 1, 2)
    #: Held-out prompts (world test set, data seed ``test_data_seed``), their steps and image seed.
    test_prompts: int = 4
    test_steps: int = 20
    test_data_seed: int = 2
    test_seed: int = 500
    #: Synthetic batches (``studio quantize``'s default calibration) and their seeds (0: the CLI's).
    synthetic_batches: int = 4
    synthetic_seeds: tuple[int, ...] = (0, 1, 2)
    #: Low-rank branch rank and the 4-bit formats measured.
    rank: int = 32
    formats: tuple[str, ...] = ("int4", "fp4")
    #: Module names/patterns to quantize (None: every nn.Linear of the UNet).
    targets: tuple[str, ...] | None = None
    #: Global seed set before each quantization.
    seed: int = 0


def world_prompts(n: int, seed: int) -> list[str]:
    from studio.world.recipes.common import make_world_data

    return make_world_data(n, seed, workers=1).captions


@torch.no_grad()
def eps_error(unet: nn.Module, calls: list[dict], refs: list[torch.Tensor]) -> tuple[float, float]:
    """(pooled relative error of the noise prediction over all calls, worst single call)."""
    num = den = worst = 0.0
    for call, ref in zip(calls, refs):
        y = unet(**call, return_dict=False)[0].double()
        n, d = float((y - ref).pow(2).sum()), float(ref.pow(2).sum())
        num, den, worst = num + n, den + d, max(worst, math.sqrt(n / d))
    return math.sqrt(num / den), worst


def run(cfg: CalibBenchConfig, pipe: Any = None) -> dict[str, Any]:
    from studio.world.assets import load_diffusion

    pipe = pipe if pipe is not None else load_diffusion()
    base = pipe.unet.eval()
    test_calls = record_denoiser_calls(
        pipe, world_prompts(cfg.test_prompts, cfg.test_data_seed), cfg.test_steps, cfg.test_seed
    )
    with torch.no_grad():
        refs = [base(**c, return_dict=False)[0].double() for c in test_calls]
    calib_sets = {
        f"synthetic, seed {seed}": calibration_batches(base, cfg.synthetic_batches, seed)
        for seed in cfg.synthetic_seeds
    }
    for i, (n, steps) in enumerate(cfg.prompt_sets):
        prompts = world_prompts(n, cfg.calib_data_seed)
        for seed in cfg.calib_seeds if i == 0 else cfg.calib_seeds[:1]:
            calls = record_denoiser_calls(pipe, prompts, steps, seed)
            calib_sets[f"{n} prompts x {steps} steps, seed {seed}"] = calls
    targets = list(cfg.targets) if cfg.targets else None
    rows = []
    for fmt in cfg.formats:
        variants = [
            (
                "naive (rank 0, no smoothing)",
                next(iter(calib_sets)),
                SVDQuantConfig(rank=0, fmt=fmt, alphas=(None,), refine_iters=0),
            )
        ]
        variants += [(f"SVDQuant r{cfg.rank}", c, SVDQuantConfig(rank=cfg.rank, fmt=fmt)) for c in calib_sets]
        for name, calib, qcfg in variants:
            unet = copy.deepcopy(base)
            torch.manual_seed(cfg.seed)
            start = time.perf_counter()
            calib_err = quantize_model(unet, calib_sets[calib], qcfg, targets=targets)
            seconds = time.perf_counter() - start
            mods = quantized_modules(unet)
            smoothed = sum(bool((m.smooth_inv != 1).any()) for m in mods.values())
            err, worst = eps_error(unet, test_calls, refs)
            rows.append(
                {
                    "format": fmt,
                    "method": name,
                    "calibration": "-" if name.startswith("naive") else calib,
                    "layers": len(mods),
                    "layers_smoothed": smoothed,
                    "mean_calib_err": sum(calib_err.values()) / max(len(calib_err), 1),
                    "eps_rel_err": err,
                    "eps_rel_err_worst_call": worst,
                    "quantize_s": seconds,
                }
            )
    return {
        "config": asdict(cfg),
        "rows": rows,
        "test_calls": len(test_calls),
        "calib_calls": {k: len(v) for k, v in calib_sets.items()},
    }


def table(result: dict[str, Any]) -> str:
    head = (
        "| format | method | calibration | layers smoothed | mean calib err | held-out eps rel err "
        "| worst call | quantize s |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['format']} | {r['method']} | {r['calibration']} | {r['layers_smoothed']}/{r['layers']} "
            f"| {r['mean_calib_err']:.4f} | {r['eps_rel_err']:.4f} | {r['eps_rel_err_worst_call']:.4f} "
            f"| {r['quantize_s']:.1f} |"
        )
    calls = ", ".join(f"{k} {v}" for k, v in result["calib_calls"].items())
    lines.append(f"\nheld-out UNet calls: {result['test_calls']}; calibration calls: {calls}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument(
        "--prompt-sets", default="4x4,4x20,16x4", help="real-prompt calibration sets: PROMPTSxSTEPS,..."
    )
    p.add_argument("--test-prompts", type=int, default=4)
    p.add_argument("--test-steps", type=int, default=20)
    p.add_argument("--targets", nargs="*", default=None, help="module names/patterns (default: all)")
    p.add_argument("--json", default=None, help="write every number here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = CalibBenchConfig(
        prompt_sets=tuple(tuple(int(v) for v in s.split("x")) for s in args.prompt_sets.split(",")),
        test_prompts=args.test_prompts,
        test_steps=args.test_steps,
        targets=tuple(args.targets) if args.targets else None,
    )
    start = time.perf_counter()
    result = run(cfg)
    result["seconds"] = time.perf_counter() - start
    print(table(result))
    print(f"({result['seconds']:.0f} s on CPU, {args.threads} thread(s))")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
