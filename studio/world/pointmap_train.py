"""Training recipe of the two-view pointmap model (``studio world build`` calls :func:`train_pointmap`).

Data: ``multiview.make_pairs`` normal-condition pairs rendered up front in parallel chunks
(each chunk from its own seed, so the bytes do not depend on the worker count), kept on the
device. Each batch is augmented by swapping the views (the ground truth re-expressed in the
new first camera) and by horizontal flips (x negated; the principal point is centred).
AdamW, warmup + cosine; the number of steps is fitted to the time budget after a short
calibration, so one recipe fills a budget on any GPU. Evaluation: held-out pairs of every
condition, and a "mean pointmap" prior as a floor for comparison.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from studio.world import multiview
from studio.world.pointmap_model import (
    PointmapConfig,
    PointmapNet,
    evaluate,
    load_pointmap,
    normalise,
    pointmap_loss,
    relative_errors,
    save_pointmap,
    summarise,
    to_input,
)

PAIR_KEYS = ("img1", "img2", "pts1_in_cam1", "pts2_in_cam1", "valid1", "valid2")
CHUNK_PAIRS = 500  # pairs rendered per worker job
EVAL_SEED_OFFSET = 90_000  # held-out chunks use seeds far from the training chunks


@dataclass
class PointmapRecipe:
    """Data, optimisation and model sizes of one training run."""

    image_size: int = 64  # rendered pair size
    n_train: int = 12_000  # normal-condition training pairs
    n_eval: int = 256  # held-out pairs per condition
    batch_size: int = 64  # pairs per step
    lr: float = 8e-4  # AdamW peak learning rate
    weight_decay: float = 0.05  # AdamW decoupled weight decay
    warmup_steps: int = 200  # linear warmup (the step count is calibrated meanwhile)
    max_steps: int = 40_000  # hard cap on steps (the budget usually stops earlier)
    fixed_steps: int | None = None  # exact step count (reproducible), ignoring the time budget
    alpha: float = 0.2  # weight of the -log(confidence) regulariser
    eval_reserve_s: float = 25.0  # seconds kept for evaluation and saving
    model: PointmapConfig = field(default_factory=PointmapConfig)  # architecture


SMOKE = PointmapRecipe(
    image_size=32,
    n_train=128,
    n_eval=16,
    batch_size=16,
    warmup_steps=5,
    max_steps=60,
    eval_reserve_s=2.0,
    model=PointmapConfig(image_size=32, dim=64, heads=4, enc_depth=2, dec_depth=2),
)


def _render(args: tuple[int, int, int, str]) -> dict[str, np.ndarray]:
    n, seed, size, condition = args
    pairs = multiview.make_pairs(n, seed, size=size, condition=condition)
    rel = np.linalg.inv(pairs["pose1"].astype(np.float64)) @ pairs["pose2"].astype(np.float64)
    out = {k: pairs[k] for k in PAIR_KEYS}
    out["rel"] = rel.astype(np.float32)  # camera 2 -> camera 1
    return out


def make_pair_data(
    n: int, seed: int, size: int, condition: str = "normal", workers: int | None = None
) -> dict[str, np.ndarray]:
    """``n`` pairs (chunk ``i`` from seed ``seed * 100_000 + i``), rendered on ``workers`` threads."""
    jobs = [
        (min(CHUNK_PAIRS, n - s), seed * 100_000 + i, size, condition)
        for i, s in enumerate(range(0, n, CHUNK_PAIRS))
    ]
    workers = min(len(jobs), workers or os.cpu_count() or 1, 16)
    if workers > 1:
        # Threads, not processes: the ray caster's large numpy ops release the GIL, and threads
        # need neither a __main__ guard (spawn) nor a fork of a CUDA process.
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(_render, jobs))
    else:
        parts = [_render(job) for job in jobs]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def augment(batch: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random view swap and horizontal flip, per sample (ground truth follows)."""
    b = batch["img1"].shape[0]
    dev = batch["img1"].device
    swap = torch.rand(b, generator=gen, device=dev) < 0.5
    flip = torch.rand(b, generator=gen, device=dev) < 0.5
    rot, trans = batch["rel"][:, :3, :3], batch["rel"][:, :3, 3]

    def in_cam2(p: torch.Tensor) -> torch.Tensor:  # R^T (p - t), p in camera 1's frame
        return torch.einsum("bji,bhwj->bhwi", rot, p - trans[:, None, None, :])

    def pick(mask: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, c)

    p1, p2 = batch["pts1_in_cam1"].float(), batch["pts2_in_cam1"].float()
    out = {
        "img1": pick(swap, batch["img2"], batch["img1"]),
        "img2": pick(swap, batch["img1"], batch["img2"]),
        "pts1": pick(swap, in_cam2(p2), p1),
        "pts2": pick(swap, in_cam2(p1), p2),
        "valid1": pick(swap, batch["valid2"], batch["valid1"]),
        "valid2": pick(swap, batch["valid1"], batch["valid2"]),
    }
    sign = torch.tensor([-1.0, 1.0, 1.0], device=dev)
    for key in out:
        flipped = out[key].flip(2)
        if key.startswith("pts"):
            flipped = flipped * sign
        out[key] = pick(flip, flipped, out[key])
    return out


