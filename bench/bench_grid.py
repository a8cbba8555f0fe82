"""Batched grid rendering vs the cell-by-cell loop with vanilla diffusers ``set_adapters``.

Both sides render the same grid (a no-adapter baseline row plus strengths x seeds for a
two-LoRA stack) from the same base weights and the same LoRA tensors:

- studio: ``StudioService.render_grid`` -- cells batched, each row with its own strengths;
- diffusers: the LoRAs loaded with ``load_lora_weights`` (PEFT), then per cell
  ``set_adapters(names, weights)`` and one pipeline call.

It prints seconds per grid for each, the speed-up and the largest pixel difference.

    python bench/bench_grid.py --steps 10 --device cpu
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from studio.service import StudioService, components
from studio.service_grid import Axis, GridSpec, plan_grid
from studio.service_models import build_tiny_pipeline
from studio.service_types import GenerationSettings


def peft_state_dict(service: StudioService, name: str, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """The studio LoRA as diffusers/PEFT keys; the LoRA scale is folded into B (PEFT alpha = rank)."""
    spec, state = service._record(name).parts["unet"]
    out = {}
    for key, tensor in state.items():
        module, kind = key.rsplit(".", 1)
        value = tensor * spec.scale() if kind == "lora_B" else tensor
        out[f"{prefix}.{module}.{kind}.weight"] = value.clone()
    return out


def vanilla_loop(pipe, cells: list[GenerationSettings], names: list[str]) -> list:
    images = []
    for c in cells:
        weights = {a.name: a.strength for a in c.adapters}
        pipe.set_adapters(names, [weights.get(n, 0.0) for n in names])
        out = pipe(
            prompt=c.prompt,
            negative_prompt=c.negative_prompt,
            num_inference_steps=c.steps,
            guidance_scale=c.guidance,
            width=c.width,
            height=c.height,
            generator=torch.Generator("cpu").manual_seed(c.seed),
            output_type="pil",
        )
        images.append(out.images[0])
    return images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seeds", default="1,2,3,4")
    ap.add_argument("--strengths", default="0.25,0.5,1")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    service = StudioService(device=args.device, max_batch=args.max_batch)
    service.add_example_adapters()
    names = ["example-attn", "example-conv"]
    base = GenerationSettings(
        base_model="tiny-sd",
        prompt="a red circle",
        steps=args.steps,
        guidance=5.0,
        width=args.size,
        height=args.size,
        adapters=names,
    )
    spec = GridSpec(base, Axis.parse(f"seed={args.seeds}"), Axis.parse(f"strength={args.strengths}"))
    cells = [c.settings for c in plan_grid(spec).cells]

    pipe = build_tiny_pipeline().to(args.device)  # same seed -> same base weights as the service's
    for n in names:
        pipe.load_lora_weights(peft_state_dict(service, n), adapter_name=n)
    assert set(components(service.pipeline("tiny-sd"))) >= {"unet"}

    def timed(fn):
        fn()  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best, out

    t_batched, grid = timed(lambda: service.render_grid(spec))
    t_loop, loop_images = timed(lambda: vanilla_loop(pipe, cells, names))
    diff = max(
        float(np.abs(np.asarray(c.image, np.float32) - np.asarray(img, np.float32)).max())
        for c, img in zip(grid.cells, loop_images)
    )
    row = {
        "device": args.device,
        "cells": len(cells),
        "steps": args.steps,
        "size": args.size,
        "max_batch": args.max_batch,
        "studio_batched_s": round(t_batched, 3),
        "diffusers_loop_s": round(t_loop, 3),
        "speedup": round(t_loop / t_batched, 2),
        "max_pixel_diff": diff,
    }
    print(
        "| cells | steps | size | studio batched (s) | diffusers set_adapters loop (s) | speed-up | max pixel diff |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {len(cells)} | {args.steps} | {args.size} | {t_batched:.3f} | {t_loop:.3f} | "
        f"{t_loop / t_batched:.2f}x | {diff:g} |"
    )
    print(json.dumps(row))


if __name__ == "__main__":
    main()
