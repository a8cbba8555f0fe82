"""The ``studio`` command line.

Each area of the studio owns its sub-commands in a module of its own that defines
``register(subparsers)``; this file only lists those modules and turns errors into a
one-line message and a non-zero exit (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

# Modules that add sub-commands.  A module that is absent (an area not built yet) is
# skipped; one that fails to import for any other reason is an error.
COMMAND_MODULES = [
    "studio.commands.methods",
    "studio.commands.adapter",
    "studio.commands.train",
    "studio.commands.world",
    "studio.commands.quantize",
    "studio.commands.generate",
    "studio.commands.grid",
    "studio.commands.ui",
    "studio.commands.bench",
]


class StudioError(Exception):
    """An error whose message is meant for the user as it is."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description="Adapter Studio: low-rank adapters")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
        return int(result or 0)
    except KeyboardInterrupt:
        print("studio: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI turns every error into one line
        if args.debug:
            traceback.print_exc()
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"studio: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
