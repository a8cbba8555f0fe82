"""Progress and cancel for the work of a run that is not an optimizer step of the loop.

A task may train something of its own before the loop's first step, inside
``build_model`` (SALT trains its decoder on the source domain first).  It wraps that
work in ``stage(name, total)`` and calls the yielded ``report(step, loss)`` after each
of its steps.  Inside ``studio.loop.train`` a report reaches the run's ``on_stage``
callback and a progress bar (main process), and raises ``TrainingStopped`` once the
run's ``should_stop`` has turned true (on every process at the same report), so that
``train`` returns ``stopped`` without writing an adapter.  Outside ``train`` (benchmark
sweeps, ``load_vision``) a report does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

#: on_stage(stage, step, total, loss): progress of a stage outside the loop's optimizer steps
#: (``loss`` is nan where the stage has none, e.g. the final "evaluate").
StageProgress = Callable[[str, int, int, float], None]


class TrainingStopped(Exception):
    """The run was cancelled during a stage before its first optimizer step."""


@dataclass
class StageControl:
    """What ``train`` lends the stages of one run."""

    #: The run's accelerate.Accelerator (its trigger carries a cancel to every process).
    accelerator: Any
    #: Pipeline name, the prefix of the progress bar's description.
    pipeline: str
    #: The run's stage callback (main process only).
    on_stage: StageProgress | None = None
    #: The run's cancel poll (main process only).
    should_stop: Callable[[], bool] | None = None
    #: Show a tqdm bar per stage on the main process.
    progress: bool = True

    def notify(self, name: str, step: int, total: int, loss: float) -> None:
        if self.on_stage is not None and self.accelerator.is_main_process:
            self.on_stage(name, step, total, loss)

    def check_stop(self) -> None:
        """Raise ``TrainingStopped`` on every process once ``should_stop`` turned true on the main one."""
        if self.should_stop is not None and self.accelerator.is_main_process and self.should_stop():
            self.accelerator.set_trigger()
        if self.accelerator.check_trigger():
            raise TrainingStopped("cancelled before the first training step")


_ACTIVE: ContextVar[StageControl | None] = ContextVar("studio_stage_control", default=None)


@contextmanager
def controlled(control: StageControl) -> Iterator[None]:
    """Make ``control`` the one that ``stage`` reports to (``train`` wraps the task's set-up in it)."""
    token = _ACTIVE.set(control)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextmanager
def stage(name: str, total: int) -> Iterator[Callable[[int, float], None]]:
    """A stage of ``total`` steps; yields ``report(step, loss)`` to call after each step.

    A cancel that came before the stage starts stops it before its first step.  Every
    process must make the same reports (each one is a collective under several processes).
    """
    control = _ACTIVE.get()
    if control is None:
        yield lambda step, loss: None
        return
    from tqdm.auto import tqdm

    control.check_stop()
    show = control.progress and control.accelerator.is_main_process
    bar = tqdm(total=total, desc=f"{control.pipeline} {name}", disable=not show)

    def report(step: int, loss: float) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}")
        control.notify(name, step, total, loss)
        control.check_stop()

    try:
        yield report
    finally:
        bar.close()
