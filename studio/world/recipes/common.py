"""Shared pieces of the world recipes: data made up front, labels, prompts, probes, cards.

Every recipe takes a :class:`BuildContext` (device, seed, smoke flag, output folder) and a
:class:`WorldData` (captioned images generated once by :func:`make_world_data`), trains one
model, saves it where the standard loader finds it and returns its measured quality.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Images are rendered in fixed chunks so that the bytes do not depend on the worker count.
CHUNK = 2048
# Attributes the recipes classify; "quadrant" is derived from the shape's position.
ATTRIBUTES = ("shape", "colour", "size", "background", "style", "quadrant")


@dataclass
class BuildContext:
    """Where and how one build runs."""

    out: Path  # the assets folder; each model writes a sub-folder
    device: str = "cuda"  # torch device the models train on
    seed: int = 0  # every random choice derives from this
    smoke: bool = False  # a few steps on tiny data: checks that the recipe runs end to end
    log: Callable[[str], None] = print  # progress lines
    started: float = field(default_factory=time.time)  # for elapsed-time lines
    # Replay (--steps-from): exact step count per loop key (see FIXED_STEP_KEYS), no wall-clock cap.
    fixed_steps: dict[str, int] | None = None

    def step_plan(self, key: str, steps: int, max_seconds: float) -> tuple[int, float]:
        """(steps, wall-clock cap) of one training loop: the recipe's, or the replayed count uncapped.

        Uncapped, :meth:`StepBudget.progress` is ``step / steps``: the LR schedule follows steps only.
        """
        if self.fixed_steps is None:
            return steps, max_seconds
        if key not in self.fixed_steps:
            raise ValueError(f"no fixed step count for {key} (have: {', '.join(sorted(self.fixed_steps))})")
        return self.fixed_steps[key], math.inf

    def autocast(self) -> Any:
        """bf16 autocast on CUDA; plain fp32 elsewhere (CPU smoke runs)."""
        if self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def generator(self, offset: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed * 1000 + offset)

    def say(self, msg: str) -> None:
        self.log(f"[world {time.time() - self.started:6.1f}s] {msg}")


# Training loops a build can replay with --steps-from: loop key -> where world_build.json records
# its step count (under "models").
FIXED_STEP_KEYS = {
    "vit-tiny-world": ("vit-tiny-world", "train", "steps"),
    "dinov2-tiny-world": ("dinov2-tiny-world", "train", "steps"),
    "clip-tiny-world": ("clip-tiny-world", "train", "steps"),
    "diffusion-tiny/vae": ("diffusion-tiny", "vae", "steps"),
    "diffusion-tiny/unet": ("diffusion-tiny", "unet", "steps"),
    "pointmap-tiny": ("pointmap-tiny", "steps"),
}


def read_report(path: str | Path) -> dict[str, Any]:
    """A world_build.json, with an error that names the file when it is missing or not a report."""
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such build report") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a world_build.json report (not JSON: {err})") from None
    if not isinstance(report, dict) or not isinstance(report.get("models"), dict):
        raise ValueError(f"{path} is not a world_build.json report (no 'models' table)")
    return report


def load_fixed_steps(path: Path, names: Sequence[str]) -> dict[str, int]:
    """The step counts a world_build.json recorded for the loops of ``names`` (a clear error if absent)."""
    report = read_report(path)
    out = {}
    for key, where in FIXED_STEP_KEYS.items():
        if where[0] not in names:
            continue
        value: Any = report.get("models", {})
        for part in where:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path} records no step count for {key} (models/{'/'.join(where)})")
        out[key] = value
    return out


def vocab(field_name: str) -> list[str]:
    """The class names of one attribute, in the order the labels use."""
    from studio.world import shapes

    table = {
        "shape": shapes.SHAPES,
        "colour": shapes.COLOURS,
        "size": shapes.SIZES,
        "background": shapes.BACKGROUND_COLOURS,
        "style": shapes.STYLES,
        "quadrant": ["top-left", "top-right", "bottom-left", "bottom-right"],
    }[field_name]
    return [str(v) for v in table]


@dataclass
class WorldData:
    """Captioned images with their integer labels, in memory."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[str]  # one caption per image
    attrs: list[Any]  # shapes.SceneAttrs per image
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # attribute -> int64 [N]

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, n: int) -> WorldData:
        return WorldData(
            self.images[:n], self.captions[:n], self.attrs[:n], {k: v[:n] for k, v in self.labels.items()}
        )


def _render_chunk(args: tuple[int, int, int]) -> tuple[np.ndarray, list[str], list[Any]]:
    from studio.world import shapes

    n, seed, size = args
    data = shapes.make_captioned(n, seed, size=size)
    return data.images, list(data.captions), list(data.attrs)