def prior_quality(
    train: dict[str, torch.Tensor], test: dict[str, np.ndarray], device: str
) -> dict[str, float]:
    """Quality of the per-pixel mean normalised pointmap of the training set (a floor to beat)."""
    sums, counts = [], []
    for key, vkey in (("pts1_in_cam1", "valid1"), ("pts2_in_cam1", "valid2")):
        sums.append(torch.zeros(train[key].shape[1:], device=device))
        counts.append(torch.zeros(train[vkey].shape[1:], device=device))
    for s in range(0, len(train["img1"]), 512):
        v1, v2 = train["valid1"][s : s + 512].float(), train["valid2"][s : s + 512].float()
        g1, g2 = normalise(
            train["pts1_in_cam1"][s : s + 512].float(), train["pts2_in_cam1"][s : s + 512].float(), v1, v2
        )
        for i, (g, v) in enumerate(((g1, v1), (g2, v2))):
            sums[i] += (g * v[..., None]).sum(0)
            counts[i] += v.sum(0)
    means = [s / c.clamp(min=1)[..., None] for s, c in zip(sums, counts)]
    n = len(test["img1"])
    gt = [torch.as_tensor(test[k]).to(device) for k in ("pts1_in_cam1", "pts2_in_cam1", "valid1", "valid2")]
    e1, e2 = relative_errors(means[0].expand(n, -1, -1, -1), means[1].expand(n, -1, -1, -1), *gt)
    result = summarise(torch.cat([e1, e2]))
    result["view2_median_rel_err"] = summarise(e2)["median_rel_err"]
    return result


