"""`studio methods`: list registered adapter methods and training pipelines."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from adapters.base import methods

    print("adapter methods:")
    for name, entry in sorted(methods().items()):
        layers = ", ".join(cls.__name__ for cls in entry.layers)
        print(f"  {name:<12} {entry.doc}  [{layers}]")
    try:
        from pipelines import pipelines
    except ImportError:
        return 0
    print("training pipelines:")
    for name, doc in sorted(pipelines().items()):
        print(f"  {name:<12} {doc}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list adapter methods and training pipelines")
    p.set_defaults(func=run)
