"""EndoARSS in miniature: single-task LoRA x2 vs one shared LoRA vs TESLA, with/without the attention block.

    python bench/repro_endoarss.py --workers 3  # full: one GPU, 3 processes (~5 min, tiny world DINOv2)
    python bench/repro_endoarss.py --quick      # CPU smoke version (tiny random backbone)

Datasets: the world's tool scenes (activity + tool mask) and digits (class + stroke mask).
Reports activity accuracy, mIoU, trainable share (the two single-task models together
count twice) and the cosine between the two task gradients on the shared parameters at
the end of training (PCGrad balancing for the joint models).  Runs use the shared loop.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from pipelines.vision_common import train_once
from studio.run_memo import RunMemo, add_worker_args, memo_for_workers

FULL = dict(datasets=["scenes", "digits"], seeds=[0, 1, 2], steps=400, tiny=False, sma=[True, False])
QUICK = dict(datasets=["scenes"], seeds=[0], steps=3, tiny=True, sma=[True])
VARIANTS = ("single x2", "shared LoRA", "TESLA")
#: Finished runs of this invocation's output folder (set by main).
MEMO: RunMemo


def _train(opts: dict, seed: int, steps: int) -> dict:
    train = dict(
        max_steps=steps,
        batch_size=64,
        lr=1e-3,
        weight_decay=0.01,
        warmup_steps=max(1, steps // 15),
        lr_schedule="cosine",
        seed=seed,
    )
    opts = dict(opts, data_seed=seed)
    return MEMO({**opts, **train}, lambda: train_once("endoarss", opts, **train))


def run_variant(variant: str, opts: dict, seed: int, steps: int) -> dict:
    if variant == "single x2":
        cls = _train(dict(opts, mode="single", tasks=["cls"]), seed, steps)
        seg = _train(dict(opts, mode="single", tasks=["seg"]), seed, steps)
        return dict(
            accuracy=cls["accuracy"],
            miou=seg["miou"],
            share=cls["trainable_share"] + seg["trainable_share"],
            cosine=math.nan,
            backbone=cls["backbone"],
        )
    m = _train(dict(opts, mode="shared" if variant == "shared LoRA" else "tesla"), seed, steps)
    return dict(
        accuracy=m["accuracy"],
        miou=m["miou"],
        share=m["trainable_share"],
        cosine=m["grad_cosine"],
        backbone=m["backbone"],
    )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU version (tests)")
    p.add_argument("--backbone-source", default="auto", choices=["auto", "world", "random"])
    p.add_argument("--out", default="bench/out/endoarss")
    add_worker_args(p)
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    global MEMO
    child = ["--out", args.out, "--backbone-source", args.backbone_source] + (
        ["--quick"] if args.quick else []
    )
    MEMO, seeds = memo_for_workers(args, Path(args.out), plan["seeds"], __file__, child)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    common = dict(
        backbone_source=args.backbone_source,
        tiny=plan["tiny"],
        image_size=32 if args.quick else 64,
        balance="pcgrad",
    )
    if args.quick:
        common.update(n_total=96, n_test=32)
    rows = []
    for dataset in plan["datasets"]:
        for sma in plan["sma"]:
            for variant in VARIANTS:
                opts = dict(common, dataset=dataset, sma=sma)
                ms = [run_variant(variant, opts, s, plan["steps"]) for s in seeds]
                if args.worker is not None:
                    continue
                row = dict(dataset=dataset, sma=sma, variant=variant, backbone=ms[0]["backbone"])
                row.update(
                    {k: [m[k] for m in ms] for k in ("accuracy", "miou", "cosine")}, share=ms[0]["share"]
                )
                print(
                    f"  {dataset} sma={sma} {variant}: acc={row['accuracy']} miou={row['miou']}", flush=True
                )
                rows.append(row)
    if args.worker is not None:
        return rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"plan": plan, "rows": rows}, indent=1))
    print(f"\nbackbone {rows[0]['backbone']}, seeds {plan['seeds']}, {plan['steps']} steps, PCGrad\n")
    print(
        "| dataset | attention block | variant | accuracy | mIoU | trainable share | grad cosine (shared) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cos = "-" if math.isnan(r["cosine"][0]) else _ms(r["cosine"])
        sma = "yes" if r["sma"] else "no"
        print(
            f"| {r['dataset']} | {sma} | {r['variant']} | {_ms(r['accuracy'])} | {_ms(r['miou'])} "
            f"| {r['share']:.2%} | {cos} |"
        )
    return rows


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


if __name__ == "__main__":
    main()
