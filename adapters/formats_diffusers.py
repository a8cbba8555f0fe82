"""diffusers / PEFT LoRA files: ``<component>.<module>.lora_A.weight`` / ``lora_B.weight``.

The layout ``pipe.save_lora_weights`` writes and ``pipe.load_lora_weights`` reads: keys
prefixed by the pipeline component ("unet", "transformer", "text_encoder"), and the
LoraConfig of each component (r, lora_alpha, rank/alpha patterns, use_rslora) as JSON in
the safetensors metadata under diffusers' ``lora_adapter_metadata`` key.  A PEFT folder
(``PeftModel.save_pretrained``) keys its tensors ``base_model.model.<module>`` and keeps
the LoraConfig in ``adapter_config.json``.  Without any config, diffusers' convention
applies: alpha = rank (scale 1) unless a ``<module>.alpha`` tensor says otherwise.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.formats_io import AdapterFileError, write_tensors
from adapters.formats_plain import COMPONENTS, LoraSet, PlainLora

#: diffusers' safetensors metadata key for the LoraConfig (diffusers.loaders.lora_base).
METADATA_KEY = "lora_adapter_metadata"
#: The file name ``load_lora_weights(folder)`` looks for.
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_PEFT_PREFIX = "base_model.model."


def is_diffusers_keys(keys: list[str]) -> bool:
    return any(
        ".lora_A." in k or ".lora_B." in k or "lora_linear_layer" in k or "_lora.down" in k for k in keys
    ) or any(".lora.down." in k for k in keys)


def _to_peft_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older diffusers layouts (attention processors, ``lora_linear_layer``) to PEFT names."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    if any("lora_linear_layer" in k or "to_out_lora" in k for k in tensors):
        tensors = convert_state_dict_to_peft(tensors)
    if any(".lora.down." in k or "_lora.down." in k or ".processor." in k for k in tensors):
        tensors = convert_unet_state_dict_to_peft(tensors)
    return tensors


def _component_config(config: dict[str, Any], comp: str) -> dict[str, Any]:
    """The LoraConfig entries of one component from diffusers' prefixed metadata."""
    if comp and any(k.startswith(comp + ".") for k in config):
        return {k[len(comp) + 1 :]: v for k, v in config.items() if k.startswith(comp + ".")}
    return {k: v for k, v in config.items() if not any(k.startswith(c + ".") for c in COMPONENTS)}


def _alpha_for(module: str, rank: int, cfg: dict[str, Any], alphas: dict[str, float]) -> tuple[float, bool]:
    from peft.utils.other import get_pattern_key

    if module in alphas:
        return alphas[module], False
    if "lora_alpha" not in cfg:
        return float(rank), False  # diffusers: no alpha anywhere means scale 1
    pattern = cfg.get("alpha_pattern") or {}
    key = get_pattern_key(list(pattern), module)
    return float(pattern.get(key, cfg["lora_alpha"])), bool(cfg.get("use_rslora", False))


