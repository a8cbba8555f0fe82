"""`studio generate`: one image from a base model and an adapter stack, PNG with parameters."""

from __future__ import annotations

import argparse
from pathlib import Path

from studio.service_types import AdapterUse, GenerationSettings


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by `generate` and `grid`."""
    p.add_argument(
        "--model",
        default=None,
        help="base model name (tiny-world, tiny-sd) or a diffusers folder (default: tiny-world where its "
        "assets are installed, else tiny-sd, as the app lists them)",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="PATH[:STRENGTH]",
        help="adapter file/folder (or example-attn / example-conv); repeat to stack",
    )
    p.add_argument("--prompt", default="a red circle")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--size", type=int, default=32, help="width = height in pixels")
    p.add_argument("--precision", choices=["fp", "4bit"], default="fp")
    p.add_argument("--fuse", action="store_true", help="fold the adapters into the weights for this run")
    p.add_argument("--schedule", default="", help="per-timestep keyframes for every adapter, e.g. '0:1, 1:0'")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def _split_strength(arg: str) -> tuple[str, float]:
    head, sep, tail = arg.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return arg, 1.0


def build(args: argparse.Namespace):
    """(service, settings) from the shared options; loads the model and the adapters."""
    from studio.service import StudioService
    from studio.service_models import EXAMPLE_LORAS

    model = args.model
    model_dirs: list[Path] = []
    if model is not None and Path(model).is_dir():
        model_dirs, model = [Path(model).resolve().parent], Path(model).resolve().name
    adapter_args = [_split_strength(a) for a in args.adapter]
    adapter_dirs = sorted({str(Path(p).resolve().parent) for p, _ in adapter_args if Path(p).exists()})
    service = StudioService(model_dirs=model_dirs, adapter_dirs=adapter_dirs, device=args.device)
    model = model or service.default_base_model()
    stack = []
    for path, strength in adapter_args:
        if not Path(path).exists() and path in EXAMPLE_LORAS:
            service.add_example_adapters(model)
            name = path
        elif Path(path).exists():
            name = service.load_adapter(str(Path(path).resolve()), base_model=model).name
        else:
            raise FileNotFoundError(f"no such adapter file: {path}")
        stack.append(AdapterUse(name, strength, schedule=args.schedule))
    settings = GenerationSettings(
        base_model=model,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        width=args.size,
        height=args.size,
        adapters=stack,
        precision=args.precision,
        fuse=args.fuse,
    )
    return service, settings


def run(args: argparse.Namespace) -> int:
    from studio.grid import save_png

    service, settings = build(args)
    result = service.generate(settings)
    path = save_png(result.image, args.out, result.parameters)
    print(f"wrote {path} ({result.seconds:.2f} s)")
    print(result.parameters)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate one image with an adapter stack")
    add_model_arguments(p)
    p.add_argument("--out", default="studio.png", help="output PNG (keeps the parameters text chunk)")
    p.set_defaults(func=run)
