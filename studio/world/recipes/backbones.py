"""The world's two small vision backbones (timm), saved as timm ``local-dir`` folders.

* ``vit-tiny-world``: a timm VisionTransformer trained supervised on four attribute labels of the
  captioned shapes (shape, colour, background, style; one linear head with a group per attribute).
* ``dinov2-tiny-world``: timm's DINOv2 architecture (``vit_small_patch14_reg4_dinov2`` with 4
  register tokens and LayerScale) at a small width, trained self-supervised with a contrastive
  (InfoNCE, SimCLR-style) objective on two augmented views; it never sees a label.

Both are judged by frozen-feature linear probes on held-out world tasks (size and position were
never trained on) and on scikit-learn's digits.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from studio.world.recipes.common import (
    ATTRIBUTES,
    BuildContext,
    StepBudget,
    WorldData,
    batches,
    digits_images,
    folder_size_mb,
    linear_probe,
    table,
    to_float,
    vocab,
    write_card,
)

# Attributes the supervised ViT learns; size and quadrant stay held out for the probes.
SUPERVISED_ATTRS = ("shape", "colour", "background", "style")
SMALL_VIT = dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3)


@dataclass
class BackboneConfig:
    """One backbone recipe."""

    name: str  # asset folder name
    arch: str  # timm architecture the folder's config.json names
    objective: str  # "supervised" (attribute labels) or "contrastive" (InfoNCE on two views)
    model_args: dict = field(default_factory=lambda: dict(SMALL_VIT))  # timm kwargs over the arch
    steps: int = 3000  # optimizer steps (unless max_seconds comes first)
    batch: int = 512  # images per step (contrastive: two views each)
    lr: float = 1e-3  # AdamW peak learning rate (cosine decay after warmup)
    weight_decay: float = 0.05  # AdamW weight decay
    warmup: int = 150  # linear warmup steps
    max_seconds: float = 60.0  # wall-clock cap for the training loop
    temperature: float = 0.2  # InfoNCE temperature (contrastive)
    proj_dim: int = 128  # projection-head output (contrastive; dropped after training)


VIT = BackboneConfig("vit-tiny-world", "vit_tiny_patch16_224", "supervised", steps=3000, max_seconds=45)
DINOV2 = BackboneConfig(
    "dinov2-tiny-world", "vit_small_patch14_reg4_dinov2", "contrastive", steps=4000, max_seconds=55
)


def smoke(cfg: BackboneConfig) -> BackboneConfig:
    """A few steps of the same recipe (CPU check)."""
    return replace(cfg, steps=3, batch=16, warmup=1, max_seconds=60)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop + flip + brightness/contrast + noise, batched on the device.

    Hue is never changed: colour is a property the features should keep.
    """
    b, dev = x.shape[0], x.device

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=gen, device=dev) * (hi - lo) + lo

    area, log_ratio = u(0.35, 1.0), u(np.log(3 / 4), np.log(4 / 3))
    sw = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    sh = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    flip = torch.where(u(0, 1) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 1, 1] = sw * flip, sh
    theta[:, 0, 2], theta[:, 1, 2] = (1 - sw) * u(-1, 1), (1 - sh) * u(-1, 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * u(0.7, 1.3)[:, None, None, None] + mean + u(-0.2, 0.2)[:, None, None, None]
    noisy = (u(0, 1) < 0.3).float()[:, None, None, None]
    out = out + noisy * 0.08 * torch.randn(out.shape, generator=gen, device=dev)
    return out.clamp(-1, 1)


def create(cfg: BackboneConfig) -> nn.Module:
    import timm

    num_classes = sum(len(vocab(a)) for a in SUPERVISED_ATTRS) if cfg.objective == "supervised" else 0
    return timm.create_model(cfg.arch, pretrained=False, num_classes=num_classes, **cfg.model_args)


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pre-logits feature timm's head would see (class token after the final norm)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def supervised_loss(logits: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
    loss, offset = logits.new_zeros(()), 0
    for attr in SUPERVISED_ATTRS:
        k = len(vocab(attr))
        loss = loss + F.cross_entropy(logits[:, offset : offset + k].float(), labels[attr])
        offset += k
    return loss


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    z1, z2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    logits = z1 @ z2.T / temperature
    target = torch.arange(len(z1), device=z1.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def train(cfg: BackboneConfig, data: WorldData, ctx: BuildContext) -> tuple[nn.Module, dict[str, Any]]:
    """Train one backbone; returns the model (eval mode, fp32) and training facts."""
    torch.manual_seed(ctx.seed)
    dev = ctx.device
    model = create(cfg).to(dev)
    head = None
    if cfg.objective == "contrastive":
        width = model.num_features
        head = nn.Sequential(nn.Linear(width, 512), nn.GELU(), nn.Linear(512, cfg.proj_dim)).to(dev)
    params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=dev.startswith("cuda"))
    images = torch.from_numpy(data.images).to(dev)
    labels = {a: torch.from_numpy(data.labels[a]).to(dev) for a in SUPERVISED_ATTRS}
    gen = ctx.generator(11 if cfg.objective == "supervised" else 12)
    budget = StepBudget(cfg.steps, cfg.max_seconds)
    index_iter = batches(len(data), cfg.batch, cfg.steps, gen, dev)
    model.train()
    loss_value = float("nan")
    for step in budget:
        idx = next(index_iter)
        for group in opt.param_groups:
            group["lr"] = budget.lr(step, cfg.warmup, cfg.lr)
        x = to_float(images[idx])
        with ctx.autocast():
            if cfg.objective == "supervised":
                loss = supervised_loss(model(x), {a: v[idx] for a, v in labels.items()})
            else:
                views = torch.cat([augment(x, gen), augment(x, gen)])
                z = head(pooled_features(model, views))
                loss = info_nce(z[: len(x)], z[len(x) :], cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == cfg.steps - 1:
            loss_value = float(loss.detach())
            ctx.say(f"{cfg.name} step {step} loss {loss_value:.4f}")
    loss_value = float(loss.detach())
    model.eval()
    facts = {"steps": budget.done, "train_seconds": budget.seconds, "final_loss": round(loss_value, 4)}
    facts["stopped_early"] = budget.stopped_early
    return model, facts


@torch.no_grad()
def extract(model: nn.Module, images: np.ndarray, device: str, batch: int = 1024) -> np.ndarray:
    """Frozen pooled features of uint8 images [N, H, W, 3]."""
    out = []
    for start in range(0, len(images), batch):
        x = to_float(torch.from_numpy(images[start : start + batch]).to(device))
        out.append(pooled_features(model, x).float().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def head_accuracy(model: nn.Module, data: WorldData, device: str) -> dict[str, float]:
    """The supervised ViT's own head on held-out images, per attribute."""
    logits, offset, acc = [], 0, {}
    for start in range(0, len(data), 1024):
        x = to_float(torch.from_numpy(data.images[start : start + 1024]).to(device))
        logits.append(model(x).float().cpu())
    logits_all = torch.cat(logits)
    for attr in SUPERVISED_ATTRS:
        k = len(vocab(attr))
        pred = logits_all[:, offset : offset + k].argmax(1).numpy()
        acc[attr] = round(float((pred == data.labels[attr]).mean()), 4)
        offset += k
    return acc


def probe_report(
    model: nn.Module,
    probe_train: WorldData,
    probe_test: WorldData,
    device: str,
    seed: int,
    max_digits: int = 0,
) -> dict[str, dict[str, float]]:
    """Linear-probe accuracy per world attribute and on digits, with chance levels."""
    ftr, fte = extract(model, probe_train.images, device), extract(model, probe_test.images, device)
    report = {}
    for attr in ATTRIBUTES:
        ytr, yte = probe_train.labels[attr], probe_test.labels[attr]
        if len(np.unique(ytr)) < 2:
            continue
        chance = float(np.bincount(yte).max() / len(yte))
        report[attr] = {"probe": round(linear_probe(ftr, ytr, fte, yte, seed), 4), "chance": round(chance, 4)}
    dimg, dlab = digits_images(int(model.pretrained_cfg["input_size"][-1]))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(dlab))[: max_digits or None]
    half = len(order) // 2
    fd = extract(model, dimg, device)
    acc = linear_probe(fd[order[:half]], dlab[order[:half]], fd[order[half:]], dlab[order[half:]], seed)
    report["digits"] = {
        "probe": round(acc, 4),
        "chance": round(float(np.bincount(dlab).max() / len(dlab)), 4),
    }
    return report


def save(model: nn.Module, cfg: BackboneConfig, folder: Path) -> None:
    """timm's own ``save_for_hf``: config.json (architecture, model_args, pretrained_cfg) + safetensors."""
    from timm.models import save_for_hf

    label_names = [f"{a}={v}" for a in SUPERVISED_ATTRS for v in vocab(a)] if model.num_classes else None
    model.pretrained_cfg = {**model.pretrained_cfg, "tag": "world", "license": None, "hf_hub_id": None}
    model_config = {
        "pretrained_cfg": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear"}
    }
    if label_names:
        model_config["label_names"] = label_names
    save_for_hf(model.half(), str(folder), model_config=model_config, safe_serialization=True)
    model.float()


def build(
    cfg: BackboneConfig, data: WorldData, probe_train: WorldData, probe_test: WorldData, ctx: BuildContext
) -> dict[str, Any]:
    """Train, save, reload through timm's local-dir loader, measure, write the card."""
    import timm

    if ctx.smoke:
        cfg = smoke(cfg)
    steps, cap = ctx.step_plan(cfg.name, cfg.steps, cfg.max_seconds)
    cfg = replace(cfg, steps=steps, max_seconds=cap)
    model, facts = train(cfg, data, ctx)
    folder = ctx.out / cfg.name
    save(model, cfg, folder)
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).to(ctx.device).eval()
    metrics: dict[str, Any] = {
        "train": facts,
        "params_m": round(sum(p.numel() for p in loaded.parameters()) / 1e6, 3),
    }
    metrics["probes"] = probe_report(
        loaded, probe_train, probe_test, ctx.device, ctx.seed, max_digits=300 if ctx.smoke else 0
    )
    if cfg.objective == "supervised":
        metrics["head_accuracy"] = head_accuracy(loaded, probe_test, ctx.device)
    metrics["size_mb"] = folder_size_mb(folder)
    write_backbone_card(cfg, folder, metrics, len(data), len(probe_train), len(probe_test), ctx)
    metrics["size_mb"] = folder_size_mb(folder)
    ctx.say(f"{cfg.name}: probes {metrics['probes']}")
    return metrics


def write_backbone_card(
    cfg: BackboneConfig, folder: Path, m: dict, n_train: int, n_probe: int, n_test: int, ctx: BuildContext
) -> None:
    rows = [
        [
            a,
            f"{v['probe']:.3f}",
            f"{v['chance']:.3f}",
            "yes" if a in SUPERVISED_ATTRS and cfg.objective == "supervised" else "no",
        ]
        for a, v in m["probes"].items()
    ]
    if cfg.objective == "supervised":
        objective = (
            "Supervised: one linear head with a softmax group per attribute "
            f"({', '.join(SUPERVISED_ATTRS)}); loss = sum of the cross-entropies."
        )
    else:
        objective = (
            "Self-supervised, contrastive (InfoNCE, SimCLR-style, temperature "
            f"{cfg.temperature}): two augmented views per image (random resized crop 0.35-1, flip, "
            "brightness/contrast, noise; hue never changes), a 2-layer projection head "
            f"(dropped after training) to {cfg.proj_dim} dims. No label is used."
        )
    args = ", ".join(f"{k}={v}" for k, v in cfg.model_args.items())
    sections = {
        "Load": f'```python\nimport timm\nmodel = timm.create_model("local-dir:assets/{cfg.name}", pretrained=True)\n'
        "# or: from studio.world.assets import "
        + (
            "load_vit; model = load_vit()"
            if cfg.objective == "supervised"
            else "load_dinov2; model = load_dinov2()"
        )
        + "\n```\nInput: 64x64 RGB, normalised with mean 0.5, std 0.5 (see `pretrained_cfg`).",
        "Recipe": f"timm `{cfg.arch}` with {args}; {m['params_m']}M parameters, weights stored in fp16 "
        f"({m['size_mb']} MB).\n\n{objective}\n\nAdamW lr {cfg.lr} (cosine, {cfg.warmup} warmup steps), "
        f"weight decay {cfg.weight_decay}, batch {cfg.batch}, {m['train']['steps']} steps "
        f"({m['train']['train_seconds']} s, bf16 autocast), seed {ctx.seed}. "
        "Rebuild: `studio world build --only " + cfg.name + "`.",
        "Data": f"{n_train} captioned world images (`studio.world.shapes.make_captioned`, 64x64) for "
        f"training; probes fit on {n_probe} and test on {n_test} further images from other seeds.",
        "Measured quality": "Frozen pooled features (class token), logistic-regression probe "
        "(standardised features). `trained on` says whether the backbone saw that label.\n\n"
        + table(rows, ["task", "probe accuracy", "chance (majority)", "trained on"])
        + (
            "\n\nOwn head on the held-out images: "
            + ", ".join(f"{k} {v:.3f}" for k, v in m.get("head_accuracy", {}).items())
            if "head_accuracy" in m
            else ""
        ),
    }
    sections["Limits"] = backbone_limits(cfg, m)
    title = "vit-tiny-world" if cfg.objective == "supervised" else "dinov2-tiny-world"
    summary = f"A small timm backbone trained from scratch on the studio's tiny world ({'supervised ViT' if cfg.objective == 'supervised' else 'DINOv2 architecture, self-supervised'})."
    write_card(folder, title, summary, sections, m)


def backbone_limits(cfg: BackboneConfig, m: dict) -> str:
    """What the measurements say the features lack (probe within 0.1 of chance), and why."""
    weak = [
        f"{a} ({v['probe']:.3f} vs chance {v['chance']:.3f})"
        for a, v in m["probes"].items()
        if v["probe"] - v["chance"] < 0.1
    ]
    lines = []
    if m["train"].get("stopped_early"):
        lines.append(
            f"- Training stopped at the {cfg.max_seconds:.0f} s cap after {m['train']['steps']} of {cfg.steps} steps."
        )
    if weak:
        lines.append("- Little linear information about: " + ", ".join(weak) + ".")
    if any(w.startswith("quadrant") for w in weak):
        lines.append(
            "- Position: the pooled class token is nearly position-invariant; use patch tokens for where."
        )
    if cfg.objective == "contrastive" and any(w.startswith("shape") for w in weak):
        lines.append(
            "- Shape: two views of one image can be matched by colour, background and style alone, so the "
            "contrastive objective barely needs the shape. Known fixes for a rebuild: colour-jittered or "
            "grey views, or a DINO/iBOT self-distillation objective."
        )
    return "\n".join(lines) or "- None measured."
