"""kohya-ss / A1111 LoRA files: ``lora_unet_<module path with _>.lora_down.weight``.

Each module has ``.lora_down.weight`` (r, in[, kh, kw]), ``.lora_up.weight`` (out, r[, 1, 1])
and a scalar ``.alpha`` (scale = alpha / r; a missing alpha means alpha = r).  Text
encoders use ``lora_te_`` (``lora_te1_`` / ``lora_te2_`` for SDXL's two encoders).  Training
metadata is kept as ``ss_*`` strings.  The underscored names are resolved back to dotted
module names against the model's real module names (``down_blocks_0`` could be
``down_blocks.0`` or ``down.blocks_0``), or against the names the studio recorded at export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.formats_io import AdapterFileError, write_tensors
from adapters.formats_plain import LoraSet, PlainLora, module_names

#: kohya key prefix -> pipeline component.
PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
#: Metadata entry where the studio records kohya name -> dotted module name at export.
NAMES_KEY = "studio.module_names"
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def is_kohya_keys(keys: list[str]) -> bool:
    return bool(keys) and all(k.startswith(tuple(PREFIXES)) for k in keys)


def _split(key: str) -> tuple[str, str, str]:
    """(component, underscored module, suffix) of a kohya key."""
    prefix = max((p for p in PREFIXES if key.startswith(p)), key=len)
    rest = key[len(prefix) :]
    for suffix in _SUFFIXES:
        if rest.endswith(suffix):
            return PREFIXES[prefix], rest[: -len(suffix)], suffix
    raise AdapterFileError(
        f"key {key!r} is not a plain kohya LoRA tensor (LyCORIS / LoHa / DoRA keys are not supported)"
    )


def read_kohya(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> LoraSet:
    """A LoraSet whose module names are still underscored (see ``resolve_names``)."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        try:
            comp, module, suffix = _split(key)
        except AdapterFileError as err:
            raise AdapterFileError(f"{path}: {err}") from None
        groups.setdefault((comp, module), {})[suffix] = t
    exact_alpha = metadata.get("ss_network_alpha", "")
    parts: dict[str, dict[str, PlainLora]] = {}
    for (comp, module), g in sorted(groups.items()):
        prefix = next(p for p, c in PREFIXES.items() if c == comp)
        for suffix in _SUFFIXES[:2]:
            if suffix not in g:
                raise AdapterFileError(
                    f"{path}: key {prefix + module + suffix!r} is missing (its pair is there)"
                )
        down, up = g[".lora_down.weight"], g[".lora_up.weight"]
        if up.shape[1] != down.shape[0]:
            raise AdapterFileError(
                f"{path}: key {prefix + module + '.lora_up.weight'!r} has shape {tuple(up.shape)}, which does "
                f"not fit lora_down {tuple(down.shape)}"
            )
        alpha = float(g[".alpha"].item()) if ".alpha" in g else float(down.shape[0])
        # The alpha tensor is often fp16/fp32; the metadata string keeps the exact value.
        try:
            if exact_alpha and torch.tensor(float(exact_alpha), dtype=g[".alpha"].dtype).item() == alpha:
                alpha = float(exact_alpha)
        except (ValueError, KeyError):
            pass
        parts.setdefault(comp, {})[module] = PlainLora(
            down, up, alpha, key=f"{prefix}{module}.lora_down.weight"
        )
    if not parts:
        raise AdapterFileError(f"{path}: no LoRA tensors in the file")
    extra = json.loads(metadata.get("studio.metadata", "{}") or "{}")
    extra.update({k: v for k, v in metadata.items() if k.startswith("ss_")})
    # ss_sd_model_name is often a local checkpoint file name: shown, never enforced.
    out = LoraSet(parts, extra, metadata.get("studio.base_model_id", ""))
    out.metadata.setdefault("_kohya_names", json.loads(metadata.get(NAMES_KEY, "{}") or "{}"))
    return out


def underscored(name: str) -> str:
    return name.replace(".", "_")


