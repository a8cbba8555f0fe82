"""Vision adapters at inference time: classify an image, or segment it and overlay the mask.

A vision model here is any ``nn.Module`` mapping images ``(B, 3, S, S)`` in [0, 1] to
logits ``(B, C)`` (task "classify") or ``(B, C, S, S)`` (task "segment"), with class
names.  Training pipelines (or their saved checkpoints) register theirs with
``StudioService.add_vision_model`` (trained output folders load through
``studio.service_vision_load``); ``demo_vision_models`` builds untrained stand-ins, the
Vision tab's fallback when the shipped trained examples (``assets/examples``) are missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from adapters.base import AdapterError

PALETTE = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240]],
    dtype=np.uint8,
)


@dataclass
class VisionModel:
    name: str
    #: "classify" or "segment".
    task: str
    model: nn.Module
    classes: list[str]
    #: Input side length in pixels (the image is resized to it).
    size: int = 32
    #: Where it came from (shown in the UI).
    source: str = ""
    #: The trained output folder it was loaded from ("" when built in memory).
    path: str = ""


def _to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    arr = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


@torch.no_grad()
def classify(vm: VisionModel, image: Image.Image) -> dict[str, float]:
    """Class -> probability, sorted by probability."""
    if vm.task != "classify":
        raise AdapterError(f"{vm.name} is a {vm.task} model, not a classifier")
    dev = next(vm.model.parameters()).device
    logits = vm.model(_to_tensor(image, vm.size).to(dev))
    probs = logits.float().softmax(-1)[0].cpu().tolist()
    return dict(sorted(zip(vm.classes, probs), key=lambda kv: -kv[1]))


@torch.no_grad()
def segment(vm: VisionModel, image: Image.Image, alpha: float = 0.5) -> tuple[Image.Image, dict[str, float]]:
    """(the image with the predicted mask blended over it, share of pixels per class)."""
    if vm.task != "segment":
        raise AdapterError(f"{vm.name} is a {vm.task} model, not a segmenter")
    dev = next(vm.model.parameters()).device
    logits = vm.model(_to_tensor(image, vm.size).to(dev))
    mask = logits.argmax(1)[0].cpu().numpy()
    rgb = image.convert("RGB")
    colours = Image.fromarray(PALETTE[mask % len(PALETTE)]).resize(rgb.size, Image.NEAREST)
    fg = Image.fromarray(((mask > 0) * 255).astype(np.uint8)).resize(rgb.size, Image.NEAREST)
    overlay = Image.composite(Image.blend(rgb, colours, alpha), rgb, fg)
    shares = {c: float((mask == i).mean()) for i, c in enumerate(vm.classes)}
    return overlay, shares


class _SegNet(nn.Module):
    """Backbone patch grid -> SegDecoder (the vision pipelines' decoder)."""

    def __init__(self, backbone: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.backbone, self.decoder = backbone, decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from pipelines.vision_common import patch_grid

        return self.decoder(patch_grid(self.backbone, self.backbone.forward_features(x)), x.shape[-2:])


def demo_vision_models() -> list[VisionModel]:
    """Untrained tiny ViTs with a LoRA: the fallback when assets/examples is missing (labelled so)."""
    from adapters.base import inject
    from adapters.lora import LoraSpec
    from pipelines.vision_common import SegDecoder, build_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone, desc = build_backbone("vit", source="auto", img_size=32, tiny=True)
        clf = nn.Sequential(backbone, nn.Linear(backbone.num_features, 4))
        inject(clf, LoraSpec(targets=["qkv"], rank=2), "demo-lora")
        seg_backbone, _ = build_backbone("vit", source="auto", img_size=32, tiny=True)
        seg = _SegNet(seg_backbone, SegDecoder(seg_backbone.num_features, 4))
        inject(seg, LoraSpec(targets=["qkv"], rank=2), "demo-lora")
    shapes = ["circle", "square", "triangle", "cross"]
    note = f"UNTRAINED fallback, random predictions ({desc}); assets/examples is missing"
    return [
        VisionModel("untrained-classifier", "classify", clf.eval(), shapes, 32, note),
        VisionModel("untrained-segmenter", "segment", seg.eval(), ["background", *shapes[:3]], 32, note),
    ]