def make_world_data(n: int, seed: int, size: int = 64, workers: int | None = None) -> WorldData:
    """Render ``n`` captioned images (chunked, optionally on several processes) and label them."""
    jobs = [(min(CHUNK, n - start), seed * 100_003 + i, size) for i, start in enumerate(range(0, n, CHUNK))]
    workers = workers or min(len(jobs), os.cpu_count() or 1, 16)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(job) for job in jobs]
    images = np.concatenate([p[0] for p in parts])
    captions = [c for p in parts for c in p[1]]
    attrs = [a for p in parts for a in p[2]]
    return WorldData(images, captions, attrs, label_attrs(attrs))


def label_attrs(attrs: Sequence[Any]) -> dict[str, np.ndarray]:
    """Integer labels per attribute; the quadrant splits x and y at the middle of the canvas."""
    labels = {}
    for name in ("shape", "colour", "size", "background", "style"):
        index = {v: i for i, v in enumerate(vocab(name))}
        labels[name] = np.array([index[str(getattr(a, name))] for a in attrs], dtype=np.int64)
    xs = np.array([float(a.x) for a in attrs])
    ys = np.array([float(a.y) for a in attrs])
    # x, y are centre coordinates; their range is the canvas (fractions or pixels): split at its middle.
    mid_x = 0.5 if xs.max(initial=0) <= 1.0 else 32.0
    mid_y = 0.5 if ys.max(initial=0) <= 1.0 else 32.0
    labels["quadrant"] = ((ys > mid_y).astype(np.int64) * 2 + (xs > mid_x)).astype(np.int64)
    return labels


# Which attributes each entry of prompt_variants names (None: the full caption names them all).
VARIANT_FIELDS = (None, ("shape", "colour"), ("shape", "colour", "background"), ("shape", "colour", "size"))


def prompt_variants(attrs: Any, full_caption: str) -> list[str]:
    """The caption and shorter prompts naming fewer attributes (see VARIANT_FIELDS)."""
    shape, colour, bg = attrs.shape, attrs.colour, attrs.background
    return [
        full_caption,
        f"a {colour} {shape}",
        f"a {colour} {shape} on a {bg} background",
        f"a {attrs.size} {colour} {shape}",
    ]


def sample_prompts(data: WorldData, rng: np.random.Generator, p_full: float = 0.6) -> list[str]:
    """One training prompt per image: the full caption with probability ``p_full``, else a short one."""
    out = []
    for caption, attrs in zip(data.captions, data.attrs):
        variants = prompt_variants(attrs, caption)
        out.append(caption if rng.random() < p_full else variants[1 + int(rng.integers(len(variants) - 1))])
    return out


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1] (mean 0.5, std 0.5 normalisation)."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def batches(n: int, batch: int, steps: int, gen: torch.Generator, device: str) -> Iterator[torch.Tensor]:
    """Random index batches (with replacement across steps) on ``device``."""
    for _ in range(steps):
        yield torch.randint(0, n, (batch,), generator=gen, device=device)


@contextmanager
def timed(record: dict[str, Any], key: str) -> Iterator[None]:
    start = time.time()
    yield
    record[key] = round(time.time() - start, 1)


class StepBudget:
    """Stops a loop after ``steps`` steps or ``max_seconds`` seconds, whichever comes first."""

    def __init__(self, steps: int, max_seconds: float) -> None:
        self.steps, self.max_seconds, self.start = steps, max_seconds, time.time()
        self.done = 0

    def __iter__(self) -> Iterator[int]:
        for step in range(self.steps):
            if time.time() - self.start > self.max_seconds:
                return
            self.done = step + 1
            yield step

    def progress(self, step: int) -> float:
        """Fraction of the run done: steps or seconds, whichever is further along."""
        return min(1.0, max(step / self.steps, (time.time() - self.start) / self.max_seconds))

    def lr(self, step: int, warmup: int, base: float) -> float:
        """Linear warmup, then cosine decay over :meth:`progress` (so a time cap still anneals)."""
        if step < warmup:
            return base * (step + 1) / warmup
        return base * 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))

    @property
    def seconds(self) -> float:
        return round(time.time() - self.start, 1)

    @property
    def stopped_early(self) -> bool:
        return self.done < self.steps


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int = 0
) -> float:
    """Accuracy of a logistic-regression probe on frozen features (standardised)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=seed))
    clf.fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean())


def digits_images(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as uint8 RGB images of ``size`` pixels (bilinear upscale)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float()[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    rgb = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1)
    return rgb.numpy(), digits.target.astype(np.int64)


def write_card(folder: Path, title: str, summary: str, sections: dict[str, str], metrics: dict) -> None:
    """Write README.md (the model card) and metrics.json (the same numbers, machine-readable)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", summary.strip(), ""]
    for head, body in sections.items():
        lines += [f"## {head}", "", body.strip(), ""]
    (folder / "README.md").write_text("\n".join(lines))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def folder_size_mb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20, 2)


def with_attr(attrs: Any, **changes: Any) -> Any:
    """A copy of a SceneAttrs with some fields changed (dataclasses.replace)."""
    return replace(attrs, **changes)
