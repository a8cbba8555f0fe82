"""Checkpoints of the training loop: what they hold, where a run resumes from, what changed.

``studio.loop.train`` writes ``checkpoint-N`` folders through ``accelerator.save_state``
(``studio.checkpoints`` does the folder bookkeeping).  Here: the save/load hooks that
keep a checkpoint to the trainable tensors, the output folder check that picks the
checkpoint to resume from, and the warning when a resume changes the run's numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from studio import checkpoints as ckpt
from studio.config import ConfigError, TrainConfig


def _adapter_state_hooks(accelerator, trainable: dict[str, nn.Parameter]) -> None:
    """Checkpoints hold only the trainable tensors (by unwrapped name), never the base model."""
    from safetensors.torch import load_file

    def save_hook(models: list, weights: list, folder: str) -> None:
        for i in range(len(weights)):
            weights[i] = {name: p.detach() for name, p in trainable.items()}

    def load_hook(models: list, folder: str) -> None:
        models.clear()  # loaded here; accelerate then skips the model
        path = Path(folder) / "model.safetensors"
        state = load_file(str(path))
        if set(state) != set(trainable):
            missing, extra = sorted(set(trainable) - set(state)), sorted(set(state) - set(trainable))
            raise ConfigError(
                f"checkpoint {folder} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        with torch.no_grad():
            for name, tensor in state.items():
                trainable[name].copy_(tensor)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _prepare_output(config: TrainConfig, output_dir: Path, is_main: bool) -> Path | None:
    resume_from = ckpt.resolve_resume(config.resume, output_dir)
    if resume_from is None and ckpt.list_checkpoints(output_dir):  # every process raises, none hangs
        raise ConfigError(
            f"{output_dir} already holds checkpoints; pass --resume latest or another --output_dir"
        )
    if is_main:
        ckpt.remove_stale_temp(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    return resume_from


# Fields that change the numbers of a resumed run (max_steps may grow; the rest is bookkeeping).
_RESUME_FIELDS = ("pipeline", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "lr_schedule",
                  "max_grad_norm", "mixed_precision", "seed", "pipeline_options")  # fmt: skip


def _warn_if_changed(saved: dict[str, Any], config: TrainConfig, accelerator) -> None:
    now = config.to_dict()
    changed = [k for k in _RESUME_FIELDS if k in saved and saved[k] != now[k]]
    if changed:
        accelerator.print(
            f"warning: resuming with changed {', '.join(changed)}; the run will differ from an uninterrupted one"
        )
