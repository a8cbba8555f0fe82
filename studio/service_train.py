"""Training from the Train tab: the project's pipelines on the tiny world, and a diffusion demo.

``trainers()`` lists what can be started; ``run_trainer`` runs one and registers its result
with the service.  ``pipeline:adaptertune | salt | endoarss | lora`` train through
``studio.loop.train`` (the one training loop) with small CPU-sized defaults
(``TAB_OPTIONS``); the run folder goes under the service's output folder and the trained
output is published to ``<first adapter folder>/trained/<name>/``, from where it loads as
Vision-tab model(s).  ``demo-lora`` is a LoRA on the base UNet (denoising flat colour
images) that becomes a diffusion adapter.  Every trainer reports ``on_progress(step,
total, loss)`` and stops after the step where ``should_stop()`` turns true.  Pipeline runs
also report ``on_stage(stage, step, total, loss)`` for work outside the optimizer steps:
SALT's source-domain training before the first step ("source"; a cancel there ends the run
with nothing published) and the final held-out evaluation ("evaluate").

Locking: a pipeline run never touches the service's models, so it runs without the
service lock (generation stays responsive) and takes it only to register its result;
``demo-lora`` trains the shared UNet and holds the lock throughout.  Runs are serialised
by ``_TRAINING`` because accelerate keeps one state per process.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from adapters.base import (
    AdapterError,
    adapter_parameters,
    adapter_state_dict,
    get_spec,
    inject,
    mark_only_adapters_trainable,
    remove,
)
from adapters.lora import LoraSpec

OnProgress = Callable[[int, int, float], None]
#: on_stage(stage, step, total, loss), as ``studio.stages.StageProgress``.
OnStage = Callable[[str, int, int, float], None]


def trainers() -> dict[str, str]:
    """name -> one-line description."""
    found = {"demo-lora": "LoRA on the base UNet, denoising flat colour images (built-in demo)"}
    try:
        from pipelines import pipelines

        found.update({f"pipeline:{k}": v for k, v in pipelines().items()})
    except (ImportError, AttributeError):
        pass
    return found


def demo_lora(
    pipe: Any, steps: int, on_progress: OnProgress, should_stop: Callable[[], bool], seed: int = 0
) -> dict:
    """A few hundred optimiser steps at most: the adapter learns to push towards flat colours."""
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    name = "_training"
    spec = LoraSpec(targets=["to_q", "to_k", "to_v", "to_out.0"], rank=4, alpha=4.0)
    inject(unet, spec, name)
    try:
        mark_only_adapters_trainable(unet, name)
        opt = torch.optim.AdamW(adapter_parameters(unet, name), lr=1e-3)
        gen = torch.Generator().manual_seed(seed)
        device = next(unet.parameters()).device
        size = pipe.vae.config.sample_size if isinstance(pipe.vae.config.sample_size, int) else 32
        with torch.no_grad():
            ids = pipe.tokenizer(
                [""], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
            ).input_ids.to(device)
            cond = pipe.text_encoder(ids)[0]
        for step in range(steps):
            if should_stop():
                break
            colour = torch.rand(4, 3, 1, 1, generator=gen).expand(4, 3, size, size) * 2 - 1
            with torch.no_grad():
                latents = vae.encode(colour.to(device)).latent_dist.mean * vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=gen).to(device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (4,), generator=gen).to(device)
            noisy = scheduler.add_noise(latents, noise, t)
            pred = unet(noisy, t, encoder_hidden_states=cond.expand(4, -1, -1)).sample
            loss = F.mse_loss(pred, noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
            on_progress(step + 1, steps, loss.item())
        state = {k: v.detach().cpu().clone() for k, v in adapter_state_dict(unet, name).items()}
        spec = get_spec(unet, name)
    finally:
        unet.requires_grad_(False)
        remove(unet, name)
    return {"unet": (spec, state)}


# Pipeline options of Train-tab runs: the tiny world at 64 px (the world backbones' native
# size), data sets small enough that a run starts in seconds on a CPU.
TAB_OPTIONS: dict[str, dict[str, Any]] = {
    "adaptertune": dict(dataset="shapes", n_total=600, n_test=100, image_size=64, rank=8),
    "salt": dict(n_train=200, n_test=50, n_source=300, source_steps=60, image_size=64),
    "endoarss": dict(dataset="scenes", n_total=600, n_test=100, image_size=64),
    "lora": dict(dataset="digits"),
}
# Loop settings of Train-tab runs (max_steps comes from the tab).
TAB_LOOP: dict[str, Any] = dict(batch_size=32, lr=1e-3, weight_decay=0.01, lr_schedule="cosine")
# accelerate's state is per process: one loop run at a time.
_TRAINING = threading.Lock()


def run_trainer(
    service: Any,
    trainer: str,
    steps: int,
    on_progress: OnProgress,
    should_stop: Callable[[], bool],
    base_model: str = "tiny-sd",
    name: str | None = None,
    options: dict[str, Any] | None = None,
    on_stage: OnStage | None = None,
) -> dict[str, Any]:
    """Run ``trainer`` and register its result; returns a summary.

    Summary keys: ``kind`` ("adapter" for a diffusion adapter, "vision" for Vision-tab
    models), ``names`` (what was registered; empty when cancelled before the first step),
    ``steps`` done, ``stopped`` (cancelled), ``metrics`` (held-out evaluation of pipeline
    runs) and ``path`` (the published folder).  ``options`` override ``TAB_OPTIONS`` for
    pipeline runs; ``on_stage`` gets their stages (see the module docstring).
    """
    steps = int(steps)
    if steps < 1:
        raise AdapterError(f"steps must be at least 1, got {steps}")
    if trainer == "demo-lora":
        return _run_demo_lora(service, steps, on_progress, should_stop, base_model, name or "trained-lora")
    if trainer.startswith("pipeline:"):
        return run_pipeline(service, trainer[9:], steps, on_progress, should_stop, name, options, on_stage)
    raise AdapterError(f"unknown trainer {trainer!r}; available: {', '.join(trainers())}")


def _run_demo_lora(
    service: Any,
    steps: int,
    on_progress: OnProgress,
    should_stop: Callable[[], bool],
    base_model: str,
    name: str,
) -> dict[str, Any]:
    done: list[int] = []

    def progress(step: int, total: int, loss: float) -> None:
        done.append(step)
        on_progress(step, total, loss)

    with service.lock, torch.enable_grad():
        parts = demo_lora(service.pipeline(base_model), steps, progress, should_stop)
        try:
            service.unload_adapter(name)  # a result of the same name is replaced
        except AdapterError:
            pass
        service.add_adapter(
            name, parts, base_model=base_model, metadata={"trainer": "demo-lora", "steps": len(done)}
        )
    stopped = len(done) < steps
    return {
        "kind": "adapter",
        "names": [name],
        "steps": len(done),
        "stopped": stopped,
        "metrics": {},
        "path": "",
    }


def run_pipeline(
    service: Any,
    pipeline: str,
    steps: int,
    on_progress: OnProgress,
    should_stop: Callable[[], bool],
    name: str | None = None,
    options: dict[str, Any] | None = None,
    on_stage: OnStage | None = None,
) -> dict[str, Any]:
    """One ``studio.loop.train`` run of a vision pipeline; its output becomes Vision-tab model(s)."""
    from pipelines import get_pipeline
    from studio.config import TrainConfig
    from studio.loop import train

    if pipeline not in TAB_OPTIONS:
        raise AdapterError(
            f"the Train tab runs {', '.join(TAB_OPTIONS)}; start {pipeline} with "
            f"`accelerate launch studio/train.py --pipeline {pipeline}`"
        )
    name = _clean_name(name or f"trained-{pipeline}")
    results = results_dir(service)
    run_dir = runs_dir(service) / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{uuid.uuid4().hex[:6]}"
    opts = {**TAB_OPTIONS[pipeline], **(options or {})}
    if not _acquire(should_stop):
        return _nothing_trained()
    try:
        task = get_pipeline(pipeline)(opts)  # generates the data sets
        if should_stop():
            return _nothing_trained()
        config = TrainConfig(
            pipeline=pipeline,
            output_dir=str(run_dir),
            max_steps=steps,
            cpu=str(service.device) == "cpu",
            progress=False,
            pipeline_options=opts,
            **TAB_LOOP,
        )
        with torch.enable_grad():
            result = train(task, config, on_progress=on_progress, should_stop=should_stop, on_stage=on_stage)
        if result.adapter_dir is None:  # cancelled in a stage before the first step
            shutil.rmtree(run_dir, ignore_errors=True)
            return _nothing_trained()
        dest = _publish(result.adapter_dir, results / name, result, run_dir)
        models = service.load_vision_model(dest, name, replace=True)
    finally:
        _TRAINING.release()
    return {
        "kind": "vision",
        "names": [m["name"] for m in models],
        "steps": result.step,
        "stopped": result.stopped,
        "metrics": {k: round(v, 4) for k, v in result.metrics.items()},
        "path": str(dest),
    }


def _nothing_trained() -> dict[str, Any]:
    """The summary of a pipeline run cancelled before its first optimizer step."""
    return {"kind": "vision", "names": [], "steps": 0, "stopped": True, "metrics": {}, "path": ""}


def results_dir(service: Any) -> Path:
    """Where Train-tab results are published: ``trained/`` in the first (writable) adapter folder."""
    if not service.adapter_dirs:
        raise AdapterError(
            "no adapter folder is configured: the Train tab publishes results into the first one"
        )
    return Path(service.adapter_dirs[0]) / "trained"


def runs_dir(service: Any) -> Path:
    """Run folders (checkpoints, metrics.jsonl): under the service's output folder, else the temp dir."""
    root = Path(service.output_dir) if service.output_dir else Path(tempfile.gettempdir()) / "adapter-studio"
    return root / "runs"


def _acquire(should_stop: Callable[[], bool]) -> bool:
    """Wait for the training slot; False when cancelled while waiting."""
    while not _TRAINING.acquire(timeout=0.2):
        if should_stop():
            return False
    return True


def _publish(adapter_dir: Path, dest: Path, result: Any, run_dir: Path) -> Path:
    """Copy the trained output to ``dest`` (replacing an older result of that name)."""
    tmp = dest.with_name(f".{dest.name}-{uuid.uuid4().hex[:6]}")
    shutil.copytree(adapter_dir, tmp)
    summary = {
        "steps": result.step,
        "stopped": result.stopped,
        "metrics": result.metrics,
        "run": str(run_dir),
    }
    (tmp / "train_result.json").write_text(json.dumps(summary, indent=1))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def _clean_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text.strip())[:64] or "trained"
