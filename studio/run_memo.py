"""A resumable record of finished runs (the bench reproduction scripts use it).

A full reproduction is tens of short trainings; a GPU lease can end in the middle.  Each
finished run is written (atomically) to ``runs.json`` in the output folder under a key
made of its options and seed, so running the script again skips what is already done.
"""

from __future__ import annotations

import json
import os
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
