"""The world's small CLIP, trained with open_clip, and its text tower exported to transformers.

open_clip trains and loads it (``open_clip.create_model_and_transforms("local-dir:PATH")``,
bundled BPE tokenizer, context 32). The diffusion model needs the same text tower as a
transformers ``CLIPTextModel`` + ``CLIPTokenizer`` (what diffusers pipelines load), so
:func:`to_transformers` converts it; open_clip's text transformer and transformers'
``CLIPTextModel`` are the same network (pre-LN blocks, exact GELU, causal mask, final LN), so the
conversion only renames and splits tensors (no library offers it as a function, hence by hand).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from studio.world.recipes.common import (
    BuildContext,
    StepBudget,
    WorldData,
    folder_size_mb,
    prompt_variants,
    table,
    to_float,
    write_card,
)

MODEL_NAME = "clip-tiny-world"
CONTEXT_LENGTH = 32
SOT, EOT = 49406, 49407  # open_clip's bundled tokenizer: <start_of_text>, <end_of_text>


def model_cfg() -> dict[str, Any]:
    """open_clip model config (the ``model_cfg`` of open_clip_config.json)."""
    return {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 192, "head_width": 48, "patch_size": 8},
        "text_cfg": {
            "context_length": CONTEXT_LENGTH,
            "vocab_size": 49408,
            "width": 128,
            "heads": 4,
            "layers": 4,
        },
    }


PREPROCESS_CFG = {"size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear"}


@dataclass
class ClipConfig:
    """The CLIP recipe."""

    steps: int = 5000  # optimizer steps (unless max_seconds comes first)
    batch: int = 1024  # image-text pairs per step
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 0.1  # AdamW weight decay (not on gains, biases, embeddings)
    warmup: int = 200  # linear warmup steps
    p_full_caption: float = 0.6  # else one of the short prompts ("a red circle", ...)
    max_seconds: float = 60.0  # wall-clock cap for the training loop


def tokenize_variants(data: WorldData) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [N, V, L] of every prompt variant of every image, and a string id [N, V] per prompt."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(context_length=CONTEXT_LENGTH)
    variants = [prompt_variants(a, c) for a, c in zip(data.attrs, data.captions)]
    unique = sorted({p for v in variants for p in v})
    ids = {p: i for i, p in enumerate(unique)}
    table_tokens = tok(unique)
    prompt_ids = torch.tensor([[ids[p] for p in v] for v in variants])
    return table_tokens[prompt_ids], prompt_ids


def multi_positive_loss(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy where pairs with the same prompt string are all positives.

    The world repeats captions, so the usual one-hot target would push apart true matches.
    """
    logits = scale * F.normalize(img.float(), dim=-1) @ F.normalize(txt.float(), dim=-1).T
    target = (ids[:, None] == ids[None, :]).float()
    target = target / target.sum(1, keepdim=True)
    return 0.5 * (
        torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
        + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean()
    )


def train(cfg: ClipConfig, data: WorldData, ctx: BuildContext) -> tuple[torch.nn.Module, dict[str, Any]]:
    import open_clip

    torch.manual_seed(ctx.seed)
    dev = ctx.device
    mcfg = model_cfg()
    model = open_clip.CLIP(mcfg["embed_dim"], mcfg["vision_cfg"], mcfg["text_cfg"]).to(dev)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=dev.startswith("cuda"),
    )
    tokens, prompt_ids = tokenize_variants(data)
    used_tokens = torch.unique(tokens)
    tokens, prompt_ids = tokens.to(dev), prompt_ids.to(dev)
    images = torch.from_numpy(data.images).to(dev)
    gen = ctx.generator(21)
    budget = StepBudget(cfg.steps, cfg.max_seconds)
    n_var = tokens.shape[1]
    model.train()
    for step in budget:
        idx = torch.randint(0, len(data), (cfg.batch,), generator=gen, device=dev)
        short = torch.randint(1, n_var, (cfg.batch,), generator=gen, device=dev)
        full = torch.rand(cfg.batch, generator=gen, device=dev) < cfg.p_full_caption
        var = torch.where(full, torch.zeros_like(short), short)
        for group in opt.param_groups:
            group["lr"] = budget.lr(step, cfg.warmup, cfg.lr)
        with ctx.autocast():
            img = model.encode_image(to_float(images[idx]))
            txt = model.encode_text(tokens[idx, var])
            loss = multi_positive_loss(img, txt, model.logit_scale.exp(), prompt_ids[idx, var])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        if step % 500 == 0:
            ctx.say(
                f"clip step {step} loss {float(loss.detach()):.4f} scale {float(model.logit_scale.exp()):.1f}"
            )
    model.eval()
    # Token rows that no training prompt uses never received a gradient: zero them so that the
    # weight files say so (and compress); the model's outputs on world prompts do not change.
    with torch.no_grad():
        keep = torch.zeros(model.token_embedding.weight.shape[0], dtype=torch.bool, device=dev)
        keep[used_tokens.to(dev)] = True
        model.token_embedding.weight[~keep] = 0
    facts = {
        "steps": budget.done,
        "train_seconds": budget.seconds,
        "final_loss": round(float(loss.detach()), 4),
    }
    facts.update(stopped_early=budget.stopped_early, tokens_used=int(len(used_tokens)))
    return model, facts


