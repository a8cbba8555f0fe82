"""Run folders for the training loop: atomic ``checkpoint-N`` directories, retention, logs.

Layout of ``output_dir``::

    config.json            the TrainConfig of the run
    metrics.jsonl          one JSON record per logged step (loss, lr, eval/...)
    checkpoint-N/          accelerate state (trainable tensors only) + trainer_state.json
    adapter/               the final adapter (what the task's save_adapter writes)

A checkpoint is written into a hidden ``.tmp-checkpoint-N`` folder and renamed when
complete, so a visible ``checkpoint-N`` is always whole (a killed run leaves at most a
hidden temp folder, removed at the next start).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as (step, path), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _CHECKPOINT.fullmatch(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from: None, the newest for "latest", or the given path."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no {STATE_FILE})")
    return path


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())


def remove_stale_temp(output_dir: Path) -> None:
    """Delete half-written temp folders that a killed run left behind."""
    if output_dir.is_dir():
        for path in output_dir.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def publish(tmp: Path, final: Path) -> None:
    """Rename a complete ``tmp`` folder to ``final``; an older ``final`` is swapped out first."""
    old = final.with_name(f".tmp-old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(
    output_dir: Path,
    step: int,
    save_state: Callable[[Path], None],
    state: dict[str, Any],
    is_main: bool,
    barrier: Callable[[], None],
) -> Path:
    """Write ``checkpoint-step`` atomically; ``save_state(folder)`` runs on every process."""
    tmp = output_dir / f".tmp-checkpoint-{step}"
    final = output_dir / f"checkpoint-{step}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    save_state(tmp)
    barrier()
    if is_main:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        publish(tmp, final)
    barrier()
    return final


def apply_retention(output_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (keep 0: keep all); returns the deleted."""
    found = list_checkpoints(output_dir)
    if keep <= 0 or len(found) <= keep:
        return []
    doomed = [path for _, path in found[:-keep]]
    for path in doomed:
        # Rename first so a crash mid-delete never leaves a visible, partial checkpoint.
        trash = path.with_name(f".tmp-del-{path.name}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


# --------------------------------------------------------------------------- logs


def truncate_logs(output_dir: Path, step: int) -> None:
    """Drop log records after ``step`` (a resumed run rewrites them identically)."""
    jsonl = output_dir / METRICS_FILE
    if jsonl.is_file():
        keep = [ln for ln in jsonl.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        jsonl.write_text("".join(ln + "\n" for ln in keep))
    csv = output_dir / CSV_FILE
    if csv.is_file():
        lines = csv.read_text().splitlines()
        keep = lines[:1] + [ln for ln in lines[1:] if int(ln.split(",", 1)[0]) <= step]
        csv.write_text("".join(ln + "\n" for ln in keep))


def append_metrics(output_dir: Path, record: dict[str, Any]) -> None:
    with open(output_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (loss lines and eval lines), in order."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln]
