"""The studio folder format and the steps every load shares: detect, read, check, inject.

A studio adapter is a folder with ``adapter_config.json`` (format version, method, spec,
base model id, training metadata, per-component specs and per-module shapes) and
``adapter_model.safetensors`` (``adapter_state_dict`` tensors, keys prefixed
``<component>.`` for pipelines).  The safetensors metadata repeats the config (less the
shapes, which its header holds) so the file alone is self-describing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.base import (
    AdapterError,
    AdapterSpec,
    adapter_names,
    inject,
    load_adapter_state_dict,
    plan_injection,
    remove,
    set_strength,
)
from adapters.formats_diffusers import (
    WEIGHT_NAME,
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
from adapters.formats_kohya import is_kohya_keys, read_kohya, write_kohya
from adapters.formats_plain import LoraSet, assign_components, plain_factors_from_state
from adapters.lora import LoraSpec

FORMAT_NAME = "adapter-studio"
#: Bumped when the folder layout changes incompatibly; older versions stay readable.
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


# --------------------------------------------------------------------------- detection


def weights_in_folder(folder: Path) -> Path:
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
        weights = weights_in_folder(path)
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


def read_studio(
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


def part_modules(config: dict[str, Any], part: str, state: dict[str, torch.Tensor]) -> list[str]:
    """Adapted module names of one component (older configs: from the tensor keys)."""
    recorded = config["components"][part].get("modules")
    return list(recorded) if recorded else sorted({k.rsplit(".", 1)[0] for k in state})


def assign_studio_parts(
    config: dict[str, Any], parts: dict[str, dict[str, torch.Tensor]], comps: dict[str, nn.Module], path: Path
) -> dict[str, str]:
    """File component -> model component; a bare-model file goes where its model class says."""
    if list(parts) == [""] and "" not in comps and prefix_of(config, "") in comps:
        return {"": prefix_of(config, "")}
    return assign_components(
        list(parts), comps, {p: set(part_modules(config, p, s)) for p, s in parts.items()}, path
    )


def split_parts(config: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict]:
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in config["components"]}
    for key, t in tensors.items():
        part = next((p for p in parts if p and key.startswith(p + ".")), "" if "" in parts else None)
        if part is None:
            raise AdapterFileError(f"{path}: key {key!r} belongs to no component of adapter_config.json")
        parts[part][key[len(part) + 1 :] if part else key] = t
    return parts


def read_foreign(fmt: str, weights: Path, config: dict[str, Any] | None) -> LoraSet:
    tensors, metadata = read_tensors(weights)
    if fmt == "kohya":
        return read_kohya(weights, tensors, metadata)
    return read_diffusers(weights, tensors, metadata, config)


def studio_as_lora_set(config: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> LoraSet:
    parts = {}
    for part, state in split_parts(config, tensors, path).items():
        spec = spec_from_dict(config["components"][part]["spec"], path)
        if not isinstance(spec, LoraSpec):
            raise AdapterError(
                f"{path}: method {spec.method!r} has no plain LoRA form; only LoRA converts to diffusers/kohya"
            )
        parts[prefix_of(config, part)] = plain_factors_from_state(spec, state)
    return LoraSet(parts, dict(config.get("metadata", {})), config.get("base_model_id", ""))


def prefix_of(config: dict[str, Any], part: str) -> str:
    """Pipeline component of a studio part ("" parts: guessed from the recorded model class)."""
    if part:
        return part
    entry = config["components"][part]
    return prefix_for_class(entry.get("model_class", ""), entry.get("model_module", ""))


def spec_from_dict(data: dict[str, Any], path: Path) -> AdapterSpec:
    try:
        return AdapterSpec.from_dict(data)
    except (AdapterError, TypeError) as err:
        raise AdapterFileError(f"{path}: bad adapter spec ({err})") from None


def check_fits(
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


def apply(
    plans: list[tuple[nn.Module, AdapterSpec, dict[str, torch.Tensor]]], name: str, strength: float
) -> None:
    """Inject and fill every part; on any failure remove what was added (the model is unchanged)."""
    if hasattr(nn.ModuleDict(), name):  # base.inject would fail half-way on such a name
        raise AdapterError(f"adapter name {name!r} is a torch attribute name; pick another")
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


def studio_config(
    parts: dict[str, tuple[AdapterSpec, dict[str, torch.Tensor], nn.Module | None, list[str]]],
    name: str,
    base_model_id: str,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """adapter_config.json; ``parts``: component -> (spec, tensors, model or None, adapted modules)."""
    comps = {}
    for part, (spec, state, module, modules) in parts.items():
        entry: dict[str, Any] = {
            "spec": spec.to_dict(),
            "modules": sorted(modules),
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
        "n_params": sum(t.numel() for _, s, _, _ in parts.values() for t in s.values()),
    }


def write_studio(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    slim = {k: v for k, v in config.items() if k != "components"}
    slim["components"] = {
        p: {k: v for k, v in e.items() if k != "shapes"} for p, e in config["components"].items()
    }
    with atomic_folder(folder) as tmp:
        write_json(tmp / CONFIG_NAME, config)
        write_tensors(tmp / WEIGHTS_NAME, tensors, {"studio.config": json.dumps(slim, sort_keys=True)})
    return folder


def prefixed(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {(f"{p}.{k}" if p else k): t for p, state in parts.items() for k, t in state.items()}


def write_plain(
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
    comps = comps or {}
    unet = comps["unet"] if "unet" in comps else comps.get("")
    return write_kohya(dst, renamed, name, unet)