def save(model: torch.nn.Module, folder: Path) -> None:
    """open_clip ``local-dir`` layout: open_clip_config.json + open_clip_model.safetensors (fp16)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg(), "preprocess_cfg": PREPROCESS_CFG}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().half().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))


def hf_tokenizer() -> Any:
    """open_clip's bundled BPE as a transformers ``CLIPTokenizer`` giving the same ids.

    open_clip pads with id 0 ("!"), so the pad token is "!" (as in Stable Diffusion 2's tokenizer).
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    st = SimpleTokenizer(context_length=CONTEXT_LENGTH)
    vocab = dict(st.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = [pair for pair, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=CONTEXT_LENGTH)


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """save_pretrained plus vocab.json/merges.txt, which older transformers' slow tokenizer reads."""
    tokenizer.save_pretrained(str(folder))
    vocab = tokenizer.get_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    tok_json = json.loads((folder / "tokenizer.json").read_text())
    merges = tok_json["model"]["merges"]
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")


def to_transformers(model: torch.nn.Module) -> Any:
    """The open_clip text tower as a transformers ``CLIPTextModel`` with identical outputs."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text = model_cfg()["text_cfg"]
    width = model.token_embedding.weight.shape[1]
    config = CLIPTextConfig(
        vocab_size=model.token_embedding.weight.shape[0],
        hidden_size=width,
        intermediate_size=model.transformer.resblocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(model.transformer.resblocks),
        num_attention_heads=text["heads"],
        max_position_embeddings=model.positional_embedding.shape[0],
        hidden_act="gelu",
        layer_norm_eps=model.ln_final.eps,
        projection_dim=model.text_projection.shape[1],
        bos_token_id=SOT,
        eos_token_id=EOT,
        pad_token_id=0,
    )
    hf = CLIPTextModel(config)
    # transformers 4.x names the weights "text_model.*"; some 5.x releases drop that prefix.
    root = "text_model." if any(k.startswith("text_model.") for k in hf.state_dict()) else ""
    sd: dict[str, torch.Tensor] = {
        root + "embeddings.token_embedding.weight": model.token_embedding.weight,
        root + "embeddings.position_embedding.weight": model.positional_embedding,
        root + "final_layer_norm.weight": model.ln_final.weight,
        root + "final_layer_norm.bias": model.ln_final.bias,
    }
    for i, block in enumerate(model.transformer.resblocks):
        p = f"{root}encoder.layers.{i}."
        q, k, v = block.attn.in_proj_weight.chunk(3)
        qb, kb, vb = block.attn.in_proj_bias.chunk(3)
        sd.update(
            {
                p + "self_attn.q_proj.weight": q, p + "self_attn.q_proj.bias": qb,
                p + "self_attn.k_proj.weight": k, p + "self_attn.k_proj.bias": kb,
                p + "self_attn.v_proj.weight": v, p + "self_attn.v_proj.bias": vb,
                p + "self_attn.out_proj.weight": block.attn.out_proj.weight,
                p + "self_attn.out_proj.bias": block.attn.out_proj.bias,
                p + "layer_norm1.weight": block.ln_1.weight, p + "layer_norm1.bias": block.ln_1.bias,
                p + "layer_norm2.weight": block.ln_2.weight, p + "layer_norm2.bias": block.ln_2.bias,
                p + "mlp.fc1.weight": block.mlp.c_fc.weight, p + "mlp.fc1.bias": block.mlp.c_fc.bias,
                p + "mlp.fc2.weight": block.mlp.c_proj.weight, p + "mlp.fc2.bias": block.mlp.c_proj.bias,
            }
        )  # fmt: skip
    missing, unexpected = hf.load_state_dict(
        {k: v.detach().float().cpu() for k, v in sd.items()}, strict=False
    )
    missing = [m for m in missing if "position_ids" not in m]
    if missing or unexpected:
        raise RuntimeError(f"text tower conversion: missing {missing}, unexpected {unexpected}")
    return hf.eval()


@torch.no_grad()
def open_clip_token_states(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's per-token text features after the final LayerNorm (what diffusion cross-attends to)."""
    x = model.token_embedding(tokens) + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


def evaluate(model: torch.nn.Module, test: WorldData, ctx: BuildContext) -> dict[str, Any]:
    """Zero-shot attribute accuracy on held-out images, with chance levels."""
    from open_clip.tokenizer import SimpleTokenizer

    from studio.world.clip_score import CAPTION_ATTRS, WorldClipScorer, zero_shot_accuracy

    scorer = WorldClipScorer(model, SimpleTokenizer(context_length=CONTEXT_LENGTH), ctx.device, seed=ctx.seed)
    acc = zero_shot_accuracy(scorer, test.images, test.labels, CAPTION_ATTRS)
    chance = {a: round(float(np.bincount(test.labels[a]).max() / len(test)), 4) for a in CAPTION_ATTRS}
    # Retrieval: the true full caption among 100 random ones (chance 1%).
    rng = np.random.default_rng(ctx.seed)
    pick = rng.choice(len(test), size=min(100, len(test)), replace=False)
    img = scorer.encode_images(test.images[pick])
    txt = scorer.encode_texts([test.captions[i] for i in pick])
    r1 = float(((img @ txt.T).argmax(1).cpu().numpy() == np.arange(len(pick))).mean())
    return {"zero_shot": acc, "chance": chance, "caption_retrieval_top1_of_100": round(r1, 4)}


def build(
    data: WorldData, test: WorldData, ctx: BuildContext, cfg: ClipConfig | None = None
) -> tuple[dict, Any]:
    """Train, save, reload through open_clip's local-dir loader, measure, write the card.

    Returns the metrics and the reloaded open_clip model (the diffusion recipe uses both towers).
    """
    import open_clip

    cfg = cfg or ClipConfig()
    if ctx.smoke:
        cfg = replace(cfg, steps=3, batch=16, warmup=1)
    steps, cap = ctx.step_plan(MODEL_NAME, cfg.steps, cfg.max_seconds)
    cfg = replace(cfg, steps=steps, max_seconds=cap)
    model, facts = train(cfg, data, ctx)
    folder = ctx.out / MODEL_NAME
    save(model, folder)
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    loaded = loaded.to(ctx.device).eval()
    metrics = {"train": facts, **evaluate(loaded, test, ctx)}
    metrics["params_m"] = round(sum(p.numel() for p in loaded.parameters()) / 1e6, 3)
    metrics["size_mb"] = folder_size_mb(folder)
    write_clip_card(folder, cfg, metrics, len(data), len(test), ctx)
    ctx.say(f"clip: zero-shot {metrics['zero_shot']}")
    return metrics, loaded


def write_clip_card(
    folder: Path, cfg: ClipConfig, m: dict, n_train: int, n_test: int, ctx: BuildContext
) -> None:
    rows = [[a, f"{m['zero_shot'][a]:.3f}", f"{m['chance'][a]:.3f}"] for a in m["zero_shot"]]
    mc = model_cfg()
    sections = {
        "Load": "```python\nimport open_clip\n"
        f'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:assets/{MODEL_NAME}")\n'
        f'tokenizer = open_clip.get_tokenizer("local-dir:assets/{MODEL_NAME}")  # bundled BPE, context 32\n'
        "# or: from studio.world.assets import load_clip; model, preprocess, tokenizer = load_clip()\n```",
        "Recipe": f"open_clip `CLIP` from this config: `{json.dumps(mc)}`; {m['params_m']}M parameters "
        f"(6.3M of them the 49408-token embedding), stored in fp16 ({m['size_mb']} MB). Token rows that no "
        f"training prompt uses ({49408 - m['train']['tokens_used']} of 49408) are zero: they never got a gradient.\n\n"
        f"Loss: CLIP's symmetric contrastive loss, with every pair sharing the same prompt string counted as a "
        f"positive (the world repeats captions). AdamW lr {cfg.lr} (cosine, {cfg.warmup} warmup), weight decay "
        f"{cfg.weight_decay}, batch {cfg.batch}, {m['train']['steps']} steps ({m['train']['train_seconds']} s, "
        f"bf16 autocast), seed {ctx.seed}. Prompts: the full caption with probability {cfg.p_full_caption}, else "
        'a short form ("a red circle", "a red circle on a blue background", "a small red circle").\n\n'
        f"Rebuild: `studio world build --only {MODEL_NAME}`. The diffusion model's text encoder is this text "
        "tower converted to transformers' `CLIPTextModel` (same outputs).",
        "Data": f"{n_train} captioned world images (64x64) and their captions; tested on {n_test} held-out images.",
        "Measured quality": "Zero-shot classification of held-out images: each class is the mean embedding of "
        "16 world prompts naming it (`studio.world.clip_score.WorldClipScorer`).\n\n"
        + table(rows, ["attribute", "zero-shot accuracy", "chance (majority)"])
        + f"\n\nCaption retrieval (true caption among 100): top-1 {m['caption_retrieval_top1_of_100']:.3f} (chance 0.010).",
    }
    limits = [
        f"- Only the {m['train']['tokens_used']} BPE tokens of the world's prompts were trained; other words map to "
        "zero embeddings, so prompts outside the world's vocabulary mean little to this model."
    ]
    if m["train"].get("stopped_early"):
        limits.insert(
            0,
            f"- Training stopped at the {cfg.max_seconds:.0f} s cap after {m['train']['steps']} of {cfg.steps} steps.",
        )
    sections["Limits"] = "\n".join(limits)
    write_card(
        folder,
        MODEL_NAME,
        "A small CLIP trained from scratch with open_clip on the studio's tiny world.",
        sections,
        m,
    )
