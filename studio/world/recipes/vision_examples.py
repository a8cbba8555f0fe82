"""`studio world build --only vision-examples`: the shipped trained vision examples.

Three short CPU runs of the vision pipelines through the shared loop (``studio.loop.train``)
on the world's pretrained backbones, each saved adapter-only (adapters + trained heads) to
``<out>/examples/vision-<method>/`` with a model card: AdapterTune (world shapes on
``vit-tiny-world``), SALT (shifted-domain segmentation on ``vit-tiny-world``) and
EndoARSS/TESLA (tool scenes, activity + tool mask on ``dinov2-tiny-world``).  Quality is
measured on each task's held-out images through the Vision-tab wrapper
(``studio.service_vision_load``), i.e. exactly what the app runs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

NAME = "vision-examples"
COMMAND = "studio world build --only vision-examples --device cpu --seed 0"

# method -> (pipeline options, loop settings): 64 px (the backbones' native size), 1-8 CPU minutes each.
RECIPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "adaptertune": (
        dict(mode="adaptertune", backbone="vit", backbone_source="world", dataset="shapes",
             n_total=1500, n_test=200, image_size=64, rank=8),
        dict(max_steps=200, batch_size=32, lr=1e-3, weight_decay=0.05, warmup_steps=12, lr_schedule="cosine"),
    ),
    "salt": (
        dict(mode="salt", backbone="vit", backbone_source="world", n_train=500, n_test=200,
             n_source=1000, source_steps=300, image_size=64, rank_ratio=0.5, salt_lora_rank=4),
        dict(max_steps=300, batch_size=32, lr=2e-3, weight_decay=0.01, warmup_steps=20, lr_schedule="cosine"),
    ),
    "endoarss": (
        dict(mode="tesla", backbone_source="world", dataset="scenes", n_total=1000, n_test=200,
             image_size=64),
        dict(max_steps=300, batch_size=32, lr=2e-3, weight_decay=0.01, warmup_steps=20, lr_schedule="cosine"),
    ),
}  # fmt: skip
SMOKE_STEPS = 3
# --smoke: data sizes and SALT's source stage shrunk too (checks the recipe runs end to end).
SMOKE_OPTIONS = dict(n_total=48, n_test=16, n_train=16, n_source=32, source_steps=2)
TITLES = {
    "adaptertune": "AdapterTune on vit-tiny-world: world shapes classification",
    "salt": "SALT on vit-tiny-world: segmentation of the shifted (dark, textured) domain",
    "endoarss": "EndoARSS / TESLA on dinov2-tiny-world: tool-scene activity + tool mask",
}


def build(out: Path, device: str = "cpu", seed: int = 0, smoke: bool = False, log: Any = print) -> dict:
    """Train, save and measure every example into ``out/examples``; returns method -> metrics."""
    from pipelines import get_pipeline
    from studio.config import TrainConfig
    from studio.loop import train

    report = {}
    for method, (options, loop) in RECIPES.items():
        if smoke:
            loop = {**loop, "max_steps": SMOKE_STEPS, "batch_size": 8, "warmup_steps": 1}
            options = {**options, **{k: v for k, v in SMOKE_OPTIONS.items() if k in options}}
        start = time.time()
        task = get_pipeline(method)(dict(options))
        dest = out / "examples" / f"vision-{method}"
        with tempfile.TemporaryDirectory() as tmp:
            config = TrainConfig(
                pipeline=method,
                output_dir=tmp,
                cpu=not device.startswith("cuda"),
                seed=seed,
                progress=False,
                pipeline_options=dict(options),
                **loop,
            )
            result = train(task, config)
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(result.adapter_dir, dest)
        seconds = round(time.time() - start, 1)
        metrics = {
            "loop_eval": {k: round(v, 4) for k, v in result.metrics.items()},
            "held_out": measure(dest, task),
            "train_seconds": seconds,
            "steps": result.step,
            "size_kb": round(sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) / 1024, 1),
        }
        write_card(dest, method, options, config, metrics, device + (" (--smoke run)" if smoke else ""))
        report[method] = metrics
        log(f"[{NAME}] {method}: {metrics['held_out']} in {seconds} s, {metrics['size_kb']} KB")
    return report


@torch.no_grad()
def measure(folder: Path, task: Any) -> dict[str, float]:
    """Held-out quality of the saved example through the Vision-tab wrapper (and chance levels)."""
    from pipelines.vision_common import ConfusionMeter, dice
    from studio.service_vision_load import vision_models_from_folder

    data = task.test_data
    out: dict[str, float] = {"n_test": len(data)}
    for vm in vision_models_from_folder(folder):
        logits = torch.cat([vm.model(x) for x in data.images.split(128)])
        if vm.task == "classify":
            out["accuracy"] = round((logits.argmax(-1) == data.labels).float().mean().item(), 4)
            out["chance_accuracy"] = round(data.labels.bincount().max().item() / len(data), 4)
        else:
            pred, meter, base = (
                logits.argmax(1),
                ConfusionMeter(len(vm.classes)),
                ConfusionMeter(len(vm.classes)),
            )
            meter.update(pred, data.masks)
            base.update(torch.zeros_like(data.masks), data.masks)
            out["miou"] = round(meter.miou(), 4)
            out["dice"] = round(dice(pred, data.masks), 4)
            out["background_only_miou"] = round(base.miou(), 4)
    return out


def write_card(folder: Path, method: str, options: dict, config: Any, metrics: dict, device: str) -> None:
    """README.md (recipe, command, seed, held-out quality) and metrics.json."""
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    held = metrics["held_out"]
    rows = "\n".join(f"| {k} | {v} |" for k, v in held.items())
    loop = {k: getattr(config, k) for k in ("max_steps", "batch_size", "lr", "weight_decay", "warmup_steps")}
    text = f"""# vision-{method}

{TITLES[method]}.  A shipped example of the `{method}` pipeline: adapter-only
(the adapters and the trained heads; the backbone is the world's pretrained one), loaded by
`studio demo` into the Vision tab.

## Load

```python
from studio.service_vision_load import vision_models_from_folder
models = vision_models_from_folder("assets/examples/vision-{method}")
```

## Recipe

- command: `{COMMAND}` (`studio/world/recipes/vision_examples.py`)
- seed {config.seed}, device {device}, {metrics["train_seconds"]} s, {metrics["steps"]} steps
- pipeline options: `{json.dumps(options)}`
- loop: `{json.dumps(loop)}`, AdamW, gradient clipping 1

## Measured quality (held-out images of the task, through the Vision-tab wrapper)

| metric | value |
|---|---|
{rows}

Chance levels: `chance_accuracy` is the majority class's share; `background_only_miou` is
the mIoU of predicting background everywhere.  Size: {metrics["size_kb"]} KB.
"""
    (folder / "README.md").write_text(text)
