"""Trained vision pipeline outputs as Vision-tab models.

``vision_models_from_folder(folder)`` rebuilds a folder written by the vision pipelines
(``pipelines.vision_common.save_vision``: adaptertune, salt, endoarss) or by the plain
``lora`` pipeline, and wraps the trained network so that images ``(B, 3, S, S)`` in
[0, 1] map to logits exactly as the pipeline's ``evaluate`` computes them (its own
``forward``, so its normalisation; ``S`` is the pipeline's ``image_size``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from adapters.base import AdapterError
from studio.service_vision import VisionModel

TASK_FILE = "vision_task.json"  # as pipelines.vision_common.TASK_FILE (not imported: it pulls timm)


class TaskLogits(nn.Module):
    """One task's logits of the EndoARSS multi-task network (the network is shared, not copied)."""

    def __init__(self, net: nn.Module, task: str) -> None:
        super().__init__()
        self.net, self.task = net, task

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images, self.task)


def is_vision_folder(folder: str | Path) -> bool:
    """True for a folder a vision pipeline (or the lora pipeline) wrote."""
    folder = Path(folder)
    if (folder / TASK_FILE).is_file():
        return True
    return _pipeline_of_adapter(folder) == "lora"


def vision_folders(roots: Iterable[str | Path]) -> list[Path]:
    """Vision output folders found under ``roots`` (outermost only: EndoARSS keeps a sub-adapter)."""
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        candidates = {p.parent for p in root.rglob(TASK_FILE)} | {
            p.parent for p in root.rglob("adapter_config.json")
        }
        for folder in sorted(candidates):
            if is_vision_folder(folder) and not any(folder.is_relative_to(f) for f in found):
                found.append(folder)
    return found


def _pipeline_of_adapter(folder: Path) -> str | None:
    config = folder / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("metadata", {}).get("pipeline")
    except (OSError, ValueError, AttributeError):
        return None


def class_names(dataset: str, n_classes: int, n_mask_classes: int) -> tuple[list[str], list[str]]:
    """(image-level class names, mask class names) of a ``pipelines.vision_data`` dataset.

    The same world-or-fallback choice as ``vision_data``: the world generators' names when
    ``studio.world`` provides them, else the fallback renderer's.  A count that does not
    match the trained head falls back to ``class k`` names.
    """
    from pipelines import vision_data

    seg = vision_data._world("segmentation", "make_segmentation", "SEG_CLASSES", "TOOL_CLASSES")
    shapes = vision_data._world("shapes", "make_captioned", "SHAPES")
    labels: list[str] = []
    masks: list[str] = []
    if dataset == "digits":
        labels, masks = [str(d) for d in range(10)], ["background", "stroke"]
    elif dataset == "shapes":
        labels = list(shapes.SHAPES) if shapes else list(vision_data.SHAPES)
    elif dataset == "scenes":
        if seg is not None and hasattr(seg, "ACTIVITY_NAMES"):
            labels, masks = list(seg.ACTIVITY_NAMES), list(seg.TOOL_CLASSES)
        else:
            labels = ["+".join(vision_data.SHAPES[k] for k in a) for a in vision_data.ACTIVITIES]
            masks = ["background", *vision_data.SHAPES[:3]]
    elif dataset in ("seg-source", "seg-target"):
        masks = list(seg.SEG_CLASSES) if seg else ["background", *vision_data.SHAPES]
    fit = lambda names, n: names if len(names) == n else [f"class {k}" for k in range(n)]  # noqa: E731
    return fit(labels, n_classes), fit(masks, n_mask_classes)


