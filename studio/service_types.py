"""Plain-data requests and results of studio.service (JSON round-trip, no torch objects)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from adapters.base import AdapterError


@dataclass
class AdapterUse:
    """One adapter in a request's stack."""

    #: Name of a loaded adapter.
    name: str
    #: Global strength (1 = as trained, 0 = off).
    strength: float = 1.0
    #: Per-block multipliers: module pattern (plain suffix or regex, matched against
    #: "<component>.<module path>", e.g. "unet.down_blocks.*") -> factor; last match wins.
    blocks: dict[str, float] = field(default_factory=dict)
    #: Per-timestep multiplier as keyframes "0:1, 1:0" (see studio.schedules); "" = constant.
    schedule: str = ""

    @classmethod
    def from_any(cls, data: AdapterUse | dict | str) -> AdapterUse:
        if isinstance(data, AdapterUse):
            return data
        if isinstance(data, str):  # "name" or "name:0.8"
            name, _, s = data.partition(":")
            return cls(name.strip(), float(s) if s else 1.0)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise AdapterError(f"unknown adapter option(s): {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass
class GenerationSettings:
    """Everything that determines one image; ``to_dict`` is enough to render it again."""

    #: Base model name from StudioService.list_base_models().
    base_model: str = "tiny-sd"
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    width: int = 32
    height: int = 32
    #: The adapter stack, applied in this request only.
    adapters: list[AdapterUse] = field(default_factory=list)
    #: "fp" (float base weights) or "4bit" (SVDQuant base with fused adapter branches).
    precision: str = "fp"
    #: Fold the adapters into the base weights for this request (faster; scalar strengths only).
    fuse: bool = False

    def __post_init__(self) -> None:
        self.adapters = [AdapterUse.from_any(a) for a in self.adapters]
        if self.precision not in ("fp", "4bit"):
            raise AdapterError(f"precision must be 'fp' or '4bit', got {self.precision!r}")
        if self.steps < 1 or self.steps > 500:
            raise AdapterError(f"steps must be between 1 and 500, got {self.steps}")
        if self.width % 8 or self.height % 8 or min(self.width, self.height) < 8:
            raise AdapterError(f"width and height must be multiples of 8, got {self.width}x{self.height}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationSettings:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise AdapterError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def replace(self, **changes: Any) -> GenerationSettings:
        return dataclasses.replace(self, **changes)

    def batch_key(self) -> tuple:
        """Settings that must be equal for cells to share one batched pipeline call."""
        return (
            self.base_model,
            self.steps,
            self.guidance,
            self.width,
            self.height,
            self.precision,
            self.fuse,
        )

    def parameters_text(self) -> str:
        """A1111-style ``parameters`` text (adapters as ``<lora:name:strength>`` prompt tags)."""
        tags = "".join(f" <lora:{a.name}:{a.strength:g}>" for a in self.adapters)
        lines = [self.prompt + tags]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        fields = [
            f"Steps: {self.steps}",
            f"CFG scale: {self.guidance:g}",
            f"Seed: {self.seed}",
            f"Size: {self.width}x{self.height}",
            f"Model: {self.base_model}",
            f"Precision: {self.precision}",
        ]
        if self.fuse:
            fields.append("Fused: true")
        for a in self.adapters:
            if a.blocks:
                fields.append(f"Blocks {a.name}: " + " ".join(f"{k}={v:g}" for k, v in a.blocks.items()))
            if a.schedule:
                fields.append(f'Schedule {a.name}: "{a.schedule}"')
        lines.append(", ".join(fields))
        return "\n".join(lines)


@dataclass
class AdapterInfo:
    """What the Adapters tab shows about a loaded or on-disk adapter."""

    name: str
    method: str = ""
    rank: int | None = None
    targets: list[str] = field(default_factory=list)
    size_bytes: int = 0
    base_model: str = ""
    path: str = ""
    loaded: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
