"""`studio train`: run a training pipeline through the shared loop (same arguments as studio/train.py)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from studio.train import run as run_training

    argv = list(args.train_args)
    if "--debug" in argv:  # `studio train ... --debug` works like `studio --debug train ...`
        args.debug = True
        argv = [a for a in argv if a != "--debug"]
    return run_training(argv, prog="studio train")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train an adapter (--pipeline NAME --config FILE.toml --key value ...)",
        add_help=False,
        prefix_chars="\0",  # every argument goes to the training parser untouched
    )
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)