def vision_models_from_folder(folder: str | Path, name: str | None = None) -> list[VisionModel]:
    """The Vision-tab models of one trained output folder (name defaults to the folder's name).

    adaptertune -> one "classify" model; salt -> one "segment" model; endoarss -> a
    "classify" and a "segment" model (``NAME-classify`` / ``NAME-segment``) over the one
    network; lora -> one "classify" model.  Anything else raises ``AdapterError``.
    """
    folder = Path(folder)
    name = name or folder.name
    if not folder.is_dir():
        raise AdapterError(f"{folder}: not a folder (a vision model is a trained pipeline's output folder)")
    if not is_vision_folder(folder):
        raise AdapterError(
            f"{folder.name}: not a vision pipeline output (no {TASK_FILE}); train one with "
            "pipeline adaptertune, salt or endoarss"
        )
    try:
        models = (
            _from_vision_task(folder, name)
            if (folder / TASK_FILE).is_file()
            else _from_lora_pipeline(folder, name)
        )
        for vm in models:
            vm.path = str(folder)
        return models
    except AdapterError:
        raise
    except Exception as err:  # a damaged or foreign folder: one clear line
        raise AdapterError(f"cannot load vision model {folder.name}: {str(err).splitlines()[0]}") from None


def _source(method: str, backbone: str, folder: Path) -> str:
    return f"{method} on {backbone} ({folder})"


# Data-size options shrunk when rebuilding a task: the network depends only on the class counts.
LIGHT_DATA = dict(n_total=16, n_test=8, n_train=8)


def load_trained(folder: Path) -> tuple[object, nn.Module]:
    """(task, model in eval mode) as ``pipelines.vision_common.load_vision``, with tiny data sets.

    ``load_vision`` would otherwise generate the run's full training and test sets (seconds
    per model) only to read their class counts.
    """
    from pipelines.vision_common import load_vision

    return load_vision(folder, data_sizes=LIGHT_DATA)


def _from_vision_task(folder: Path, name: str) -> list[VisionModel]:
    task, model = load_trained(folder)
    cfg, method = task.cfg, task.pipeline
    size = int(cfg.image_size)
    if method == "adaptertune":
        labels, _ = class_names(cfg.dataset, model.head.out_features, 0)
        src = _source(f"AdapterTune ({cfg.mode}, {cfg.dataset})", task.backbone_info, folder)
        return [VisionModel(name, "classify", model, labels, size, src)]
    if method == "salt":
        n_mask = model.decoder.up[-1].out_channels
        _, masks = class_names("seg-target", 0, n_mask)
        src = _source(f"SALT ({cfg.mode}, shifted segmentation)", task.backbone_info, folder)
        return [VisionModel(name, "segment", model, masks, size, src)]
    if method == "endoarss":
        heads = model.heads
        n_cls = heads["cls"][-1].out_features if "cls" in heads else 0
        n_mask = heads["seg"].up[-1].out_channels if "seg" in heads else 0
        labels, masks = class_names(cfg.dataset, n_cls, n_mask)
        src = _source(f"EndoARSS/TESLA ({cfg.mode}, {cfg.dataset})", task.backbone_info, folder)
        out = []
        if "cls" in heads:
            out.append(
                VisionModel(f"{name}-classify", "classify", TaskLogits(model, "cls"), labels, size, src)
            )
        if "seg" in heads:
            out.append(VisionModel(f"{name}-segment", "segment", TaskLogits(model, "seg"), masks, size, src))
        return out
    raise AdapterError(f"{folder.name}: pipeline {method!r} has no Vision-tab wrapper")


def _from_lora_pipeline(folder: Path, name: str) -> list[VisionModel]:
    from adapters.formats import load_adapter
    from pipelines import get_pipeline

    options = json.loads((folder / "adapter_config.json").read_text())["metadata"]["pipeline_options"]
    task = get_pipeline("lora")(options)
    model = task.build_base()
    load_adapter(model, folder, "lora", base_model_id=task.base_model_id)
    labels, _ = class_names(task.cfg.dataset, task.num_classes, 0)
    src = _source(f"LoRA ({task.cfg.dataset})", task.base_model_id, folder)
    return [
        VisionModel(name, "classify", model.requires_grad_(False).eval(), labels, task.cfg.image_size, src)
    ]
