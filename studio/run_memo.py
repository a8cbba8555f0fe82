"""A resumable record of finished runs (the bench reproduction scripts use it).

A full reproduction is tens of short trainings; a GPU lease can end in the middle.  Each
finished run is written (atomically) to ``runs.json`` in the output folder under a key
made of its options and seed, so running the script again skips what is already done.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


class RunMemo:
    """key (any JSON-able object) -> result of one run, kept on disk."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def __call__(self, key: Any, run: Callable[[], Any]) -> Any:
        text = json.dumps(key, sort_keys=True)
        if text not in self.data:
            self.data[text] = run()
            self._save()
        return self.data[text]

    def absorb(self, paths: list[Path]) -> int:
        """Merge the runs recorded in other memo files (parallel workers' own); returns how many."""
        before = len(self.data)
        for path in paths:
            self.data.update(json.loads(Path(path).read_text()))
        self._save()
        return len(self.data) - before

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    """``--workers N``: the bench's seeds run in N processes sharing the one GPU (tiny runs idle it)."""
    parser.add_argument(
        "--workers", type=int, default=1, help="processes sharing the GPU, seeds dealt out between them"
    )
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)


def memo_for_workers(
    args: argparse.Namespace, out: Path, seeds: list[int], script: str, child_args: list[str]
) -> tuple[RunMemo, list[int]]:
    """The memo and the seeds this process runs, after ``add_worker_args`` options.

    A worker (``--worker i``) gets its own memo file (no write races; it starts from the
    finished runs) and every ``workers``-th seed.  The parent with ``--workers N > 1`` runs
    ``script`` N times with ``child_args`` first, then merges their memo files, so its own
    loop finds every run finished and only builds the tables.
    """
    memo = RunMemo(out / "runs.json")
    if args.worker is not None:
        own = RunMemo(out / f"runs.w{args.worker}.json")
        own.data.update(memo.data)
        return own, seeds[args.worker :: args.workers]
    if args.workers > 1:
        cmd = [sys.executable, script, *child_args, "--workers", str(args.workers)]
        procs = [subprocess.Popen([*cmd, "--worker", str(i)]) for i in range(args.workers)]
        if any(proc.wait() for proc in procs):
            raise SystemExit("a worker failed; finished runs are kept, run again to resume")
        memo.absorb(sorted(out.glob("runs.w*.json")))
    return memo, seeds
