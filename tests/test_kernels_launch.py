"""``launch_autotuned``: the config a launch used is read back without races (CPU, fakes)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from studio.kernels.autotuned_launch import launch_autotuned


class FakeAutotuner:
    """Records launches; a launch sets ``best_config`` from its first argument, then dawdles."""

    def __init__(self) -> None:
        self.best_config = None
        self.calls: list[tuple] = []
        outer = self

        class _Bare:
            def __getitem__(self, grid):
                return lambda *a, **kw: outer.calls.append(("bare", grid, a, kw))

        self.fn = _Bare()

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.calls.append(("tuned", grid, args, kw))
            self.best_config = SimpleNamespace(kwargs={"SPLIT_K": args[0]})
            time.sleep(0.01)  # a window for another thread's launch to overwrite best_config

        return run


def test_forced_config_runs_the_bare_kernel_with_it() -> None:
    k = FakeAutotuner()
    got = launch_autotuned(k, "grid", (7,), {"A": 1}, {"SPLIT_K": 4, "num_warps": 2}, "SPLIT_K")
    assert got == 4
    assert k.calls == [("bare", "grid", (7,), {"A": 1, "SPLIT_K": 4, "num_warps": 2})]


def test_autotuned_launch_returns_the_choice_of_its_own_launch_under_threads() -> None:
    k = FakeAutotuner()
    results: dict[int, int] = {}

    def user(i: int) -> None:
        results[i] = launch_autotuned(k, "grid", (i,), {}, None, "SPLIT_K")

    threads = [threading.Thread(target=user, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: i for i in range(8)}
    assert all(c[0] == "tuned" for c in k.calls) and len(k.calls) == 8
