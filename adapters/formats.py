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

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.base import (
    AdapterError,
    AdapterSpec,
    adapter_names,
    adapter_state_dict,
    get_spec,
    inject,
    load_adapter_state_dict,
    plan_injection,
    remove,
    set_strength,
)
from adapters.formats_diffusers import (
    WEIGHT_NAME,
    default_prefix,
    is_diffusers_keys,
    prefix_for_class,
    read_diffusers,
    write_diffusers,
)
from adapters.formats_io import (
    PICKLE_SUFFIXES,
    AdapterFileError,
    atomic_folder,
    pickle_refusal,
    read_header,
    read_tensors,
    write_json,
    write_tensors,
)
from adapters.formats_kohya import is_kohya_keys, read_kohya, resolve_names, write_kohya
from adapters.formats_plain import (
    LoraSet,
    assign_components,
    lora_to_studio,
    model_components,
    model_lora_set,
    plain_factors_from_state,
)
from adapters.lora import LoraSpec

__all__ = [
    "AdapterFileError",
    "AdapterInfo",
    "convert",
    "detect_format",
    "load_adapter",
    "read_adapter_info",
    "save_adapter",
]

FORMAT_NAME = "adapter-studio"
#: Bumped when the folder layout changes incompatibly; older versions stay readable.
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
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


# --------------------------------------------------------------------------- detection


def _weights_in_folder(folder: Path) -> Path:
    for name in (WEIGHTS_NAME, WEIGHT_NAME):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    pickles = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles and not found:
        raise pickle_refusal(pickles[0])
    raise AdapterFileError(f"{folder}: no adapter weights (expected {WEIGHTS_NAME} or one .safetensors file)")


def detect_format(path: str | Path) -> tuple[str, Path, dict[str, Any] | None]:
    """(format, weights file, folder config) of an adapter file or folder."""
    path = Path(path)
    if not path.exists():
        raise AdapterFileError(f"{path}: no such file or folder")
    config = None
    if path.is_dir():
        cfg_path = path / CONFIG_NAME
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise AdapterFileError(f"{cfg_path}: corrupt JSON ({err})") from None
        weights = _weights_in_folder(path)
        if config is not None and config.get("format") == FORMAT_NAME:
            return "studio", weights, config
        if config is not None and "peft_type" in config:
            if str(config["peft_type"]).upper() != "LORA":
                raise AdapterFileError(
                    f"{cfg_path}: PEFT method {config['peft_type']} is not supported (LoRA is)"
                )
            return "peft", weights, config
        path = weights
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise pickle_refusal(path)
    header, metadata = read_header(path)
    if "studio.config" in metadata:
        return "studio", path, None
    keys = list(header)
    if is_kohya_keys(keys):
        return "kohya", path, None
    if is_diffusers_keys(keys):
        return "diffusers", path, None
    raise AdapterFileError(f"{path}: not an adapter file this studio knows (first key: {keys[:1]})")


# --------------------------------------------------------------------------- reading


def _read_studio(
    weights: Path, config: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    tensors, metadata = read_tensors(weights)
    if config is None:
        try:
            config = json.loads(metadata["studio.config"])
        except (KeyError, json.JSONDecodeError):
            raise AdapterFileError(f"{weights}: corrupt studio.config metadata") from None
    version = config.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{weights}: format_version {version} is newer than this studio reads ({FORMAT_VERSION}); upgrade"
        )
    if not isinstance(config.get("components"), dict) or not config["components"]:
        raise AdapterFileError(f"{weights}: adapter_config.json lists no components")
    return config, tensors


def _split_parts(config: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict]:
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in config["components"]}
    for key, t in tensors.items():
        part = next((p for p in parts if p and key.startswith(p + ".")), "" if "" in parts else None)
        if part is None:
            raise AdapterFileError(f"{path}: key {key!r} belongs to no component of adapter_config.json")
        parts[part][key[len(part) + 1 :] if part else key] = t
    return parts


def _read_foreign(fmt: str, weights: Path, config: dict[str, Any] | None) -> LoraSet:
    tensors, metadata = read_tensors(weights)
    if fmt == "kohya":
        return read_kohya(weights, tensors, metadata)
    return read_diffusers(weights, tensors, metadata, config)


