"""The one training loop: every pipeline trains through ``train(task, config)``.

The loop knows nothing of the model.  A pipeline supplies a ``Task`` (model with
adapters injected, data, loss, evaluation, adapter saving); the loop owns precision,
gradient accumulation, clipping, the learning-rate schedule, seeding, logging,
``checkpoint-N`` folders with exact resume, and the final adapter-only save.  It runs
unchanged on one CPU, one GPU, or several processes under ``accelerate launch``.

Exact resume rests on three rules: data order is a pure function of (seed, epoch)
(accelerate's seedable sampler, set per epoch here); the position inside an epoch is
recomputed from the step counter and skipped to; RNG, optimizer, scheduler and gradient
scaler states come back through ``accelerator.load_state``.  What a checkpoint holds and
where a run resumes from: ``studio.loop_checkpoint``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from studio import checkpoints as ckpt
from studio.config import ConfigError, TrainConfig
from studio.loop_checkpoint import (
    _adapter_state_hooks,
    _prepare_output,
    _warn_if_changed,
)
from studio.stages import StageControl, StageProgress, TrainingStopped, controlled


@runtime_checkable
class Task(Protocol):
    """What a pipeline gives the loop.

    Required:

    - ``build_model() -> nn.Module``: the model with its adapters injected and only the
      parameters to train left with ``requires_grad`` (the loop keeps them float32).
      Called after seeding, so adapter initialisation follows ``config.seed``.
    - ``train_dataloader(batch_size, seed) -> DataLoader``: ``batch_size`` is per device
      and per micro-batch.  Use ``seeded_dataloader`` (shuffle with a seeded generator,
      ``drop_last``); random augmentation must not draw from the global RNG.
    - ``loss(model, batch) -> Tensor | (Tensor, dict)``: the mean loss of one
      micro-batch (batch already on the device), optionally with extra scalars to log.
    - ``evaluate(model) -> dict[str, float]``: held-out metrics (main process only,
      under ``torch.no_grad`` and with the training RNG untouched).
    - ``save_adapter(model, folder)``: write the trained adapter (not the base model).

    Optional:

    - ``param_groups(model) -> list[dict]``: AdamW parameter groups (per-group ``lr``
      is an absolute value and follows the same schedule).
    - ``configure_optimizers(model, config) -> (optimizer, scheduler | None)``: replace
      AdamW and the built-in schedule entirely (the scheduler steps once per optimizer step).

    Work of the task's own before the first step (e.g. SALT's source-domain training in
    ``build_model``) reports progress and honours a cancel through ``studio.stages.stage``.
    """

    def build_model(self) -> nn.Module: ...

    def train_dataloader(self, batch_size: int, seed: int) -> DataLoader: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor | tuple[torch.Tensor, dict]: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...

    def save_adapter(self, model: nn.Module, folder: Path) -> None: ...


@dataclass
class TrainResult:
    """What ``train`` returns (the full loss history is in ``output_dir/metrics.jsonl``)."""

    #: Optimizer steps done in total (including those before a resume).
    step: int
    #: Loss of each step this call ran (mean over micro-batches and processes).
    losses: list[float]
    #: Step this call started from (0, or the resumed checkpoint's step).
    start_step: int
    #: Last evaluation (main process; empty on the others).
    metrics: dict[str, float] = field(default_factory=dict)
    #: Folder of the saved adapter (None on non-main processes).
    adapter_dir: Path | None = None
    #: True when ``should_stop`` ended the run early (with ``adapter_dir`` None when that
    #: happened in a stage before the first step: nothing was trained or saved).
    stopped: bool = False


def seeded_dataloader(dataset: Dataset, batch_size: int, seed: int, **kwargs: Any) -> DataLoader:
    """A shuffled, ``drop_last`` loader whose order the loop can reproduce on resume."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator, **kwargs
    )


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warm-up, then constant / linear / cosine to 0."""
    warmup, total, kind = config.warmup_steps, config.max_steps, config.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def _make_accelerator(config: TrainConfig, output_dir: Path, find_unused_parameters: bool = False):
    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        DistributedDataParallelKwargs,
        GradientAccumulationPlugin,
    )

    from studio.csv_tracker import CsvTracker

    trackers: list[Any] = [t for t in config.trackers if t != "csv"]
    if "csv" in config.trackers:
        trackers.append(CsvTracker(output_dir))
    try:
        accelerator = Accelerator(
            cpu=config.cpu,
            mixed_precision=config.mixed_precision,
            # sync_with_dataloader=False: an epoch end must not force an early optimizer step.
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=config.grad_accum, sync_with_dataloader=False
            ),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
            # The schedule is per optimizer step whatever the number of processes.
            step_scheduler_with_optimizer=False,
            log_with=trackers or None,
            project_dir=str(output_dir),
            # Tasks whose steps use only some adapter branches (multi-task) set this attribute.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
        )
    except ValueError as err:
        _reset_state(single_process=int(os.environ.get("WORLD_SIZE", "1")) == 1)
        raise ConfigError(str(err).splitlines()[0]) from err
    active = {str(getattr(t, "value", getattr(t, "name", t))) for t in accelerator.log_with}
    missing = sorted(set(config.trackers) - active)
    if missing:
        _release(accelerator)
        raise ConfigError(f"tracker(s) {', '.join(missing)} not installed (pip install {' '.join(missing)})")
    return accelerator


def _release(accelerator) -> None:
    accelerator.end_training()
    _reset_state(accelerator.num_processes == 1)


def _reset_state(single_process: bool) -> None:
    """Forget accelerate's process-wide state so a later ``train`` in this process starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    if single_process:  # a launched multi-process run keeps its process group
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _optimizer(task: Task, model: nn.Module, config: TrainConfig):
    if hasattr(task, "configure_optimizers"):
        optimizer, scheduler = task.configure_optimizers(model, config)
    else:
        groups = task.param_groups(model) if hasattr(task, "param_groups") else None
        params = groups or [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = None
    if scheduler is None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    return optimizer, scheduler


def _batches(accelerator, dataloader, micro_step: int) -> Iterator[Any]:
    """Endless micro-batches starting at global micro-step ``micro_step`` (epoch, offset)."""
    per_epoch = len(dataloader)
    if per_epoch == 0:
        raise ConfigError("the training set is smaller than one batch; lower batch_size")
    epoch, skip = divmod(micro_step, per_epoch)
    while True:
        dataloader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        yield from loader
        epoch, skip = epoch + 1, 0


def _evaluate(task: Task, accelerator, model: nn.Module) -> dict[str, float]:
    from accelerate.utils import broadcast_object_list

    metrics: list[Any] = [{}]
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            inner.eval()
            metrics[0] = {k: float(v) for k, v in task.evaluate(inner).items()}
            inner.train()
    if accelerator.num_processes > 1:
        broadcast_object_list(metrics)
    return metrics[0]


def train(
    task: Task,
    config: TrainConfig,
    *,
    on_progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_stage: StageProgress | None = None,
) -> TrainResult:
    """Train ``task`` as ``config`` says; see the module docstring and docs/training.md.

    ``on_progress(step, max_steps, loss)`` is called on the main process after every
    optimizer step; ``should_stop()`` is polled there too, and a True ends the run after
    that step with a checkpoint and the adapter saved.  ``on_stage(stage, step, total,
    loss)`` reports the task's own stages before the first step (``studio.stages``), where
    a True from ``should_stop`` ends the run at once with nothing saved, and the final
    held-out evaluation (stage "evaluate", steps 0 and 1 of 1, loss nan).
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    output_dir = Path(config.output_dir)
    accelerator = _make_accelerator(config, output_dir, getattr(task, "find_unused_parameters", False))
    try:
        is_main = accelerator.is_main_process
        resume_from = _prepare_output(config, output_dir, is_main)
        accelerator.wait_for_everyone()
        per_device, rem = divmod(config.batch_size, accelerator.num_processes * config.grad_accum)
        if rem or per_device == 0:
            raise ConfigError(
                f"batch_size {config.batch_size} must be a multiple of processes x grad_accum "
                f"({accelerator.num_processes} x {config.grad_accum})"
            )

        set_seed(config.seed)
        control = StageControl(accelerator, config.pipeline, on_stage, should_stop, config.progress)
        try:
            with controlled(control):
                model = task.build_model()
                trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
                if not trainable:
                    raise ConfigError("the task's model has no trainable parameters")
                for p in trainable.values():
                    p.data = p.data.float()
                optimizer, scheduler = _optimizer(task, model, config)
                dataloader = task.train_dataloader(batch_size=per_device, seed=config.seed)
        except TrainingStopped:
            step = ckpt.read_state(resume_from)["step"] if resume_from is not None else 0
            accelerator.wait_for_everyone()
            return TrainResult(step, [], step, stopped=True)
        model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
        _adapter_state_hooks(accelerator, trainable)

        step = 0
        if resume_from is not None:
            accelerator.load_state(str(resume_from))
            saved = ckpt.read_state(resume_from)
            step = saved["step"]
            _warn_if_changed(saved.get("config", {}), config, accelerator)
            if is_main:
                ckpt.truncate_logs(output_dir, step)
        elif is_main:
            ckpt.truncate_logs(output_dir, -1)
        accelerator.init_trackers(config.pipeline, config=_flat_config(config))

        start_step, losses, stopped, last_saved = step, [], False, step
        batches = _batches(accelerator, dataloader, step * config.grad_accum)
        bar = tqdm(total=config.max_steps, initial=step, disable=not (is_main and config.progress))
        bar.set_description(config.pipeline)
        model.train()
        started = time.time()

        def save_checkpoint() -> None:
            state = {"step": step, "config": config.to_dict(), "time": time.time() - started}
            ckpt.write_checkpoint(
                output_dir,
                step,
                lambda p: accelerator.save_state(str(p)),
                state,
                is_main,
                accelerator.wait_for_everyone,
            )
            if is_main:
                ckpt.apply_retention(output_dir, config.keep_checkpoints)
            accelerator.wait_for_everyone()

        while step < config.max_steps:
            total = torch.zeros((), device=accelerator.device)
            extras: dict[str, float] = {}
            for _ in range(config.grad_accum):
                batch = next(batches)
                with accelerator.accumulate(model):
                    out = task.loss(model, batch)
                    loss, logs = out if isinstance(out, tuple) else (out, {})
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                total += loss.detach().float()
                for k, v in logs.items():
                    extras[k] = extras.get(k, 0.0) + float(v) / config.grad_accum
            assert accelerator.sync_gradients, "micro-steps out of step with gradient accumulation"
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            step += 1
            loss_value = accelerator.reduce(total / config.grad_accum, "mean").item()
            losses.append(loss_value)
            if is_main:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}")
                if on_progress is not None:
                    on_progress(step, config.max_steps, loss_value)
            if step % config.log_every == 0 or step == config.max_steps:
                record = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], **extras}
                _log(accelerator, output_dir, record)
            if config.eval_every and step % config.eval_every == 0 and step < config.max_steps:
                _log(
                    accelerator, output_dir, {"step": step, **_prefixed(_evaluate(task, accelerator, model))}
                )
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                save_checkpoint()
                last_saved = step
            if should_stop is not None and is_main and should_stop():
                accelerator.set_trigger()
            if accelerator.check_trigger():
                stopped = True
                break
        bar.close()
        if stopped and last_saved != step:
            save_checkpoint()

        control.notify("evaluate", 0, 1, math.nan)
        metrics = _evaluate(task, accelerator, model)
        control.notify("evaluate", 1, 1, math.nan)
        _log(accelerator, output_dir, {"step": step, **_prefixed(metrics)})
        adapter_dir = None
        if is_main:
            adapter_dir = output_dir / "adapter"
            tmp = output_dir / ".tmp-adapter"
            task.save_adapter(accelerator.unwrap_model(model), tmp)
            ckpt.publish(tmp, adapter_dir)
        accelerator.wait_for_everyone()
        return TrainResult(step, losses, start_step, metrics, adapter_dir, stopped)
    finally:
        _release(accelerator)


def _prefixed(metrics: dict[str, float]) -> dict[str, float]:
    return {f"eval/{k}": v for k, v in metrics.items()}


def _log(accelerator, output_dir: Path, record: dict[str, Any]) -> None:
    if accelerator.is_main_process:
        ckpt.append_metrics(output_dir, record)
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def _flat_config(config: TrainConfig) -> dict[str, Any]:
    """Tracker-friendly hyper-parameters (scalars only)."""
    flat: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        if key == "pipeline_options":
            flat.update({f"pipeline_options.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
