"""Train an adapter: ``accelerate launch studio/train.py --pipeline lora --config configs/lora.toml``.

Also ``python studio/train.py ...`` (one process) and ``studio train ...`` (same arguments).
Arguments: ``--config FILE.toml`` plus ``--key value`` overrides of any TrainConfig field
and ``--pipeline_options.NAME VALUE`` for the pipeline's own options.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script: import the studio package, not the modules next to this file.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _here]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.config import TrainConfig, config_from_args  # noqa: E402


def build_task(config: TrainConfig):
    """The pipeline's Task for ``config`` (its factory gets ``pipeline_options``)."""
    from pipelines import get_pipeline

    return get_pipeline(config.pipeline)(dict(config.pipeline_options))


def run(argv: list[str], prog: str = "studio train") -> int:
    """Parse ``argv``, train, print a summary; errors propagate as exceptions."""
    from studio.loop import train

    if any(a in ("-h", "--help") for a in argv):
        from studio.config import build_parser

        build_parser(prog).print_help()
        return 0
    config = config_from_args(argv, prog)
    result = train(build_task(config), config)
    if result.adapter_dir is not None:
        first = f"{result.losses[0]:.4f}" if result.losses else "-"
        last = f"{result.losses[-1]:.4f}" if result.losses else "-"
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items())
        state = "stopped" if result.stopped else "done"
        print(
            f"{state}: {config.pipeline} step {result.step}/{config.max_steps} (from {result.start_step}), "
            f"loss {first} -> {last}; {metrics}; adapter: {result.adapter_dir}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return run(argv, prog="train.py")
    except Exception as err:  # noqa: BLE001 - one line for the user, --debug for the traceback
        if debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"train.py: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
