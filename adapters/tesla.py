"""TESLA, the Task Efficient Shared Low-Rank Adapters of EndoARSS (Wang et al. 2025).

Each targeted linear carries one shared low-rank update and one low-rank update per task:

    delta_t(x) = (alpha / r_s) B_s A_s x + (alpha / r_t) B_t A_t x       (t = the active task)

All B are zero-initialised, so a fresh adapter is exact identity.  The tasks share what
they agree on through (A_s, B_s) and split what conflicts into their own (A_t, B_t): a
forward pass run for task t uses the shared part and t's part only, so t's parameters
get gradients from t's loss alone.  The active task is chosen at forward time with
``set_task(model, name, task)`` or the ``use_task`` context manager; with no task active
only the shared part runs.

Merging folds the shared part plus the active task's part into the base weight (a
single-task deployment); changing the task of a merged adapter is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from adapters.base import AdapterError, AdapterLayer, AdapterSpec, iter_hosts, register_method


@dataclass
class TeslaSpec(AdapterSpec):
    method = "tesla"
    #: Task names, each with its own low-rank component.
    tasks: list[str] = field(default_factory=lambda: ["cls", "seg"])
    #: Rank r_s of the shared component.
    shared_rank: int = 8
    #: Rank r_t of each task-specific component.
    task_rank: int = 4
    #: Scale numerator: each component is scaled by alpha / its rank.
    alpha: float = 8.0
    #: Task active right after injection ("" = shared component only).
    default_task: str = ""


def _low_rank(rank: int, fan_in: int, fan_out: int) -> tuple[nn.Parameter, nn.Parameter]:
    a = nn.Parameter(torch.empty(rank, fan_in))
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a, nn.Parameter(torch.zeros(fan_out, rank))


class TeslaLinear(AdapterLayer):
    """Shared + per-task low-rank updates on one ``nn.Linear``."""

    def __init__(self, base: nn.Linear, spec: TeslaSpec) -> None:
        super().__init__()
        if spec.shared_rank < 1 or spec.task_rank < 1:
            raise AdapterError(f"TESLA ranks must be >= 1, got {spec.shared_rank}, {spec.task_rank}")
        if not spec.tasks or len(set(spec.tasks)) != len(spec.tasks):
            raise AdapterError(f"TESLA needs distinct task names, got {spec.tasks}")
        if spec.default_task and spec.default_task not in spec.tasks:
            raise AdapterError(f"default_task {spec.default_task!r} is not one of {spec.tasks}")
        self.tasks = list(spec.tasks)
        self.shared_scale = spec.alpha / spec.shared_rank
        self.task_scale = spec.alpha / spec.task_rank
        self.shared_A, self.shared_B = _low_rank(spec.shared_rank, base.in_features, base.out_features)
        self.task_A = nn.ParameterDict()
        self.task_B = nn.ParameterDict()
        for task in spec.tasks:
            self.task_A[task], self.task_B[task] = _low_rank(
                spec.task_rank, base.in_features, base.out_features
            )
        self.active_task: str | None = spec.default_task or None

    @classmethod
    def from_module(cls, base: nn.Module, spec: AdapterSpec, name: str) -> TeslaLinear | None:
        if not isinstance(spec, TeslaSpec) or not isinstance(base, nn.Linear):
            return None
        return cls(base, spec)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [self.task_A[task], self.task_B[task]]

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.shared_A, self.shared_B]

    def delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x.to(self.shared_A.dtype)
        out = self.shared_scale * F.linear(F.linear(h, self.shared_A), self.shared_B)
        if self.active_task is not None:
            t = self.active_task
            out = out + self.task_scale * F.linear(F.linear(h, self.task_A[t]), self.task_B[t])
        return out.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        w = self.shared_scale * self.shared_B @ self.shared_A
        if self.active_task is not None:
            t = self.active_task
            w = w + self.task_scale * self.task_B[t] @ self.task_A[t]
        return w


def tesla_layers(model: nn.Module, name: str) -> Iterator[tuple[str, TeslaLinear]]:
    for module_name, host in iter_hosts(model):
        branch = host.adapters[name] if name in host.adapters else None
        if isinstance(branch, TeslaLinear):
            yield module_name, branch


def set_task(model: nn.Module, name: str, task: str | None) -> None:
    """Make ``task`` (or None: shared part only) the active task of TESLA adapter ``name``."""
    found = False
    for module_name, host in iter_hosts(model):
        branch = host.adapters[name] if name in host.adapters else None
        if not isinstance(branch, TeslaLinear):
            continue
        found = True
        if task is not None and task not in branch.tasks:
            raise AdapterError(f"TESLA adapter {name!r} has tasks {branch.tasks}, not {task!r}")
        if name in host.merged and task != branch.active_task:
            raise AdapterError(
                f"TESLA adapter {name!r} is merged on {module_name}; unmerge it to switch task"
            )
    if not found:
        raise AdapterError(f"no TESLA adapter named {name!r} on the model")
    for _, branch in tesla_layers(model, name):
        branch.active_task = task


def get_task(model: nn.Module, name: str) -> str | None:
    for _, branch in tesla_layers(model, name):
        return branch.active_task
    raise AdapterError(f"no TESLA adapter named {name!r} on the model")


@contextmanager
def use_task(model: nn.Module, name: str, task: str | None) -> Iterator[None]:
    """Run a block of code with ``task`` active, then restore the previous task."""
    previous = get_task(model, name)
    set_task(model, name, task)
    try:
        yield
    finally:
        set_task(model, name, previous)


def shared_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    return [p for _, b in tesla_layers(model, name) for p in b.shared_parameters()]


def task_parameters(model: nn.Module, name: str, task: str) -> list[nn.Parameter]:
    return [p for _, b in tesla_layers(model, name) for p in b.task_parameters(task)]


def matrix_spec(linear: list[str], conv: list[str], blocks: list[str]) -> TeslaSpec:
    """Core test matrix: TESLA on the linear targets with the first task active."""
    return TeslaSpec(targets=linear, shared_rank=2, task_rank=2, alpha=2.0, default_task="cls")


register_method(
    TeslaSpec,
    [TeslaLinear],
    doc="Shared + task-specific low-rank updates, task chosen at forward time (EndoARSS)",
)