def resolve_names(lora_set: LoraSet, path: Path, comps: dict[str, nn.Module] | None) -> LoraSet:
    """Map underscored module names to the dotted names of the real modules.

    ``comps``: component -> module of the model; None resolves with the names recorded at
    export (a studio-written file) and fails for other files.
    """
    recorded: dict[str, str] = lora_set.metadata.pop("_kohya_names", {})
    parts: dict[str, dict[str, PlainLora]] = {}
    for comp, loras in lora_set.parts.items():
        prefix = next(p for p, c in PREFIXES.items() if c == comp)
        table: dict[str, list[str]] = {}
        target_comp = comp
        if comps is not None:
            if comp not in comps:
                target_comp = "" if list(comps) == [""] else ("transformer" if comp == "unet" else comp)
            if target_comp not in comps:
                raise AdapterFileError(
                    f"{path}: the file has {prefix}* keys (a {comp} LoRA) but the model has no {comp}"
                )
            for name in module_names(comps[target_comp]):
                table.setdefault(underscored(name), []).append(name)
                if comp.startswith("text_encoder") and not name.startswith("text_model."):
                    # transformers 5 dropped CLIP's text_model level; kohya names keep it.
                    table.setdefault("text_model_" + underscored(name), []).append(name)
        for module, lo in loras.items():
            key = f"{prefix}{module}"
            if comps is None:
                if key not in recorded:
                    raise AdapterFileError(
                        f"{path}: cannot tell which module {key!r} is without the base model; "
                        "pass the base model (--base-model) to resolve kohya names"
                    )
                target_comp, _, dotted = recorded[key].partition(":")
                names = [dotted]
            else:
                names = table.get(module, [])
            if not names:
                raise AdapterFileError(
                    f"{path}: key {key + '.lora_down.weight'!r} matches no module of the model; "
                    "is this LoRA for another base model?"
                )
            if len(names) > 1:
                raise AdapterFileError(f"{path}: key {key!r} could be any of the modules {names}")
            parts.setdefault(target_comp, {})[names[0]] = lo
    return LoraSet(parts, lora_set.metadata, lora_set.base_model_id)


def _base_version(module: nn.Module | None) -> str:
    dim = getattr(getattr(module, "config", None), "cross_attention_dim", None)
    return {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}.get(dim, "unknown")


def write_kohya(path: Path, lora_set: LoraSet, name: str, unet: nn.Module | None = None) -> Path:
    """Write ``lora_set`` (dotted names, components unet/transformer/text_encoder[_2]) as kohya."""
    comps = set(lora_set.parts)
    two_te = "text_encoder_2" in comps
    tensors: dict[str, torch.Tensor] = {}
    recorded: dict[str, str] = {}
    dims: set[int] = set()
    alphas: set[float] = set()
    for comp, loras in lora_set.parts.items():
        if comp in ("unet", "transformer", ""):
            prefix = "lora_unet_"
        elif comp == "text_encoder":
            prefix = "lora_te1_" if two_te else "lora_te_"
        elif comp == "text_encoder_2":
            prefix = "lora_te2_"
        else:
            raise AdapterFileError(f"{path}: kohya files have no place for a {comp} LoRA")
        for m, lo in loras.items():
            te_name = comp.startswith("text_encoder") and not m.startswith("text_model.")
            key = prefix + ("text_model_" if te_name else "") + underscored(m)
            # kohya has no rsLoRA flag: store the alpha that gives the same scale as alpha / r.
            alpha = lo.alpha if not lo.rslora else lo.scale * lo.rank
            tensors[f"{key}.lora_down.weight"] = lo.down
            tensors[f"{key}.lora_up.weight"] = lo.up
            tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
            recorded[key] = f"{comp}:{m}"
            dims.add(lo.rank)
            alphas.add(alpha)
    meta: dict[str, Any] = dict(lora_set.metadata)
    ss = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(dims)),
        "ss_network_alpha": repr(max(alphas)) if len(alphas) == 1 else "Dynamic",
        "ss_output_name": name,
        "ss_sd_model_name": lora_set.base_model_id,
        "ss_base_model_version": str(meta.get("ss_base_model_version", _base_version(unet))),
        "ss_v2": str(_base_version(unet) == "sd_v2"),
    }
    for key, ss_key in (("steps", "ss_max_train_steps"), ("lr", "ss_learning_rate"), ("seed", "ss_seed")):
        if key in meta:
            ss[ss_key] = str(meta[key])
    ss.update({k: str(v) for k, v in meta.items() if k.startswith("ss_")})
    studio_meta = {k: v for k, v in meta.items() if not k.startswith("ss_")}
    ss.update(
        {
            NAMES_KEY: json.dumps(recorded, sort_keys=True),
            "studio.base_model_id": lora_set.base_model_id,
            "studio.metadata": json.dumps(studio_meta, sort_keys=True, default=str),
        }
    )
    return write_tensors(path, tensors, ss)
