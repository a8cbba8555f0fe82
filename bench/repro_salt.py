"""SALT in miniature: few-shot adaptation of a ViT segmenter to a shifted domain.

    python bench/repro_salt.py --workers 3  # full: one GPU, 3 processes (tiny world ViT)
    python bench/repro_salt.py --quick      # CPU smoke version (tiny random backbone)

The segmenter (backbone + light decoder, decoder trained on the source domain) is adapted
with n target images (20..1000) by SALT, LoRA at a matched parameter count, SVD-only
scaling (scale + shift of every singular value), and the decoder alone.  Dice and HD95 on
held-out target images, trainable share, 3 seeds.  Every run goes through the shared loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from adapters.salt import SaltSpec, parameter_count
from pipelines.vision_common import train_once
from studio.run_memo import add_worker_args, memo_for_workers

FULL = dict(sizes=[20, 100, 300, 1000], seeds=[0, 1, 2], steps=300, tiny=False, n_test=300)
QUICK = dict(sizes=[20], seeds=[0], steps=10, tiny=True, n_test=24)
TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def matched_lora_rank(backbone: torch.nn.Module, spec: SaltSpec) -> tuple[int, int]:
    """(LoRA rank whose parameter count is closest to SALT's, SALT's count) over the targets."""
    salt, per_rank = 0, 0
    for block in backbone.blocks:
        for t in TARGETS:
            lin = block.get_submodule(t)
            salt += parameter_count(lin.out_features, lin.in_features, spec)
            per_rank += lin.in_features + lin.out_features
    return max(1, round(salt / per_rank)), salt


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU version (tests)")
    p.add_argument("--backbone-source", default="auto", choices=["auto", "world", "random"])
    p.add_argument("--rank-ratio", type=float, default=0.5)
    p.add_argument("--salt-lora-rank", type=int, default=4)
    p.add_argument("--out", default="bench/out/salt")
    add_worker_args(p)
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    from pipelines.vision_common import build_backbone

    backbone, _ = build_backbone("vit", args.backbone_source, 32, plan["tiny"])
    spec = SaltSpec(rank_ratio=args.rank_ratio, lora_rank=args.salt_lora_rank)
    lora_rank, salt_params = matched_lora_rank(backbone, spec)
    print(f"SALT adds {salt_params} backbone parameters; matched LoRA rank {lora_rank}", flush=True)
    common = dict(
        backbone="vit",
        backbone_source=args.backbone_source,
        tiny=plan["tiny"],
        targets=TARGETS,
        rank_ratio=args.rank_ratio,
        salt_lora_rank=args.salt_lora_rank,
        lora_rank=lora_rank,
        n_test=plan["n_test"],
        image_size=32 if args.quick else 64,
    )
    if args.quick:
        common.update(n_source=64, source_steps=5)
    child = [
        "--out",
        args.out,
        "--backbone-source",
        args.backbone_source,
        "--rank-ratio",
        str(args.rank_ratio),
    ]
    child += ["--salt-lora-rank", str(args.salt_lora_rank)] + (["--quick"] if args.quick else [])
    memo, seeds = memo_for_workers(args, Path(args.out), plan["seeds"], __file__, child)
    rows = []
    for n in plan["sizes"]:
        for mode in ("salt", "lora", "svd", "decoder"):
            ms = []
            for seed in seeds:
                train = dict(
                    max_steps=plan["steps"],
                    batch_size=32,
                    lr=1e-3,
                    weight_decay=0.01,
                    warmup_steps=max(1, plan["steps"] // 15),
                    lr_schedule="cosine",
                    seed=seed,
                )
                opts = dict(common, mode=mode, n_train=n, data_seed=seed)
                m = memo({**opts, **train}, lambda o=opts, t=train: train_once("salt", o, **t))
                print(f"  n={n} {mode} seed={seed}: dice={m['dice']:.3f} hd95={m['hd95']:.2f}", flush=True)
                ms.append(m)
            if args.worker is not None:  # a worker only runs its seeds; the parent builds the table
                continue
            rows.append(
                dict(
                    n=n,
                    mode=mode,
                    dice=[m["dice"] for m in ms],
                    hd95=[m["hd95"] for m in ms],
                    trainable=ms[0]["trainable"],
                    share=ms[0]["trainable_share"],
                    backbone=ms[0]["backbone"],
                )
            )
    if args.worker is not None:
        return {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"plan": plan, "rows": rows, "lora_rank": lora_rank}, indent=1)
    )
    print(f"\nbackbone {rows[0]['backbone']}, seeds {plan['seeds']}, {plan['steps']} steps\n")
    print("| target images | method | Dice | HD95 (px) | trainable | share |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']} | {r['mode']} | {_ms(r['dice'])} | {_ms(r['hd95'], 2)} | {int(r['trainable'])} | {r['share']:.2%} |"
        )
    return {"rows": rows, "lora_rank": lora_rank}


def _ms(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


if __name__ == "__main__":
    main()
