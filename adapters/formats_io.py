"""Safe file access for adapter formats: safetensors only, checked before use, atomic writes.

Nothing here ever unpickles.  Every problem is an ``AdapterFileError`` whose message
starts with the file and, where one is to blame, names the tensor key.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adapters.base import AdapterError

#: Suffixes of pickle-based checkpoints; loading them could run arbitrary code.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
#: A header larger than this is not an adapter (and would be a memory bomb).
MAX_HEADER_BYTES = 100 * 1024 * 1024


class AdapterFileError(AdapterError):
    """An adapter file that cannot be used: unsafe, corrupt, or not for this model."""


def pickle_refusal(path: Path) -> AdapterFileError:
    return AdapterFileError(
        f"{path}: refusing to load a pickle checkpoint ({path.suffix or 'pickle data'}); pickles can run "
        "code. Convert it once in a trusted Python: `sd = torch.load(path, weights_only=True)` then "
        "`safetensors.torch.save_file(sd, 'adapter.safetensors')`, and load the .safetensors file"
    )


def _looks_like_pickle(head: bytes) -> bool:
    # Pickle protocol 2+ starts with 0x80 and the protocol number; torch.save writes a zip.
    return (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5) or head[:4] == b"PK\x03\x04"


def read_header(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(tensor entries, metadata) of a safetensors file, checked against the file size.

    Parsed by hand because safetensors' own error on a cut-off file does not say which
    tensor is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise pickle_refusal(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise AdapterFileError(f"{path}: not a safetensors file (only {size} bytes)")
        n = int.from_bytes(raw_len, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            if _looks_like_pickle(raw_len):
                raise pickle_refusal(path)
            raise AdapterFileError(
                f"{path}: not a safetensors file or truncated (header claims {n} bytes, file has {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise AdapterFileError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    for key, entry in header.items():
        try:
            start, end = entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise AdapterFileError(f"{path}: corrupt safetensors entry for key {key!r}") from None
        if end > data_size or start > end:
            raise AdapterFileError(
                f"{path}: tensor {key!r} is cut off (needs bytes {start}..{end}, file has {data_size}); "
                "the file is truncated or corrupt"
            )
    return header, dict(metadata)


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (CPU) and the metadata of a safetensors file; refuses NaN / Inf values."""
    path = Path(path)
    _, metadata = read_header(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{path}: corrupt safetensors file ({err})") from None
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise AdapterFileError(f"{path}: tensor {key!r} contains {bad} values")
    return tensors, metadata


def tensor_count(path: str | Path) -> int:
    """Number of scalar values in a safetensors file (from the header alone)."""
    header, _ = read_header(path)
    total = 0
    for entry in header.values():
        n = 1
        for d in entry.get("shape", []):
            n *= int(d)
        total += n
    return total


# --------------------------------------------------------------------------- atomic writes


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(clean, tmp, metadata={"format": "pt", **metadata})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


@contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``folder`` in one rename.

    An existing ``folder`` is moved aside first and deleted only after the new one is in
    place, so a crash leaves either the old or the new folder, never a half-written one.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield tmp
        old = None
        if folder.exists():
            if not folder.is_dir():
                raise AdapterFileError(f"{folder}: exists and is not a folder")
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
