"""Launch an autotuned Triton kernel and learn which meta-parameter value it ran with.

The split-K launchers size the next step by the split the kernel used (how many partials
to add).  Triton's autotuner keeps only its last choice (``best_config``), so the launch
and the read-back happen under one lock: a concurrent launch of another shape (two app
users) cannot change ``best_config`` in between.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import triton

_LOCK = threading.Lock()


def launch_autotuned(
    kernel: triton.runtime.Autotuner,
    grid: Callable[[dict], tuple[int, ...]],
    args: tuple,
    meta: dict,
    config: dict | None,
    read: str,
) -> int:
    """Run ``kernel[grid](*args, **meta)`` and return the value of meta-parameter ``read`` it used.

    ``config`` (meta-parameters plus ``num_warps`` / ``num_stages``) skips autotuning and runs
    the bare kernel with it (tests, the interpreter); its ``read`` entry is returned.
    """
    if config is not None:
        kernel.fn[grid](*args, **meta, **config)
        return int(config[read])
    with _LOCK:
        kernel[grid](*args, **meta)
        return int(kernel.best_config.kwargs[read])
