"""Save, load, inspect and convert adapter files.

Formats (``detect_format`` tells them apart; nothing is ever unpickled):

- ``studio``: a folder with ``adapter_config.json`` (format version, method, spec, base
  model id, training metadata, per-module shapes) and ``adapter_model.safetensors``
  (``adapters.base.adapter_state_dict`` tensors, prefixed ``<component>.`` for pipelines).
  Any registered method; round-trips bit-exactly.
- ``diffusers`` / ``peft``: ``<component>.<module>.lora_A.weight`` files that vanilla
  ``pipe.load_lora_weights`` reads, and PEFT adapter folders (see formats_diffusers).
- ``kohya``: ``lora_unet_*`` / ``lora_te_*`` files with ``alpha`` and ``ss_*`` metadata.

Loading checks every key, shape and value against the model before anything is
injected; a failure after injection removes the adapter again, so an error always
leaves the model exactly as it was.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapters.base import AdapterError, adapter_names, adapter_state_dict, get_spec, iter_hosts
from adapters.formats_diffusers import default_prefix
from adapters.formats_io import AdapterFileError
from adapters.formats_kohya import resolve_names
from adapters.formats_plain import (
    assign_components,
    lora_to_studio,
    model_components,
    model_lora_set,
)
from adapters.formats_studio import (
    apply,
    assign_studio_parts,
    check_fits,
    detect_format,
    part_modules,
    prefixed,
    read_foreign,
    read_studio,
    spec_from_dict,
    split_parts,
    studio_as_lora_set,
    studio_config,
    write_plain,
    write_studio,
)

__all__ = [
    "AdapterFileError",
    "AdapterInfo",
    "convert",
    "detect_format",
    "load_adapter",
    "read_adapter_info",
    "save_adapter",
]

TARGET_FORMATS = ("studio", "diffusers", "kohya")


@dataclass
class AdapterInfo:
    """What an adapter file holds, read without a model.  Also readable as a dict."""

    #: "studio", "diffusers", "peft" or "kohya".
    format: str
    #: Adapter method ("lora" for every foreign format).
    method: str
    #: Rank (the most common one when modules differ); None for methods without one.
    rank: int | None
    #: Scale numerator (scale = alpha / rank); None when the method has none.
    alpha: float | None
    #: Adapted modules, prefixed "<component>." in pipeline files.
    targets: list[str]
    #: Base model the adapter was trained for ("" when the file does not say).
    base_model_id: str
    #: Number of stored values.
    n_params: int
    #: Bytes on disk.
    size_bytes: int
    #: Training metadata (ss_* entries for kohya files).
    metadata: dict[str, Any] = field(default_factory=dict)
    #: The file or folder read.
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def keys(self) -> list[str]:
        return list(self.to_dict())

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


# --------------------------------------------------------------------------- loading


def _clean_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_") or "adapter"


def _check_base(path: Path, expected: str | None, found: str) -> None:
    if expected and found and expected != found:
        raise AdapterFileError(f"{path}: adapter was made for base model {found!r}, not {expected!r}")


def load_adapter(
    model: Any,
    path: str | Path,
    name: str | None = None,
    *,
    base_model_id: str | None = None,
    strength: float = 1.0,
) -> str:
    """Load an adapter file or folder (any supported format) into a model or pipeline.

    Returns the adapter name (default: the name saved in the file, else the file stem).
    """
    path = Path(path)
    fmt, weights, config = detect_format(path)
    comps = model_components(model)
    plans = []
    if fmt == "studio":
        config, tensors = read_studio(weights, config)
        _check_base(path, base_model_id, config.get("base_model_id", ""))
        parts = split_parts(config, tensors, path)
        assign = assign_studio_parts(config, parts, comps, path)
        for part, state in parts.items():
            spec = spec_from_dict(config["components"][part]["spec"], path)
            module = comps[assign[part]]
            check_fits(module, spec, state, path, f"{part}." if part else "")
            plans.append((module, spec, state))
        name = name or config.get("name") or _clean_name(path.stem)
    else:
        lora_set = read_foreign(fmt, weights, config)
        if fmt == "kohya":
            lora_set = resolve_names(lora_set, path, comps)
        _check_base(path, base_model_id, lora_set.base_model_id)
        assign = assign_components(
            list(lora_set.parts), comps, {p: set(lo) for p, lo in lora_set.parts.items()}, path
        )
        for part, loras in lora_set.parts.items():
            module = comps[assign[part]]
            spec, state = lora_to_studio(loras, module, path, f"{part}." if part else "")
            check_fits(module, spec, state, path, f"{part}." if part else "")
            plans.append((module, spec, state))
        name = name or _clean_name(path.stem)
    apply(plans, name, strength)
    return name


# --------------------------------------------------------------------------- saving


def save_adapter(
    model: Any,
    name: str,
    folder: str | Path,
    *,
    base_model_id: str,
    metadata: dict[str, Any] | None = None,
    format: str = "studio",
) -> Path:
    """Save adapter ``name`` of a model or pipeline; returns the folder (or file) written.

    ``format="studio"`` (default) writes the studio folder; ``"diffusers"`` / ``"kohya"``
    write a LoRA file for those tools (a ``.safetensors`` path, or a folder for diffusers).
    """
    if format not in TARGET_FORMATS:
        raise AdapterError(f"unknown format {format!r}; choose one of {', '.join(TARGET_FORMATS)}")
    folder = Path(folder)
    metadata = dict(metadata or {})
    if format != "studio":
        lora_set = model_lora_set(model, name)
        lora_set.metadata, lora_set.base_model_id = metadata, base_model_id
        comps = model_components(model)
        return write_plain(
            folder, lora_set, format, name, {"": default_prefix(comps[""])} if "" in comps else {}, comps
        )
    parts = {}
    for comp, module in model_components(model).items():
        if name in adapter_names(module):
            hosts = [n for n, h in iter_hosts(module) if name in h.adapters]
            parts[comp] = (get_spec(module, name), adapter_state_dict(module, name), module, hosts)
    if not parts:
        raise AdapterError(f"no adapter named {name!r} on the model")
    config = studio_config(parts, name, base_model_id, metadata)
    return write_studio(folder, config, prefixed({p: s for p, (_, s, _, _) in parts.items()}))


# --------------------------------------------------------------------------- inspect / convert


def read_adapter_info(path: str | Path) -> AdapterInfo:
    """Method, rank, alpha, targets, base model, size and metadata of an adapter file."""
    path = Path(path)
    fmt, weights, config = detect_format(path)
    size = (
        sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else path.stat().st_size
    )
    if fmt == "studio":
        config, tensors = read_studio(weights, config)
        spec = config.get("spec", {})
        rank = spec.get("rank", spec.get("lora_rank"))
        split = split_parts(config, tensors, path)
        targets = sorted(
            f"{p}.{m}" if p else m for p, st in split.items() for m in part_modules(config, p, st)
        )
        return AdapterInfo(
            "studio", config.get("method", "?"), rank, spec.get("alpha", spec.get("lora_alpha")), targets,
            config.get("base_model_id", ""), sum(t.numel() for t in tensors.values()), size,
            dict(config.get("metadata", {})), str(path),
        )  # fmt: skip
    lora_set = read_foreign(fmt, weights, config)
    if fmt == "kohya":
        try:
            lora_set = resolve_names(lora_set, path, None)
        except AdapterFileError:  # a foreign kohya file: report the underscored names
            lora_set.metadata.pop("_kohya_names", None)
    loras = [(f"{p}.{m}" if p else m, lo) for p, d in lora_set.parts.items() for m, lo in d.items()]
    base = lora_set.base_model_id or str(lora_set.metadata.get("ss_sd_model_name", ""))
    return AdapterInfo(
        fmt, "lora", Counter(lo.rank for _, lo in loras).most_common(1)[0][0],
        Counter(lo.alpha for _, lo in loras).most_common(1)[0][0], sorted(m for m, _ in loras),
        base, sum(lo.down.numel() + lo.up.numel() for _, lo in loras), size,
        lora_set.metadata, str(path),
    )  # fmt: skip


def _resolve_base_model(base_model: Any) -> Any:
    if base_model is None or not isinstance(base_model, (str, Path)):
        return base_model
    if Path(base_model).is_dir():
        from studio.service_models import load_diffusers_folder

        return load_diffusers_folder(base_model)
    from studio.service_models import list_base_models

    for entry in list_base_models():
        if entry.name == str(base_model):
            return entry.load()
    raise AdapterError(f"unknown base model {base_model!r} (give a diffusers folder or a built-in name)")


def convert(src: str | Path, dst: str | Path, to: str = "studio", base_model: Any = None) -> Path:
    """Convert an adapter file between formats; returns what was written.

    ``to``: "studio" (a folder), "diffusers" (a .safetensors file, or a folder that gets
    pytorch_lora_weights.safetensors) or "kohya" (a .safetensors file).  ``base_model`` (a
    model, pipeline, diffusers folder or built-in name) is needed only to resolve the module
    names of kohya files the studio did not write, and is used to check the result.
    """
    if to not in TARGET_FORMATS:
        raise AdapterError(f"unknown target format {to!r}; choose one of {', '.join(TARGET_FORMATS)}")
    src, dst = Path(src), Path(dst)
    fmt, weights, config = detect_format(src)
    model = _resolve_base_model(base_model)
    comps = model_components(model) if model is not None else None
    if fmt == "studio":
        config, tensors = read_studio(weights, config)
        if to == "studio":
            return write_studio(dst, config, tensors)
        lora_set = studio_as_lora_set(config, tensors, src)
        return write_plain(dst, lora_set, to, config.get("name") or _clean_name(src.stem), {}, comps)
    lora_set = read_foreign(fmt, weights, config)
    if fmt == "kohya":
        lora_set = resolve_names(lora_set, src, comps)
    name = _clean_name(src.stem if src.suffix else src.name)
    if to != "studio":
        prefixes = {"": default_prefix(comps[""])} if comps and "" in comps else {}
        return write_plain(dst, lora_set, to, name, prefixes, comps)
    parts = {}
    for part, loras in lora_set.parts.items():
        module = comps[assign_components([part], comps, {part: set(loras)}, src)[part]] if comps else None
        spec, state = lora_to_studio(loras, module, src, f"{part}." if part else "")
        if module is not None:
            check_fits(module, spec, state, src, f"{part}." if part else "")
        parts[part] = (spec, state, None, list(loras))
    config = studio_config(parts, name, lora_set.base_model_id, lora_set.metadata)
    return write_studio(dst, config, prefixed({p: s for p, (_, s, _, _) in parts.items()}))
