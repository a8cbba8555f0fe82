"""`studio world build | info | compare`: rebuild the tiny world's models, list them, compare two builds."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run_build(args: argparse.Namespace) -> int:
    from studio.world.recipes.build import build

    device = args.device
    if args.smoke and device == "cuda":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    steps_from = Path(args.steps_from) if args.steps_from else None
    if steps_from is not None and not steps_from.is_file():
        raise FileNotFoundError(f"--steps-from {steps_from}: no such file")
    report = build(
        Path(args.out), only=args.only, device=device, seed=args.seed, smoke=args.smoke, steps_from=steps_from
    )
    print(json.dumps({"seconds": report["seconds"], "sizes_mb": report.get("sizes_mb", {})}, indent=2))
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from studio.world.compare import compare_reports
    from studio.world.recipes.common import read_report

    a, b = (read_report(p) for p in (args.a, args.b))
    print(compare_reports(a, b, names=(args.a, args.b)))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from studio.world.assets import ASSET_NAMES, assets_dir
    from studio.world.recipes.common import folder_size_mb

    root = Path(args.out) if args.out else assets_dir()
    print(f"world assets in {root}:")
    total = 0.0
    for name in ASSET_NAMES:
        folder = root / name
        if not folder.is_dir():
            print(f"  {name:<20} missing (studio world build --only {name})")
            continue
        size = folder_size_mb(folder)
        total += size
        metrics = folder / "metrics.json"
        headline = _headline(json.loads(metrics.read_text())) if metrics.exists() else ""
        print(f"  {name:<20} {size:7.2f} MB  {headline}")
    print(f"  {'total':<20} {total:7.2f} MB")
    return 0


def _headline(m: dict) -> str:
    """One line of the card's numbers."""
    if "probes" in m:
        return "probe " + ", ".join(f"{k} {v['probe']:.2f}" for k, v in m["probes"].items())
    if "zero_shot" in m:
        return "zero-shot " + ", ".join(f"{k} {v:.2f}" for k, v in m["zero_shot"].items())
    if "prompt_following" in m:
        f = m["prompt_following"]
        best = f["by_guidance"][str(f["recommended_guidance"])]
        return f"prompt following @cfg {f['recommended_guidance']}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in best.items()
        )
    errors = {k: v for k, v in m.items() if k.endswith("median_rel_err") and "view2" not in k}
    if errors:
        return "median relative error " + ", ".join(
            f"{k.removesuffix('_median_rel_err')} {v:.3f}" for k, v in errors.items()
        )
    return ", ".join(f"{k} {v}" for k, v in m.items() if isinstance(v, (int, float)))[:100]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("world", help="the tiny default world: rebuild or list its models")
    wsub = p.add_subparsers(dest="world_command", metavar="ACTION", required=True)
    b = wsub.add_parser("build", help="rebuild every world model from scratch (one GPU, minutes)")
    b.add_argument(
        "--only",
        default=None,
        help="comma-separated model names (default: all); vision-examples: the Vision tab's trained examples",
    )
    b.add_argument("--out", default="assets", help="assets folder to write (default: assets)")
    b.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    b.add_argument("--seed", type=int, default=0, help="seed for data and training (default: 0)")
    b.add_argument("--smoke", action="store_true", help="a few steps on tiny data: check the recipes run")
    b.add_argument(
        "--steps-from",
        default=None,
        metavar="PATH",
        help="a world_build.json: run exactly its recorded step counts, with no wall-clock caps",
    )
    b.set_defaults(func=run_build)
    c = wsub.add_parser("compare", help="markdown table of two world_build.json reports' metrics, with noise")
    c.add_argument("a", help="first world_build.json (e.g. the shipped assets/world_build.json)")
    c.add_argument("b", help="second world_build.json (e.g. a rebuild's)")
    c.set_defaults(func=run_compare)
    i = wsub.add_parser("info", help="list the shipped world models, their sizes and measured quality")
    i.add_argument("--out", default=None, help="assets folder (default: the shipped one)")
    i.set_defaults(func=run_info)


def main(argv: list[str] | None = None) -> int:
    """``python -m studio.commands.world build ...``: the same command without the other CLI areas."""
    parser = argparse.ArgumentParser(prog="studio")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["world", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
