"""Training pipelines: one file per recipe, each a ``Task`` for the shared loop (studio/loop.py).

A pipeline module calls ``register_pipeline(name, factory, doc)`` at import time, where
``factory(options: dict) -> Task`` builds the task from the ``pipeline_options`` of the
run's config (usually through ``studio.config.dataclass_from_dict`` on the pipeline's
config dataclass).  Built-in pipelines register by adding their module to ``BUILTIN``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# Modules that register the built-in pipelines; a module not written yet is skipped.
BUILTIN = [
    "pipelines.lora",
    "pipelines.adaptertune",
    "pipelines.salt",
    "pipelines.endoarss",
    "pipelines.efficientdm",
    "pipelines.pickstyle",
    "pipelines.autolora",
    "pipelines.lora3d",
]

Factory = Callable[[dict[str, Any]], Any]
_PIPELINES: dict[str, tuple[Factory, str]] = {}
_loaded = False


def register_pipeline(name: str, factory: Factory, doc: str = "") -> None:
    """Register ``factory(options) -> Task`` under ``name`` with a one-line description."""
    _PIPELINES[name] = (factory, doc)


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module_name in BUILTIN:
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise


def pipelines() -> dict[str, str]:
    """Registered pipelines: name -> one-line description."""
    _load_builtin()
    return {name: doc for name, (_, doc) in sorted(_PIPELINES.items())}


def get_pipeline(name: str) -> Factory:
    """The factory registered under ``name``; a ValueError lists the known names."""
    module_name = f"pipelines.{name}"
    if name not in _PIPELINES and module_name in BUILTIN:
        importlib.import_module(module_name)  # most pipelines live in a module of their name
    if name not in _PIPELINES:
        _load_builtin()
    if name not in _PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; known: {', '.join(sorted(_PIPELINES)) or 'none'}")
    return _PIPELINES[name][0]
