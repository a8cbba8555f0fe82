"""`studio world compare A.json B.json`: two world builds' quality metrics side by side, with noise.

Every numeric metric both reports share (under ``models``) becomes a row ``metric | A | B | diff``;
timings, sizes, parameter counts, data-set facts (chance levels, counts) and flags are left out,
and the training step counts get a table of their own. Metrics that are proportions measured on
``n`` samples (accuracies) get a binomial noise estimate, ``sqrt(e_A^2 + e_B^2)`` with
``e = 2 sqrt(p (1 - p) / n)`` (about a 95% band for the difference of two independent runs), and
a flag where ``|diff|`` exceeds it. ``n`` comes from the evaluation code of each recipe (see
:func:`sample_size`); where it is unknown (losses, PSNR, pixel fractions of the pointmap, whose
pixels are not independent samples) the noise column says ``-``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from studio.world.recipes.common import FIXED_STEP_KEYS, table

# Leaf keys that are not quality: timings, sizes, counts, configuration, data facts.
SKIP_KEYS = {
    "seconds",
    "train_seconds",
    "data_seconds",
    "cpu_seconds_per_image",
    "size_mb",
    "weights_mb",
    "params",
    "params_m",
    "seed",
    "batch_size",
    "image_size",
    "train_pairs",
    "tokens_used",
    "scaling_factor",
    "prompts",
    "steps",
    "stopped_early",
    "chance",
}
# scikit-learn's digits (load_digits): the backbone probes fit on one half and test on the other.
DIGITS = 1797
SMOKE_DIGITS = 300  # backbones.build caps the digits at this many in a --smoke build
RETRIEVAL_POOL = 100  # clip.evaluate: the true caption among this many test images


def flatten(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], float]]:
    """(path, value) of every numeric leaf that is a quality metric (see SKIP_KEYS)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key not in SKIP_KEYS:
                yield from flatten(value, (*prefix, str(key)))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield prefix, float(tree)


def _data_run(report: dict) -> dict:
    """The latest run that rendered the captioned data (its sizes say how big the test sets were)."""
    runs = [r for r in report.get("runs", []) if "data" in r]
    return runs[-1] if runs else {}


def sample_size(path: tuple[str, ...], report: dict) -> int | None:
    """How many independent samples the proportion at ``path`` (model first) was measured on."""
    model, *rest = path
    run = _data_run(report)
    n_test = run.get("data", {}).get("test")
    if not rest:
        return None
    if rest[0] == "probes" and len(rest) == 3 and rest[2] == "probe":
        if rest[1] == "digits":  # backbones.probe_report: a permutation split in two halves
            n = SMOKE_DIGITS if "--smoke" in run.get("command", "") else DIGITS
            return n - n // 2
        return n_test
    if rest[0] in ("head_accuracy", "zero_shot"):  # the held-out test images
        return n_test
    if rest == ["caption_retrieval_top1_of_100"]:
        return min(RETRIEVAL_POOL, n_test) if n_test else None
    if rest[0] == "prompt_following" and rest[1] in ("by_guidance", "clip_on_real_images"):
        return report["models"][model]["prompt_following"].get("prompts")  # one image per prompt
    return None


def binomial_noise(p: float, n: int | None) -> float | None:
    """2 sigma of a proportion ``p`` measured on ``n`` samples (None: not a proportion, or n unknown)."""
    if n is None or n < 1 or not 0.0 <= p <= 1.0:
        return None
    return 2.0 * math.sqrt(p * (1.0 - p) / n)


def _fmt(value: float) -> str:
    return str(round(value, 4))


def _run_line(label: str, name: str, report: dict) -> str:
    runs = report.get("runs") or [{}]
    last = runs[-1]
    text = f"- {label}: `{name}`: `{last.get('command', '?')}` on {last.get('device', '?')}, {last.get('date', '?')}"
    fixed = [r["fixed_steps"]["from"] for r in runs if "fixed_steps" in r]
    return text + (f" (fixed steps from `{fixed[-1]}`)" if fixed else "")


def step_rows(a: dict, b: dict) -> list[list[str]]:
    """Training steps of every loop both reports recorded."""
    rows = []
    for key, where in FIXED_STEP_KEYS.items():
        values = []
        for report in (a, b):
            value: Any = report.get("models", {})
            for part in where:
                value = value.get(part) if isinstance(value, dict) else None
            values.append(value)
        if all(isinstance(v, int) for v in values):
            rows.append([key, str(values[0]), str(values[1]), f"{values[1] - values[0]:+d}"])
    return rows


def compare_reports(a: dict, b: dict, names: Sequence[str] = ("A", "B")) -> str:
    """A markdown report: shared metrics (A, B, B - A, noise, flag) and training steps."""
    metrics_a, metrics_b = dict(flatten(a.get("models", {}))), dict(flatten(b.get("models", {})))
    rows, flagged, tested = [], 0, 0
    for path in sorted(set(metrics_a) & set(metrics_b)):
        va, vb = metrics_a[path], metrics_b[path]
        ea, eb = binomial_noise(va, sample_size(path, a)), binomial_noise(vb, sample_size(path, b))
        noise, beyond = "-", "-"
        if ea is not None and eb is not None:
            combined = math.hypot(ea, eb)
            beyond = "yes" if abs(vb - va) > combined + 1e-9 else ""
            noise, tested, flagged = f"{combined:.4f}", tested + 1, flagged + (beyond == "yes")
        rows.append(["/".join(path), _fmt(va), _fmt(vb), f"{vb - va:+.4f}", noise, beyond])
    lines = [
        f"A = {names[0]}, B = {names[1]}:",
        "",
        _run_line("A", names[0], a),
        _run_line("B", names[1], b),
        "",
        table(rows, ["metric", "A", "B", "diff (B - A)", "noise (2 sigma)", "beyond noise"]),
        "",
        f"{flagged} of {tested} proportions differ by more than the binomial noise "
        "(about 1 in 20 would by chance).",
    ]
    only = sorted(set(metrics_a) ^ set(metrics_b))
    if only:
        lines.append(f"{len(only)} metrics are in one report only (not compared).")
    steps = step_rows(a, b)
    if steps:
        lines += ["", "Training steps:", "", table(steps, ["training loop", "A", "B", "diff (B - A)"])]
    return "\n".join(lines)
