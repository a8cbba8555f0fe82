"""Training configuration: the ``TrainConfig`` dataclass, TOML files and ``--key value`` overrides.

A run's configuration is, in order of precedence: command-line overrides, the TOML file
given with ``--config``, the dataclass defaults.  The TOML file holds ``TrainConfig``
fields at the top level and the pipeline's own options in a ``[pipeline_options]`` table;
on the command line the same options are ``--pipeline_options.rank 4``.  Values on the
command line are read as TOML literals (``4``, ``1e-3``, ``true``, ``["csv"]``) and fall
back to plain strings.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class ConfigError(ValueError):
    """A bad configuration value, file or command-line option (a one-line user message)."""


@dataclass
class TrainConfig:
    """Everything the shared training loop needs; the pipeline's own options ride along."""

    #: Registered pipeline name (``studio methods`` lists them).
    pipeline: str = "lora"
    #: Run folder: checkpoint-N/, metrics.jsonl, config.json and the final adapter/.
    output_dir: str = "runs/lora"
    #: Number of optimizer steps.
    max_steps: int = 50
    #: Global batch per optimizer step: per-device batch x processes x grad_accum.
    batch_size: int = 32
    #: Micro-batches accumulated per optimizer step.
    grad_accum: int = 1
    #: Peak learning rate (AdamW).
    lr: float = 1e-3
    #: AdamW weight decay.
    weight_decay: float = 0.0
    #: Linear warm-up steps from 0 to lr.
    warmup_steps: int = 0
    #: Schedule after warm-up: constant | linear | cosine (linear and cosine decay to 0).
    lr_schedule: str = "constant"
    #: Clip the gradient norm of the trainable parameters to this value (0: no clipping).
    max_grad_norm: float = 1.0
    #: no | bf16 | fp16 autocast; trainable (adapter) parameters always stay float32.
    mixed_precision: str = "no"
    #: Seed for adapter init, data order and dropout.
    seed: int = 0
    #: Write checkpoint-N every this many steps (0: only when stopped early).
    checkpoint_every: int = 0
    #: Keep only the newest this many checkpoints (0: keep all).
    keep_checkpoints: int = 2
    #: None (fresh run), "latest" (newest checkpoint in output_dir, fresh if none) or a checkpoint path.
    resume: str | None = None
    #: Write the loss to metrics.jsonl and the trackers every this many steps.
    log_every: int = 1
    #: Extra trackers: "csv" (built in) and accelerate's ("tensorboard", "wandb", ...).
    trackers: list[str] = field(default_factory=list)
    #: Run the task's evaluate every this many steps (0: only at the end).
    eval_every: int = 0
    #: Train on the CPU even when a GPU is present.
    cpu: bool = False
    #: Show a tqdm progress bar on the main process.
    progress: bool = True
    #: Options of the pipeline (its config dataclass), e.g. {"rank": 4}.
    pipeline_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [
            (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 0, f"keep_checkpoints must be >= 0, got {self.keep_checkpoints}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}"),
            (
                self.lr_schedule in ("constant", "linear", "cosine"),
                f"lr_schedule must be constant, linear or cosine, got {self.lr_schedule!r}",
            ),
            (
                self.mixed_precision in ("no", "bf16", "fp16"),
                f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- typed values


def field_docs(cls: type) -> dict[str, str]:
    """The ``#:`` comment above each field of a dataclass (used as command-line help)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = re.match(r"(\w+)\s*:", stripped)
        if match and pending:
            docs[match.group(1)] = " ".join(pending)
        pending = []
    return docs


def parse_literal(text: str) -> Any:
    """A command-line value as a TOML literal (numbers, booleans, arrays), else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field type, converting command-line strings where needed."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not fit type {annotation}")
    if annotation is Any:
        return parse_literal(value) if isinstance(value, str) else value
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if annotation is bool:
        if isinstance(value, str):
            value = parse_literal(value.lower())
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, str):
            value = parse_literal(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if annotation is int and float(value) != int(value):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return annotation(value)
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        if isinstance(value, str):
            parsed = parse_literal(value)
            value = parsed if isinstance(parsed, list) else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table of options, got {value!r}")
        return dict(value)
    return value


def dataclass_from_dict(cls: type, data: dict[str, Any], what: str) -> Any:
    """Build dataclass ``cls`` from ``data``, checking names and types (``what`` names it in errors)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(
            f"unknown {what} option(s): {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
        )
    try:
        return cls(**{k: _coerce(v, hints[k], k) for k, v in data.items()})
    except TypeError as err:
        raise ConfigError(f"bad {what} options: {err}") from err


# --------------------------------------------------------------------------- files and overrides


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[key] = value``; dotted keys (``pipeline_options.rank``) go into sub-tables."""
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{key}: {part} is not a table of options")
    node[last] = value


def split_overrides(tokens: list[str]) -> list[tuple[str, str]]:
    """``["--a", "1", "--b=2", "--flag"]`` -> ``[("a", "1"), ("b", "2"), ("flag", "true")]``."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"unexpected argument {token!r}; options look like --key value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value = tokens[i + 1]
                i += 1
            else:
                value = "true"
        pairs.append((key.replace("-", "_") if "." not in key else key, value))
        i += 1
    return pairs


class _Parser(argparse.ArgumentParser):
    """argparse that raises ``ConfigError`` (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def build_parser(prog: str = "studio train") -> argparse.ArgumentParser:
    """The argument parser shared by ``studio train`` and ``studio/train.py``."""
    docs = field_docs(TrainConfig)
    parser = _Parser(
        prog=prog,
        description="Train an adapter with the shared Accelerate loop.",
        epilog="Pipeline options: --pipeline_options.NAME VALUE (see docs/training.md).",
    )
    parser.add_argument("--config", help="TOML file with TrainConfig fields and a [pipeline_options] table")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "pipeline_options":
            continue
        flag = {"nargs": "?", "const": "true"} if f.type in (bool, "bool") else {}
        parser.add_argument(
            f"--{f.name}", default=argparse.SUPPRESS, metavar="VALUE", help=docs.get(f.name), **flag
        )
    return parser


def config_from_args(argv: list[str], prog: str = "studio train") -> TrainConfig:
    """Parse ``--config FILE`` plus ``--key value`` overrides into a ``TrainConfig``."""
    parser = build_parser(prog)
    known, rest = parser.parse_known_args(argv)
    options = vars(known)
    data: dict[str, Any] = load_toml(options.pop("config")) if options.get("config") else {}
    options.pop("config", None)
    for key, value in options.items():
        apply_override(data, key, value)
    for key, value in split_overrides(rest):
        if not key.startswith("pipeline_options."):
            raise ConfigError(f"unknown option --{key}; see {prog} --help")
        apply_override(data, key, parse_literal(value))
    return dataclass_from_dict(TrainConfig, data, "training")
