"""AdapterTune in miniature: head-only vs AdapterTune vs full fine-tuning vs LoRA, rank sweep, ablations.

    python bench/repro_adaptertune.py            # full: GPU, ~10 min (tiny world backbones)
    python bench/repro_adaptertune.py --quick    # CPU smoke version (tiny random backbone)

Every run goes through the shared training loop (AdamW, cosine with warm-up, clipping 1).
Prints markdown tables, writes a JSON of every run and the rank "elbow" plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from pipelines.vision_common import train_once
from studio.run_memo import RunMemo

FULL = dict(
    backbones=["vit", "dinov2"],
    datasets=["digits", "scenes"],
    seeds=[0, 1, 2],
    ranks=[1, 2, 4, 8, 16, 32, 64],
    placements=["all", "every2", "first_half", "last_half", "last"],
    steps=300,
    tiny=False,
)
QUICK = dict(
    backbones=["vit"],
    datasets=["digits"],
    seeds=[0],
    ranks=[1, 16],
    placements=["all", "last"],
    steps=15,
    tiny=True,
)
LRS = {"head": 1e-3, "adaptertune": 1e-3, "lora": 1e-3, "full": 1e-3}  # full: backbone at backbone_lr 1e-4


def run(options: dict, seed: int, steps: int, cache: RunMemo) -> dict:
    key = json.dumps({**options, "seed": seed, "steps": steps}, sort_keys=True)
    if key not in cache.data:
        train = dict(
            max_steps=steps,
            batch_size=64,
            lr=LRS[options["mode"]],
            weight_decay=0.05,
            warmup_steps=max(1, steps // 10),
            lr_schedule="cosine",
            max_grad_norm=1.0,
            seed=seed,
        )
        m = cache(
            {**options, "seed": seed, "steps": steps},
            lambda: train_once("adaptertune", {**options, "data_seed": seed}, **train),
        )
        print(
            f"  {key}: acc={m['accuracy']:.3f} share={m['trainable_share']:.4f} ({m['seconds']:.1f}s)",
            flush=True,
        )
    return cache.data[key]


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU version (tests)")
    p.add_argument("--backbone-source", default="auto", choices=["auto", "world", "random"])
    p.add_argument("--out", default="bench/out/adaptertune", help="folder for the JSON and the elbow plot")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    common = dict(
        backbone_source=args.backbone_source, tiny=plan["tiny"], image_size=32 if args.quick else 64
    )
    if args.quick:
        common.update(n_train=128, n_test=64, n_total=256)
    cache = RunMemo(Path(args.out) / "runs.json")
    tables: dict[str, list] = {"main": [], "ranks": [], "placement": [], "init": []}

    # 1. method comparison on every backbone x dataset
    for backbone in plan["backbones"]:
        for dataset in plan["datasets"]:
            for mode in ("head", "adaptertune", "lora", "full"):
                opts = dict(
                    common, backbone=backbone, dataset=dataset, mode=mode, rank=16 if mode != "lora" else 8
                )
                ms = [run(opts, s, plan["steps"], cache) for s in plan["seeds"]]
                tables["main"].append(
                    dict(
                        backbone=ms[0]["backbone"],
                        dataset=dataset,
                        mode=mode,
                        accuracy=[m["accuracy"] for m in ms],
                        share=ms[0]["trainable_share"],
                    )
                )
    # 2. rank sweep, 3. placement, 4. init: first backbone, first dataset
    ref = dict(
        common,
        backbone=plan["backbones"][0],
        dataset=plan["datasets"][0],
        mode="adaptertune",
        placement="all",
        init="zero",
    )
    for rank in plan["ranks"]:
        ms = [run(dict(ref, rank=rank), s, plan["steps"], cache) for s in plan["seeds"]]
        tables["ranks"].append(
            dict(rank=rank, accuracy=[m["accuracy"] for m in ms], share=ms[0]["trainable_share"])
        )
    for placement in plan["placements"]:
        ms = [run(dict(ref, rank=16, placement=placement), s, plan["steps"], cache) for s in plan["seeds"]]
        tables["placement"].append(
            dict(placement=placement, accuracy=[m["accuracy"] for m in ms], share=ms[0]["trainable_share"])
        )
    for init in ("zero", "small"):
        ms = [run(dict(ref, rank=16, init=init), s, plan["steps"], cache) for s in plan["seeds"]]
        tables["init"].append(dict(init=init, accuracy=[m["accuracy"] for m in ms]))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"plan": plan, "tables": tables}, indent=1))
    print_tables(tables, plan)
    plot_elbow(tables["ranks"], out / "adaptertune_elbow.png", ref_backbone=tables["main"][0]["backbone"])
    return tables


def print_tables(tables: dict, plan: dict) -> None:
    print(f"\nseeds {plan['seeds']}, {plan['steps']} steps\n")
    print("| backbone | dataset | method | accuracy | trainable share |\n|---|---|---|---|---|")
    for r in tables["main"]:
        print(
            f"| {r['backbone']} | {r['dataset']} | {r['mode']} | {mean_std(r['accuracy'])} | {r['share']:.2%} |"
        )
    print("\n| rank | accuracy | trainable share |\n|---|---|---|")
    for r in tables["ranks"]:
        print(f"| {r['rank']} | {mean_std(r['accuracy'])} | {r['share']:.2%} |")
    print("\n| placement | accuracy | trainable share |\n|---|---|---|")
    for r in tables["placement"]:
        print(f"| {r['placement']} | {mean_std(r['accuracy'])} | {r['share']:.2%} |")
    print("\n| up-projection init | accuracy |\n|---|---|")
    for r in tables["init"]:
        print(f"| {r['init']} | {mean_std(r['accuracy'])} |")


def plot_elbow(rows: list[dict], path: Path, ref_backbone: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [r["rank"] for r in rows]
    means = [statistics.mean(r["accuracy"]) for r in rows]
    stds = [statistics.stdev(r["accuracy"]) if len(r["accuracy"]) > 1 else 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.errorbar(ranks, means, yerr=stds, marker="o", capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("adapter rank r")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"AdapterTune rank sweep ({ref_backbone})", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"\nelbow plot: {path}")


if __name__ == "__main__":
    main()
