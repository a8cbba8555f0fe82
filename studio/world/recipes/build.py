"""`studio world build`: rebuild every world asset from scratch, in order, from one seed.

Data is rendered once up front (training set, probe set, held-out test set, each from its own
seed), then each recipe trains its model, saves it in its library's format, reloads it through
the standard loader, measures it and writes its model card. ``--smoke`` runs every recipe for a
few steps on tiny data (CPU check that nothing crashes before a GPU run). ``--steps-from`` replays
the step counts of an earlier build's world_build.json exactly, with no wall-clock caps.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from studio.world.recipes import backbones, clip, diffusion, vision_examples
from studio.world.recipes.common import (
    BuildContext,
    folder_size_mb,
    load_fixed_steps,
    make_world_data,
    write_card,
)

POINTMAP_NAME = "pointmap-tiny"
MODELS = (backbones.VIT.name, backbones.DINOV2.name, clip.MODEL_NAME, diffusion.MODEL_NAME, POINTMAP_NAME)
# Built only when named in --only (they train on the shipped backbones): the Vision tab's examples.
EXTRAS = (vision_examples.NAME,)
# Images rendered up front: (training, probe-training, held-out test); smoke sizes second.
DATA_SIZES = {"full": (50_000, 3_000, 2_000), "smoke": (192, 96, 64)}
POINTMAP_MINUTES = {"full": 1.0, "smoke": 0.05}


def parse_only(only: str | None) -> list[str]:
    if not only:
        return list(MODELS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS + EXTRAS]
    if unknown:
        raise ValueError(f"unknown world model {unknown[0]!r}; choose from {', '.join(MODELS + EXTRAS)}")
    return names


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()})"


def build(
    out: Path,
    only: str | None = None,
    device: str = "cuda",
    seed: int = 0,
    smoke: bool = False,
    log: Any = print,
    steps_from: Path | None = None,
) -> dict[str, Any]:
    """Build the selected world models into ``out``; returns (and writes) the build report.

    ``steps_from``: a world_build.json whose recorded step counts every loop runs exactly (no caps).
    """
    names = parse_only(only)
    fixed_steps = load_fixed_steps(steps_from, names) if steps_from is not None else None
    if vision_examples.NAME in names:  # its own report (the examples' cards), not world_build.json
        if len(names) > 1:
            raise ValueError(f"build {vision_examples.NAME} on its own, after the backbones")
        if steps_from is not None:
            raise ValueError(f"--steps-from does not apply to {vision_examples.NAME} (fixed-step already)")
        start = time.time()
        models = vision_examples.build(out, device=device, seed=seed, smoke=smoke, log=log)
        return {"seconds": {"total": round(time.time() - start, 1)}, "models": models}
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            "--device cuda asked for, but no CUDA device is available (use --device cpu --smoke)"
        )
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out.mkdir(parents=True, exist_ok=True)
    ctx = BuildContext(out=out, device=device, seed=seed, smoke=smoke, log=log, fixed_steps=fixed_steps)
    mode = "smoke" if smoke else "full"
    report: dict[str, Any] = {
        "command": f"studio world build{' --only ' + only if only else ''} --device {device} --seed {seed}"
        + (" --smoke" if smoke else "")
        + (f" --steps-from {steps_from}" if steps_from is not None else ""),
        "device": device_name(device),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": {},
        "models": {},
    }
    if fixed_steps is not None:  # a replay: say so, and from which file (wall-clock caps were off)
        report["fixed_steps"] = {"from": str(steps_from), "steps": fixed_steps}
    needs_images = [n for n in names if n != POINTMAP_NAME]
    if needs_images:
        n_train, n_probe, n_test = DATA_SIZES[mode]
        start = time.time()
        train = make_world_data(n_train, seed)
        probe = make_world_data(n_probe, seed + 1)
        test = make_world_data(n_test, seed + 2)
        report["seconds"]["data"] = round(time.time() - start, 1)
        report["data"] = {"train": n_train, "probe_train": n_probe, "test": n_test}
        ctx.say(f"data: {n_train}+{n_probe}+{n_test} images in {report['seconds']['data']} s")
    clip_model = None
    for name in names:
        start = time.time()
        if name == backbones.VIT.name:
            report["models"][name] = backbones.build(backbones.VIT, train, probe, test, ctx)
        elif name == backbones.DINOV2.name:
            report["models"][name] = backbones.build(backbones.DINOV2, train, probe, test, ctx)
        elif name == clip.MODEL_NAME:
            report["models"][name], clip_model = clip.build(train, test, ctx)
        elif name == diffusion.MODEL_NAME:
            clip_model = clip_model if clip_model is not None else load_built_clip(out, device)
            report["models"][name] = diffusion.build(train, test, clip_model, ctx)
        elif name == POINTMAP_NAME:
            report["models"][name] = build_pointmap(
                out / POINTMAP_NAME, seed, device, POINTMAP_MINUTES[mode], ctx, (fixed_steps or {}).get(name)
            )
        report["seconds"][name] = round(time.time() - start, 1)
        ctx.say(f"{name} done in {report['seconds'][name]} s")
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        write_report(out, report, names, ctx, fresh=not only)  # after each model: a cut-off run keeps them
    ctx.say(f"all done in {report['seconds']['total']} s: {report['sizes_mb']}")
    return report


def write_report(out: Path, report: dict[str, Any], names: list[str], ctx: BuildContext, fresh: bool) -> None:
    """world_build.json: the runs (command, device, date, seconds) and every model's metrics."""
    report["seconds"]["total"] = round(time.time() - ctx.started, 1)
    report["sizes_mb"] = {n: folder_size_mb(out / n) for n in names if (out / n).exists()}
    path = out / "world_build.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    runs = [r for r in merged.get("runs", []) if r.get("started") != report["started"]]
    if fresh:
        runs, merged["models"] = [], {}
    merged["runs"] = runs + [{k: v for k, v in report.items() if k != "models"}]
    merged.setdefault("models", {}).update(report["models"])
    path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")


