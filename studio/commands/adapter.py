"""`studio adapter inspect FILE` and `studio adapter convert IN OUT --to FORMAT`."""

from __future__ import annotations

import argparse
import json


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def inspect(args: argparse.Namespace) -> int:
    from adapters.formats import read_adapter_info

    info = read_adapter_info(args.file)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2, sort_keys=True, default=str))
        return 0
    print(f"file:        {info.path}")
    print(f"format:      {info.format}")
    print(f"method:      {info.method}")
    print(f"rank:        {info.rank if info.rank is not None else '-'}")
    print(f"alpha:       {info.alpha if info.alpha is not None else '-'}")
    print(f"base model:  {info.base_model_id or '(not recorded)'}")
    print(f"parameters:  {info.n_params:,}")
    print(f"size:        {_size(info.size_bytes)}")
    shown = info.targets if args.all else info.targets[:12]
    print(f"targets:     {len(info.targets)} modules")
    for name in shown:
        print(f"  {name}")
    if len(shown) < len(info.targets):
        print(f"  ... {len(info.targets) - len(shown)} more (--all lists them)")
    if info.metadata:
        print("metadata:")
        for key, value in sorted(info.metadata.items()):
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            print(f"  {key}: {text if len(text) <= 100 else text[:97] + '...'}")
    return 0


def convert(args: argparse.Namespace) -> int:
    from adapters.formats import convert as convert_file

    out = convert_file(args.src, args.dst, to=args.to, base_model=args.base_model)
    print(f"wrote {args.to} adapter: {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapter", help="inspect and convert adapter files")
    commands = p.add_subparsers(dest="adapter_command", metavar="ACTION", required=True)

    q = commands.add_parser("inspect", help="method, rank, alpha, targets, base model, size, metadata")
    q.add_argument("file", help="adapter file (.safetensors) or folder")
    q.add_argument("--json", action="store_true", help="print the info as JSON")
    q.add_argument("--all", action="store_true", help="list every target module")
    q.set_defaults(func=inspect)

    c = commands.add_parser("convert", help="convert between studio, diffusers and kohya formats")
    c.add_argument("src", help="adapter file or folder to read")
    c.add_argument("dst", help="output: a folder (studio), a .safetensors file (kohya, diffusers)")
    c.add_argument("--to", required=True, choices=["studio", "diffusers", "kohya"], help="output format")
    c.add_argument(
        "--base-model",
        default=None,
        help="diffusers folder or built-in base model name; needed for kohya files the studio did not write",
    )
    c.set_defaults(func=convert)
