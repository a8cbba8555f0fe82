"""Comparison grids: X/Y axes over settings, a baseline row, batched rendering.

Axis kinds: ``adapter`` (the stack becomes that one adapter; "none" = no adapter),
``strength`` (every adapter in the stack at that strength), ``seed``, ``guidance``,
``steps`` and ``precision`` ("fp" / "4bit").  Adapter values apply before strength
values, so an adapter x strength grid does what it says.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from adapters.base import AdapterError
from studio.service_types import AdapterUse, GenerationSettings

AXIS_KINDS = ("adapter", "strength", "seed", "guidance", "steps", "precision")
_ORDER = {k: i for i, k in enumerate(AXIS_KINDS)}


@dataclass
class Axis:
    #: One of AXIS_KINDS.
    kind: str
    #: The values along the axis (adapter names, numbers, "fp"/"4bit").
    values: list[Any]

    def __post_init__(self) -> None:
        if self.kind not in AXIS_KINDS:
            raise AdapterError(f"unknown grid axis {self.kind!r}; choose from {', '.join(AXIS_KINDS)}")
        if not self.values:
            raise AdapterError(f"the {self.kind} axis has no values")
        cast = {"strength": float, "guidance": float, "seed": int, "steps": int}.get(self.kind, str)
        try:
            self.values = [cast(v) for v in self.values]
        except (TypeError, ValueError):
            raise AdapterError(f"bad value on the {self.kind} axis: {self.values!r}") from None

    @classmethod
    def parse(cls, text: str) -> Axis:
        """``"seed=1,2,3"`` -> Axis("seed", [1, 2, 3])."""
        kind, sep, values = text.partition("=")
        if not sep:
            raise AdapterError(f"write an axis as KIND=V1,V2,... ; got {text!r}")
        return cls(kind.strip(), [v.strip() for v in values.split(",") if v.strip()])

    def label(self, value: Any) -> str:
        return (
            f"{value}"
            if self.kind == "adapter"
            else f"{self.kind} {value:g}"
            if isinstance(value, float)
            else f"{self.kind} {value}"
        )


@dataclass
class GridSpec:
    """What to compare: a template request and one or two axes."""

    #: Template for every cell (prompt, model, the default adapter stack, ...).
    base: GenerationSettings
    #: Columns.
    x: Axis
    #: Rows (None: one row).
    y: Axis | None = None
    #: Add a first row with no adapter at all (same seeds and settings otherwise).
    baseline: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.to_dict(),
            "x": dataclasses.asdict(self.x),
            "y": dataclasses.asdict(self.y) if self.y else None,
            "baseline": self.baseline,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GridSpec:
        return cls(
            GenerationSettings.from_dict(data["base"]),
            Axis(**data["x"]),
            Axis(**data["y"]) if data.get("y") else None,
            bool(data.get("baseline", True)),
        )


@dataclass
class GridCell:
    row: int
    col: int
    row_label: str
    col_label: str
    settings: GenerationSettings
    image: Any = None
    clip_score: float | None = None


@dataclass
class GridResult:
    cells: list[GridCell]
    row_labels: list[str]
    col_labels: list[str]
    spec: dict[str, Any] | None = None
    legend: list[str] = field(default_factory=list)
    seconds: float = 0.0


def apply_axis(settings: GenerationSettings, kind: str, value: Any) -> GenerationSettings:
    """A copy of ``settings`` with one axis value applied."""
    if kind == "adapter":
        if str(value).lower() in ("none", ""):
            return settings.replace(adapters=[])
        old = {a.name: a for a in settings.adapters}
        use = old.get(value) or AdapterUse(str(value), 1.0)
        return settings.replace(adapters=[dataclasses.replace(use, blocks=dict(use.blocks))])
    if kind == "strength":
        return settings.replace(
            adapters=[dataclasses.replace(a, strength=float(value)) for a in settings.adapters]
        )
    if kind == "precision":
        return settings.replace(precision=str(value))
    return settings.replace(**{kind: value})


def plan_grid(spec: GridSpec) -> GridResult:
    """Every cell's full settings, row-major, baseline row first."""
    y_values = spec.y.values if spec.y else [None]
    rows: list[tuple[str, list[tuple[str, Any]]]] = []
    if spec.baseline:
        rows.append(("baseline (no adapter)", [("adapter", "none")]))
    for v in y_values:
        rows.append((spec.y.label(v) if spec.y else "", [(spec.y.kind, v)] if spec.y else []))
    cells: list[GridCell] = []
    for r, (row_label, row_changes) in enumerate(rows):
        for c, xv in enumerate(spec.x.values):
            changes = row_changes + [(spec.x.kind, xv)]
            is_baseline = spec.baseline and r == 0
            if is_baseline:  # the baseline keeps the x value unless it is an adapter choice
                changes = [(k, v) for k, v in changes if k not in ("adapter", "strength")]
            s = spec.base
            for kind, value in sorted(changes, key=lambda kv: _ORDER[kv[0]]):
                s = apply_axis(s, kind, value)
            if is_baseline:
                s = s.replace(adapters=[])
            cells.append(GridCell(r, c, row_label, spec.x.label(xv), s))
    legend = [spec.base.parameters_text().splitlines()[0], spec.base.parameters_text().splitlines()[-1]]
    return GridResult(
        cells, [r for r, _ in rows], [spec.x.label(v) for v in spec.x.values], spec.to_dict(), legend
    )