def load_built_clip(out: Path, device: str) -> torch.nn.Module:
    """The CLIP a previous build wrote to ``out`` (the diffusion recipe's text encoder and judge)."""
    import open_clip

    folder = out / clip.MODEL_NAME
    if not (folder / "open_clip_config.json").exists():
        raise FileNotFoundError(f"{folder} is missing: build {clip.MODEL_NAME} first (or together)")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.to(device).eval()


def build_pointmap(
    folder: Path, seed: int, device: str, minutes: float, ctx: BuildContext, steps: int | None = None
) -> dict[str, Any]:
    """The two-view pointmap model's own recipe (studio.world.pointmap_model); a card if it wrote none.

    ``steps``: exactly that many training steps (no time budget), else the budget fits them.
    """
    try:
        from studio.world.pointmap_model import train_pointmap
    except ImportError as err:
        ctx.say(f"pointmap: SKIPPED, studio.world.pointmap_model is not importable ({err})")
        return {"skipped": f"studio.world.pointmap_model not importable: {err}"}
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"steps": steps} if steps is not None else {}
    metrics = train_pointmap(str(folder), seed=seed, device=device, minutes_budget=minutes, **kwargs)
    metrics = dict(metrics or {})
    metrics["size_mb"] = folder_size_mb(folder)
    if not (folder / "README.md").exists():
        body = "\n".join(f"- {k}: {v}" for k, v in sorted(metrics.items()))
        sections = {
            "Load": "```python\nfrom studio.world.assets import load_pointmap\nmodel = load_pointmap()\n```",
            "Recipe": f"`studio.world.pointmap_model.train_pointmap` (seed {seed}, {minutes} min budget); "
            f"rebuild: `studio world build --only {POINTMAP_NAME}`.",
            "Measured quality": body,
        }
        write_card(
            folder, POINTMAP_NAME, "A small two-view pointmap model (DUSt3R style).", sections, metrics
        )
    ctx.say(f"pointmap: {metrics}")
    return metrics
