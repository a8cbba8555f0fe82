"""CLIP-based metrics for the tiny world: zero-shot attribute classification and CLIP score.

Works with the shipped small CLIP and with any open_clip model (images are resized to the
model's input size). Each class of an attribute is described by a *prompt ensemble*: world
captions that name that value, the other attributes drawn at random, averaged in embedding
space (the usual CLIP zero-shot recipe, with the world's own caption grammar as templates).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Attributes a caption names, hence that zero-shot classification can read off an image.
CAPTION_ATTRS = ("shape", "colour", "background", "size", "style")


def _vocab(attr: str) -> list[str]:
    from studio.world.recipes.common import vocab

    return vocab(attr)


def ensemble_prompts(attr: str, value: str, n: int, seed: int = 0) -> list[str]:
    """``n`` world captions (full and short forms) whose ``attr`` is ``value``."""
    from studio.world import shapes
    from studio.world.recipes.common import VARIANT_FIELDS, prompt_variants, with_attr

    rng = np.random.default_rng(seed)
    usable = [i for i, fields in enumerate(VARIANT_FIELDS) if fields is None or attr in fields]
    prompts = []
    for i in range(n):
        attrs = with_attr(shapes.sample_attrs(rng), **{attr: _typed(attr, value)})
        prompts.append(prompt_variants(attrs, shapes.caption(attrs))[usable[i % len(usable)]])
    return prompts


def _typed(attr: str, value: str) -> Any:
    """The value as the attrs field stores it (sizes may be numbers in the generator)."""
    from studio.world import shapes

    table = {"shape": shapes.SHAPES, "colour": shapes.COLOURS, "size": shapes.SIZES}
    table.update({"background": shapes.BACKGROUND_COLOURS, "style": shapes.STYLES})
    for v in table[attr]:
        if str(v) == value:
            return v
    raise KeyError(f"{attr}={value!r} is not in the world's vocabulary")


class WorldClipScorer:
    """Zero-shot attribute classifier and CLIP score on top of an open_clip model."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, device: str = "cpu", n_prompts: int = 16, seed: int = 0
    ) -> None:
        self.model, self.tokenizer, self.device = model.eval().to(device), tokenizer, device
        self.n_prompts, self.seed = n_prompts, seed
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        self.mean = torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5)), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.5, 0.5, 0.5)), device=device).view(1, 3, 1, 1)
        size = getattr(model.visual, "image_size", 64)
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self._classes: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode_images(self, images: np.ndarray | torch.Tensor, batch: int = 512) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> L2-normalised image embeddings [N, D]."""
        images = torch.as_tensor(images)
        out = []
        for start in range(0, len(images), batch):
            x = images[start : start + batch].to(self.device).permute(0, 3, 1, 2).float() / 255.0
            if tuple(x.shape[-2:]) != self.size:
                x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
            x = (x - self.mean) / self.std
            out.append(F.normalize(self.model.encode_image(x).float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def encode_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def class_embeddings(self, attr: str) -> torch.Tensor:
        """One normalised text embedding per value of ``attr`` (prompt-ensemble mean)."""
        if attr not in self._classes:
            rows = []
            for value in _vocab(attr):
                emb = self.encode_texts(ensemble_prompts(attr, value, self.n_prompts, self.seed))
                rows.append(F.normalize(emb.mean(0), dim=-1))
            self._classes[attr] = torch.stack(rows)
        return self._classes[attr]

    def classify(
        self, images: np.ndarray | torch.Tensor, attrs: Sequence[str] = ("shape", "colour", "background")
    ) -> dict[str, np.ndarray]:
        """Predicted class index per image for each attribute (indices into the world vocab)."""
        feats = self.encode_images(images)
        return {a: (feats @ self.class_embeddings(a).T).argmax(1).cpu().numpy() for a in attrs}

    def predict_names(
        self, images: np.ndarray | torch.Tensor, attrs: Sequence[str] = ("shape", "colour", "background")
    ) -> dict[str, list[str]]:
        pred = self.classify(images, attrs)
        return {a: [_vocab(a)[i] for i in idx] for a, idx in pred.items()}

    def clip_score(self, images: np.ndarray | torch.Tensor, prompts: Sequence[str]) -> np.ndarray:
        """CLIP score per (image, prompt) pair: 100 * max(cosine, 0), as in the CLIPScore paper."""
        sim = (self.encode_images(images) * self.encode_texts(prompts)).sum(-1)
        return (100.0 * sim.clamp(min=0)).cpu().numpy()


def zero_shot_accuracy(
    scorer: WorldClipScorer, images: np.ndarray, labels: dict[str, np.ndarray], attrs: Sequence[str]
) -> dict[str, float]:
    """Fraction of images whose predicted class equals the label, per attribute."""
    pred = scorer.classify(images, attrs)
    return {a: round(float((pred[a] == labels[a]).mean()), 4) for a in attrs}
