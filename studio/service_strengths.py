"""Per-row, per-block, per-step adapter strengths for one (batched) pipeline call.

Row i of a batch uses the adapter stack of its own request; a host layer gets a scalar
when every row agrees and a per-sample vector ``[B]`` otherwise (the core tiles it over
the classifier-free-guidance doubled batch).  Adapters that a row does not list are at 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from adapters.base import iter_hosts, name_matches
from studio.schedules import StrengthSchedule
from studio.service_types import AdapterUse


class StrengthPlan:
    """Precomputed (base strength x block factor) per host, adapter and row; schedules per step."""

    def __init__(self, components: dict[str, nn.Module], rows: Sequence[Sequence[AdapterUse]]) -> None:
        self.rows = len(rows)
        by_row = [{a.name: a for a in row} for row in rows]
        self.schedules = [{a.name: StrengthSchedule.parse(a.schedule) for a in row} for row in rows]
        # (host, adapter name, [per-row static strength])
        self.entries: list[tuple[nn.Module, str, list[float]]] = []
        for comp_name, module in components.items():
            for host_name, host in iter_hosts(module):
                full = f"{comp_name}.{host_name}"
                for name in host.adapters:
                    values = [_static(row.get(name), full) for row in by_row]
                    self.entries.append((host, name, values))
        self.has_schedule = any(s is not None for row in self.schedules for s in row.values())

    def apply(self, step: int = 0, num_steps: int = 1) -> None:
        """Set every host's strengths for denoising step ``step``."""
        for host, name, values in self.entries:
            row_values = values
            if self.has_schedule:
                row_values = []
                for r, v in enumerate(values):
                    sched = self.schedules[r].get(name)
                    row_values.append(v * sched.at(step, num_steps) if sched is not None else v)
            if all(v == row_values[0] for v in row_values):
                host.set_strength(name, float(row_values[0]))
            else:
                host.set_strength(name, torch.tensor(row_values, dtype=torch.float32))

    def reset(self) -> None:
        """Back to scalar strength 0 on every host, so no request leaks into the next."""
        for host, name, _ in self.entries:
            if name not in host.merged:
                host.set_strength(name, 0.0)


def _static(use: AdapterUse | None, module_path: str) -> float:
    if use is None:
        return 0.0
    factor = 1.0
    for pattern, value in use.blocks.items():
        if name_matches(module_path, pattern):
            factor = float(value)
    return float(use.strength) * factor