def _studio_as_lora_set(config: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> LoraSet:
    parts = {}
    for part, state in _split_parts(config, tensors, path).items():
        spec = _spec(config["components"][part]["spec"], path)
        if not isinstance(spec, LoraSpec):
            raise AdapterError(
                f"{path}: method {spec.method!r} has no plain LoRA form; only LoRA converts to diffusers/kohya"
            )
        parts[_prefix_of(config, part)] = plain_factors_from_state(spec, state)
    return LoraSet(parts, dict(config.get("metadata", {})), config.get("base_model_id", ""))


def _prefix_of(config: dict[str, Any], part: str) -> str:
    """Pipeline component of a studio part ("" parts: guessed from the recorded model class)."""
    if part:
        return part
    entry = config["components"][part]
    return prefix_for_class(entry.get("model_class", ""), entry.get("model_module", ""))


def _spec(data: dict[str, Any], path: Path) -> AdapterSpec:
    try:
        return AdapterSpec.from_dict(data)
    except (AdapterError, TypeError) as err:
        raise AdapterFileError(f"{path}: bad adapter spec ({err})") from None


# --------------------------------------------------------------------------- loading


def _check_fits(
    module: nn.Module, spec: AdapterSpec, state: dict[str, torch.Tensor], path: Path, prefix: str
) -> None:
    """Every key and shape of ``state`` against the branches ``spec`` would create; no change."""
    try:
        planned = plan_injection(module, spec)
    except AdapterError as err:
        raise AdapterFileError(
            f"{path}: does not fit the model ({err}); is it for another base model?"
        ) from None
    expected = {f"{m}.{k}": tuple(t.shape) for m, b in planned for k, t in b.state_dict().items()}
    for key in sorted(set(state) - set(expected)):
        raise AdapterFileError(
            f"{path}: key {prefix + key!r} has no place in the model; is it for another base model?"
        )
    for key in sorted(set(expected) - set(state)):
        raise AdapterFileError(f"{path}: key {prefix + key!r} is missing from the file")
    for key, t in state.items():
        if tuple(t.shape) != expected[key]:
            raise AdapterFileError(
                f"{path}: key {prefix + key!r} has shape {tuple(t.shape)}, the model needs {expected[key]}"
            )


def _apply(
    plans: list[tuple[nn.Module, AdapterSpec, dict[str, torch.Tensor]]], name: str, strength: float
) -> None:
    """Inject and fill every part; on any failure remove what was added (the model is unchanged)."""
    for module, _, _ in plans:
        if name in adapter_names(module):
            raise AdapterError(f"an adapter named {name!r} is already on the model")
    done: list[nn.Module] = []
    try:
        for module, spec, state in plans:
            inject(module, spec, name)
            done.append(module)
            load_adapter_state_dict(module, name, state)
            if strength != 1.0:
                set_strength(module, name, strength)
    except Exception:
        for module in done:
            remove(module, name)
        raise


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
        config, tensors = _read_studio(weights, config)
        _check_base(path, base_model_id, config.get("base_model_id", ""))
        parts = _split_parts(config, tensors, path)
        assign = assign_components(
            list(parts), comps, {p: {k.rsplit(".", 1)[0] for k in s} for p, s in parts.items()}, path
        )
        for part, state in parts.items():
            spec = _spec(config["components"][part]["spec"], path)
            module = comps[assign[part]]
            _check_fits(module, spec, state, path, f"{part}." if part else "")
            plans.append((module, spec, state))
        name = name or config.get("name") or _clean_name(path.stem)
    else:
        lora_set = _read_foreign(fmt, weights, config)
        if fmt == "kohya":
            lora_set = resolve_names(lora_set, path, comps)
        _check_base(path, base_model_id, lora_set.base_model_id)
        assign = assign_components(
            list(lora_set.parts), comps, {p: set(lo) for p, lo in lora_set.parts.items()}, path
        )
        for part, loras in lora_set.parts.items():
            module = comps[assign[part]]
            spec, state = lora_to_studio(loras, module, path, f"{part}." if part else "")
            _check_fits(module, spec, state, path, f"{part}." if part else "")
            plans.append((module, spec, state))
        name = name or _clean_name(path.stem)
    _apply(plans, name, strength)
    return name


# --------------------------------------------------------------------------- saving


def _studio_config(
    parts: dict[str, tuple[AdapterSpec, dict[str, torch.Tensor], nn.Module | None]],
    name: str,
    base_model_id: str,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    comps = {}
    for part, (spec, state, module) in parts.items():
        entry: dict[str, Any] = {
            "spec": spec.to_dict(),
            "shapes": {k: list(t.shape) for k, t in sorted(state.items())},
        }
        if module is not None:
            entry.update(model_class=type(module).__name__, model_module=type(module).__module__)
        comps[part] = entry
    first = next(iter(parts.values()))[0]
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "name": name,
        "method": first.method,
        "spec": first.to_dict(),
        "base_model_id": base_model_id,
        "metadata": json.loads(json.dumps(metadata, default=str)),
        "components": comps,
        "n_params": sum(t.numel() for _, s, _ in parts.values() for t in s.values()),
    }


def _write_studio(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    slim = {k: v for k, v in config.items() if k != "components"}
    slim["components"] = {
        p: {k: v for k, v in e.items() if k != "shapes"} for p, e in config["components"].items()
    }
    with atomic_folder(folder) as tmp:
        write_json(tmp / CONFIG_NAME, config)
        write_tensors(tmp / WEIGHTS_NAME, tensors, {"studio.config": json.dumps(slim, sort_keys=True)})
    return folder


def _prefixed(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {(f"{p}.{k}" if p else k): t for p, state in parts.items() for k, t in state.items()}


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
    folder = Path(folder)
    metadata = dict(metadata or {})
    if format != "studio":
        lora_set = model_lora_set(model, name)
        lora_set.metadata, lora_set.base_model_id = metadata, base_model_id
        comps = model_components(model)
        return _write_plain(
            folder, lora_set, format, name, {"": default_prefix(comps[""])} if "" in comps else {}, comps
        )
    parts = {}
    for comp, module in model_components(model).items():
        if name in adapter_names(module):
            parts[comp] = (get_spec(module, name), adapter_state_dict(module, name), module)
    if not parts:
        raise AdapterError(f"no adapter named {name!r} on the model")
    config = _studio_config(parts, name, base_model_id, metadata)
    return _write_studio(folder, config, _prefixed({p: s for p, (_, s, _) in parts.items()}))


def _write_plain(
    dst: Path,
    lora_set: LoraSet,
    to: str,
    name: str,
    prefixes: dict[str, str],
    comps: dict[str, nn.Module] | None,
) -> Path:
    if to == "diffusers":
        return write_diffusers(dst, lora_set, prefixes)
    renamed = LoraSet(
        {prefixes.get(p, p): lo for p, lo in lora_set.parts.items()},
        lora_set.metadata,
        lora_set.base_model_id,
    )
    unet = (comps or {}).get("unet") or (comps or {}).get("")
    return write_kohya(dst, renamed, name, unet)


# --------------------------------------------------------------------------- inspect / convert


def read_adapter_info(path: str | Path) -> AdapterInfo:
    """Method, rank, alpha, targets, base model, size and metadata of an adapter file."""
    path = Path(path)
    fmt, weights, config = detect_format(path)
    size = (
        sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else path.stat().st_size
    )
    if fmt == "studio":
        config, tensors = _read_studio(weights, config)
        spec = config.get("spec", {})
        rank = spec.get("rank", spec.get("lora_rank"))
        targets = sorted({k.rsplit(".", 1)[0] for k in tensors})
        return AdapterInfo(
            "studio", config.get("method", "?"), rank, spec.get("alpha", spec.get("lora_alpha")), targets,
            config.get("base_model_id", ""), sum(t.numel() for t in tensors.values()), size,
            dict(config.get("metadata", {})), str(path),
        )  # fmt: skip
    lora_set = _read_foreign(fmt, weights, config)
    if fmt == "kohya":
        try:
            lora_set = resolve_names(lora_set, path, None)
        except AdapterFileError:  # a foreign kohya file: report the underscored names
            lora_set.metadata.pop("_kohya_names", None)
    loras = [(f"{p}.{m}" if p else m, lo) for p, d in lora_set.parts.items() for m, lo in d.items()]
    return AdapterInfo(
        fmt, "lora", Counter(lo.rank for _, lo in loras).most_common(1)[0][0],
        Counter(lo.alpha for _, lo in loras).most_common(1)[0][0], sorted(m for m, _ in loras),
        lora_set.base_model_id, sum(lo.down.numel() + lo.up.numel() for _, lo in loras), size,
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
        config, tensors = _read_studio(weights, config)
        if to == "studio":
            return _write_studio(dst, config, tensors)
        lora_set = _studio_as_lora_set(config, tensors, src)
        return _write_plain(dst, lora_set, to, config.get("name") or _clean_name(src.stem), {}, comps)
    lora_set = _read_foreign(fmt, weights, config)
    if fmt == "kohya":
        lora_set = resolve_names(lora_set, src, comps)
    name = _clean_name(src.stem if src.suffix else src.name)
    if to != "studio":
        prefixes = {"": default_prefix(comps[""])} if comps and "" in comps else {}
        return _write_plain(dst, lora_set, to, name, prefixes, comps)
    parts = {}
    for part, loras in lora_set.parts.items():
        module = comps[assign_components([part], comps, {part: set(loras)}, src)[part]] if comps else None
        spec, state = lora_to_studio(loras, module, src, f"{part}." if part else "")
        if module is not None:
            _check_fits(module, spec, state, src, f"{part}." if part else "")
        parts[part] = (spec, state, None)
    config = _studio_config(parts, name, lora_set.base_model_id, lora_set.metadata)
    return _write_studio(dst, config, _prefixed({p: s for p, (_, s, _) in parts.items()}))
