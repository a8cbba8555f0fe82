"""File access for the service: every user-given path must resolve inside a configured folder."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from adapters.base import AdapterError

ADAPTER_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def safe_path(path: str | Path, roots: Iterable[str | Path], *, must_exist: bool = True) -> Path:
    """``path`` resolved (symlinks followed); refused unless it lies inside one of ``roots``.

    A relative path is tried against each root in turn.
    """
    roots = [Path(r).resolve() for r in roots]
    if not roots:
        raise AdapterError("no folders are configured for file access")
    raw = Path(str(path)).expanduser()
    candidates = [raw.resolve()] if raw.is_absolute() else [(r / raw).resolve() for r in roots]
    for cand in candidates:
        if any(cand == r or cand.is_relative_to(r) for r in roots):
            if must_exist and not cand.exists():
                continue
            return cand
    if any(any(c == r or c.is_relative_to(r) for r in roots) for c in candidates):
        raise AdapterError(f"no such file: {path}")
    raise AdapterError(f"access refused: {path} is outside the configured folders")


def scan_adapters(roots: Iterable[str | Path]) -> list[Path]:
    """Adapter folders (with adapter_config.json) and weight files found under ``roots``."""
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        folders = sorted({p.parent for p in root.rglob("adapter_config.json")})
        found += folders
        for p in sorted(root.rglob("*")):
            if p.suffix in ADAPTER_SUFFIXES and p.is_file() and not any(p.is_relative_to(f) for f in folders):
                found.append(p)
    return found


def _clean_name(stem: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_\-]", "_", stem)[:64] or "adapter"