def _lr(step: int, total: int, recipe: PointmapRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = min(1.0, (step - recipe.warmup_steps) / max(1, total - recipe.warmup_steps))
    return recipe.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_pointmap(
    out_dir: str | os.PathLike,
    seed: int = 0,
    device: str = "cuda",
    minutes_budget: float = 3.0,
    recipe: PointmapRecipe | None = None,
    log: Callable[[str], None] = print,
    steps: int | None = None,
) -> dict[str, Any]:
    """Train, evaluate and save the pointmap model into ``out_dir``; returns its metrics.

    ``recipe`` defaults to :class:`PointmapRecipe` on CUDA with a budget of at least a minute,
    else to the tiny ``SMOKE`` recipe (a CPU check that the recipe runs end to end).
    ``steps`` sets the recipe's ``fixed_steps``: exactly that many steps, no time budget.
    """
    start = time.time()
    deadline = start + minutes_budget * 60.0
    if recipe is None:
        recipe = PointmapRecipe() if device.startswith("cuda") and minutes_budget >= 1.0 else SMOKE
    if steps is not None:
        recipe = replace(recipe, fixed_steps=steps)
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    cuda = device.startswith("cuda")

    data = make_pair_data(recipe.n_train, seed, recipe.image_size)
    train = {k: torch.as_tensor(v).to(device) for k, v in data.items()}
    for key in ("pts1_in_cam1", "pts2_in_cam1"):
        train[key] = (
            train[key].half() if cuda else train[key]
        )  # halves device memory; 1e-3 relative is plenty
    data_s = round(time.time() - start, 1)
    log(f"[pointmap] {recipe.n_train} training pairs ({recipe.image_size}px) in {data_s} s")

    model = PointmapNet(recipe.model).to(device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.95), fused=cuda
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    total = recipe.fixed_steps or recipe.max_steps
    calib = (10, min(40, max(11, recipe.warmup_steps)))  # time steps calib[0]..calib[1] to fit the budget
    losses: list[float] = []
    step, t_calib = 0, 0.0
    model.train()
    while step < total:
        if recipe.fixed_steps is None and step > 0 and time.time() > deadline - recipe.eval_reserve_s:
            break
        idx = torch.randint(0, recipe.n_train, (recipe.batch_size,), generator=gen, device=device)
        batch = augment({k: v[idx] for k, v in train.items()}, gen)
        for group in opt.param_groups:
            group["lr"] = _lr(step, total, recipe)
        with autocast:
            out = model(to_input(batch["img1"], device), to_input(batch["img2"], device))
        loss, logs = pointmap_loss(
            out, batch["pts1"], batch["pts2"], batch["valid1"], batch["valid2"], recipe.alpha
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step in calib:
            if cuda:
                torch.cuda.synchronize()
            if step == calib[0]:
                t_calib = time.time()
            elif recipe.fixed_steps is None:
                per_step = (time.time() - t_calib) / (calib[1] - calib[0])
                left = deadline - recipe.eval_reserve_s - time.time()
                total = max(step + 1, min(recipe.max_steps, step + int(left / per_step)))
                log(f"[pointmap] {per_step * 1000:.1f} ms/step -> {total} steps")
        if step % 50 == 0 or step == 1:
            losses.append(float(loss.detach()))
            log(
                f"[pointmap] step {step}/{total} loss {losses[-1]:.4f} regr {logs['regr']:.4f} conf {logs['conf']:.2f}"
            )
    train_s = round(time.time() - start - data_s, 1)

    folder = save_pointmap(model, out_dir)
    model = load_pointmap(folder, device=device)  # measure what was saved (fp16 weights)
    metrics: dict[str, Any] = {"steps": step, "train_pairs": recipe.n_train, "image_size": recipe.image_size}
    metrics.update(
        {"batch_size": recipe.batch_size, "seed": seed, "data_seconds": data_s, "train_seconds": train_s}
    )
    metrics["params"] = sum(p.numel() for p in model.parameters())
    metrics["final_loss"] = round(float(loss.detach()), 4) if step else None
    for i, condition in enumerate(multiview.CONDITIONS):
        test = make_pair_data(
            recipe.n_eval, seed + EVAL_SEED_OFFSET + i, recipe.image_size, condition, workers=1
        )
        for name, value in evaluate(model, test, device).items():
            metrics[f"{condition}_{name}"] = value
        if condition == "normal":
            for name, value in prior_quality(train, test, device).items():
                metrics[f"prior_{name}"] = value
    metrics["weights_mb"] = round((Path(folder) / "model.safetensors").stat().st_size / 2**20, 2)
    metrics["seconds"] = round(time.time() - start, 1)
    write_card(Path(folder), recipe, metrics, device, minutes_budget)
    log(f"[pointmap] {metrics}")
    return metrics


def write_card(
    folder: Path, recipe: PointmapRecipe, metrics: dict[str, Any], device: str, minutes: float
) -> None:
    """README.md (model card) and metrics.json."""
    rows = [
        "| condition | median rel. error | within 10% | within 25% | view 2 median |",
        "|---|---|---|---|---|",
    ]
    for cond in (*multiview.CONDITIONS, "prior"):
        label = "mean-pointmap prior (normal)" if cond == "prior" else cond
        rows.append(
            f"| {label} | {metrics[f'{cond}_median_rel_err']} | {metrics[f'{cond}_within_10pct']} | "
            f"{metrics[f'{cond}_within_25pct']} | {metrics[f'{cond}_view2_median_rel_err']} |"
        )
    config = json.dumps(asdict(recipe), indent=1, default=str)
    text = f"""# pointmap-tiny

A small two-view pointmap model in the DUSt3R style (`studio.world.pointmap_model.PointmapNet`):
an image pair -> for every pixel of both views a 3D point in view 1's camera frame and a
confidence. Shared ViT encoder, two cross-attention decoders, linear heads;
{metrics["params"]:,} parameters, fp16 weights ({metrics["weights_mb"]} MB).

## Load

```python
from studio.world.pointmap_model import load_pointmap
model = load_pointmap("{folder.name}")  # or: from studio.world.assets import load_pointmap; load_pointmap()
out = model.predict(img1, img2)        # uint8 [N, H, W, 3] pairs -> pts1, pts2, conf1, conf2
```

## Data

{recipe.n_train} normal-condition pairs of `studio.world.multiview.make_pairs` ({recipe.image_size}x{recipe.image_size},
textured spheres and boxes on a checkered ground, views 10-30 degrees apart), augmented by view
swaps and horizontal flips. Held out: {recipe.n_eval} pairs per condition from other seeds.

## Recipe

`studio.world.pointmap_train.train_pointmap(out_dir, seed={metrics["seed"]}, device="{device}",
minutes_budget={minutes})`: DUSt3R's confidence-weighted scale-normalised regression loss
(alpha = {recipe.alpha}), AdamW, warmup + cosine, {metrics["steps"]} steps of batch {recipe.batch_size}
{"(fixed step count)" if recipe.fixed_steps else "fitted to the time budget"} ({metrics["train_seconds"]} s of training, {metrics["seconds"]} s in all).

<details><summary>recipe fields</summary>

```json
{config}
```
</details>

## Measured quality

Scale-normalised relative point error `|p - g| / |g|` over valid pixels of both views (both
pointmaps divided by their mean distance to view 1's camera), held-out pairs; "view 2
median" is the error of the second view's points alone (they need the relative pose):

{chr(10).join(rows)}

low_light: images at 25% brightness with sensor noise; low_overlap: views 60-100 degrees
apart. The model is trained on normal pairs only.
"""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(text)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