def read_diffusers(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], peft_config: dict[str, Any] | None
) -> LoraSet:
    """A LoraSet from a diffusers/PEFT state dict (keys may carry a component prefix)."""
    tensors = {(k[len(_PEFT_PREFIX) :] if k.startswith(_PEFT_PREFIX) else k): v for k, v in tensors.items()}
    tensors = _to_peft_names(tensors)
    config: dict[str, Any] = dict(peft_config or {})
    if METADATA_KEY in metadata:
        try:
            config.update(json.loads(metadata[METADATA_KEY]))
        except json.JSONDecodeError:
            raise AdapterFileError(f"{path}: corrupt {METADATA_KEY} metadata (not JSON)") from None
    factors: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    alphas: dict[str, dict[str, float]] = {}
    for key, t in tensors.items():
        comp, _, rest = key.partition(".")
        if comp not in COMPONENTS:
            comp, rest = "", key
        if rest.endswith(".alpha"):
            alphas.setdefault(comp, {})[rest[: -len(".alpha")]] = float(t.item())
            continue
        for kind in ("lora_A", "lora_B"):
            marker = f".{kind}.weight"
            if rest.endswith(marker):
                factors.setdefault((comp, rest[: -len(marker)]), {})[kind] = t
                break
        else:
            raise AdapterFileError(
                f"{path}: key {key!r} is not a plain LoRA factor (DoRA, LoRA bias and embedding LoRAs are "
                "not supported)"
            )
    parts: dict[str, dict[str, PlainLora]] = {}
    for (comp, module), pair in sorted(factors.items()):
        full = f"{comp}.{module}" if comp else module
        for kind in ("lora_A", "lora_B"):
            if kind not in pair:
                raise AdapterFileError(
                    f"{path}: key {full + '.' + kind + '.weight'!r} is missing (its pair is there)"
                )
        down, up = pair["lora_A"], pair["lora_B"]
        if down.dim() not in (2, 4) or up.shape[1] != down.shape[0]:
            raise AdapterFileError(
                f"{path}: key {full + '.lora_B.weight'!r} has shape {tuple(up.shape)}, which does not fit "
                f"lora_A {tuple(down.shape)}"
            )
        alpha, rslora = _alpha_for(
            module, down.shape[0], _component_config(config, comp), alphas.get(comp, {})
        )
        parts.setdefault(comp, {})[module] = PlainLora(down, up, alpha, rslora, f"{full}.lora_A.weight")
    if not parts:
        raise AdapterFileError(f"{path}: no LoRA tensors in the file")
    extra = json.loads(metadata.get("studio.metadata", "{}") or "{}")
    return LoraSet(
        parts,
        extra,
        metadata.get("studio.base_model_id", (peft_config or {}).get("base_model_name_or_path") or ""),
    )


def prefix_for_class(cls: str, module: str) -> str:
    """The pipeline component a bare model of class ``cls`` (from python module ``module``) plays."""
    if cls.startswith("UNet"):
        return "unet"
    if "Transformer" in cls and module.startswith("diffusers"):
        return "transformer"
    if cls.startswith("CLIPText"):
        return "text_encoder"
    return ""


def default_prefix(model: nn.Module) -> str:
    return prefix_for_class(type(model).__name__, type(model).__module__)


def write_diffusers(path: Path, lora_set: LoraSet, prefixes: dict[str, str]) -> Path:
    """Write ``lora_set`` as one diffusers LoRA file (or ``<folder>/pytorch_lora_weights.safetensors``).

    Each module's scale is folded into ``lora_B`` and the LoraConfig says alpha = r (scale
    1), diffusers' convention for files without metadata: the file then loads the same
    whether or not a reader uses the metadata (``load_lora_adapter`` on a bare model does
    not, unless told ``use_safetensors=True``).  Written by hand rather than with
    ``save_lora_weights`` because that is a classmethod of one pipeline type.
    """
    if path.suffix != ".safetensors":
        path = path / WEIGHT_NAME
    tensors: dict[str, torch.Tensor] = {}
    config: dict[str, Any] = {}
    for comp, loras in lora_set.parts.items():
        prefix = prefixes.get(comp, comp)
        dot = f"{prefix}." if prefix else ""
        for m, lo in loras.items():
            tensors[f"{dot}{m}.lora_A.weight"] = lo.down
            tensors[f"{dot}{m}.lora_B.weight"] = lo.up if lo.scale == 1.0 else lo.up * lo.scale
        r = Counter(lo.rank for lo in loras.values()).most_common(1)[0][0]
        rank_pattern = {f"^{re.escape(m)}$": lo.rank for m, lo in loras.items() if lo.rank != r}
        entry = {
            "r": r,
            "lora_alpha": r,
            "rank_pattern": rank_pattern,
            "alpha_pattern": dict(rank_pattern),
            "target_modules": sorted(loras),
        }
        config.update({f"{dot}{k}": v for k, v in entry.items()})
    metadata = {
        METADATA_KEY: json.dumps(config, sort_keys=True),
        "studio.base_model_id": lora_set.base_model_id,
        "studio.metadata": json.dumps(lora_set.metadata, sort_keys=True, default=str),
    }
    return write_tensors(path, tensors, metadata)
