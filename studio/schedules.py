"""Per-timestep strength schedules, applied between denoising steps.

A schedule is a piecewise-linear multiplier over the sampling run, given as keyframes
``fraction:value`` where fraction 0 is the first step and 1 the last, e.g.
``"0:1, 0.5:1, 1:0"`` keeps an adapter at full strength for the first half and fades
it out over the second.  The pipeline's ``callback_on_step_end`` hook (which runs after
step i) sets the strengths for step i+1, so no pipeline code is replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adapters.base import AdapterError

StepCallback = Callable[[Any, int, Any, dict], dict]


@dataclass(frozen=True)
class StrengthSchedule:
    """Keyframes (fraction of the run done, multiplier), sorted by fraction."""

    points: tuple[tuple[float, float], ...]

    @classmethod
    def parse(cls, text: str | StrengthSchedule | None) -> StrengthSchedule | None:
        """Parse ``"0:1, 0.5:0.2, 1:0"``; a bare number is a constant; empty gives None."""
        if text is None or isinstance(text, StrengthSchedule):
            return text
        text = text.strip()
        if not text:
            return None
        points: list[tuple[float, float]] = []
        try:
            if ":" not in text:
                return cls(((0.0, float(text)),))
            for part in text.replace(";", ",").split(","):
                frac, value = part.split(":")
                points.append((float(frac), float(value)))
        except ValueError:
            raise AdapterError(
                f"bad strength schedule {text!r}; write keyframes like '0:1, 0.5:0.5, 1:0'"
            ) from None
        if any(not 0.0 <= f <= 1.0 for f, _ in points):
            raise AdapterError(f"schedule fractions must lie in [0, 1]: {text!r}")
        return cls(tuple(sorted(points)))

    def to_text(self) -> str:
        return ", ".join(f"{f:g}:{v:g}" for f, v in self.points)

    def at(self, step: int, num_steps: int) -> float:
        """The multiplier at denoising step ``step`` (0-based) of ``num_steps``."""
        frac = step / (num_steps - 1) if num_steps > 1 else 0.0
        pts = self.points
        if frac <= pts[0][0]:
            return pts[0][1]
        for (f0, v0), (f1, v1) in zip(pts, pts[1:]):
            if frac <= f1:
                return v0 + (v1 - v0) * (frac - f0) / (f1 - f0) if f1 > f0 else v1
        return pts[-1][1]


def step_end_callback(
    apply: Callable[[int], None],
    num_steps: int,
    user_callback: StepCallback | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> StepCallback:
    """A ``callback_on_step_end`` that calls ``apply(i + 1)`` after step i, then the user's own.

    ``apply(0)`` must be called by the caller before sampling starts.  ``on_step(done,
    total)`` reports progress.
    """

    def callback(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
        if i + 1 < num_steps:
            apply(i + 1)
        if on_step is not None:
            on_step(i + 1, num_steps)
        if user_callback is not None:
            kwargs = user_callback(pipe, i, t, kwargs)
        return kwargs

    return callback
