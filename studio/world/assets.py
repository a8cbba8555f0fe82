"""Where the world's shipped models live, and one loader per model slot.

Each loader defaults to the shipped asset and also takes a local path to a real checkpoint,
always through the library's own loader (no conversion, no hub access):

===================  ======================================================================
``load_vit``         timm: a ``local-dir`` folder (config.json + weights, e.g. a downloaded
                     ``timm/vit_base_patch16_224.augreg_in21k`` repo) or a single weights file
                     (``.safetensors`` / ``.pth`` / ``.bin``) plus ``arch=``.
``load_dinov2``      as ``load_vit``; a single file may be an original DINOv2 checkpoint
                     (timm's filter converts its keys), ``arch`` defaults to ViT-S/14 DINOv2.
``load_clip``        open_clip: a ``local-dir`` folder (open_clip_config.json + weights) or a
                     checkpoint file plus ``model_name=`` (a built-in config such as
                     ``"ViT-B-32"``). Returns ``(model, preprocess, tokenizer)``.
``load_diffusion``   diffusers: any pipeline folder ``DiffusionPipeline.from_pretrained``
                     reads (Stable Diffusion 1.x/2.x, SDXL, FLUX, ...).
``load_pointmap``    the two-view pointmap model (``studio.world.pointmap_model``).
===================  ======================================================================
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

VIT = "vit-tiny-world"
DINOV2 = "dinov2-tiny-world"
CLIP = "clip-tiny-world"
DIFFUSION = "diffusion-tiny"
POINTMAP = "pointmap-tiny"
ASSET_NAMES = (VIT, DINOV2, CLIP, DIFFUSION, POINTMAP)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def assets_dir() -> Path:
    """The shipped assets folder (``$STUDIO_ASSETS`` overrides it)."""
    env = os.environ.get("STUDIO_ASSETS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "assets"


def asset_path(name: str) -> Path:
    """Folder of one shipped model; raises with the rebuild command if it is missing."""
    if name not in ASSET_NAMES:
        raise KeyError(f"unknown world asset {name!r}; known: {', '.join(ASSET_NAMES)}")
    path = assets_dir() / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"world asset {path} is missing; rebuild it with `studio world build --only {name}`"
        )
    return path


def _timm_model(
    path: str | os.PathLike | None, default: str, arch: str | None, **kwargs: Any
) -> torch.nn.Module:
    import timm

    folder = Path(path) if path is not None else asset_path(default)
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} is not a timm folder (no config.json)")
        return timm.create_model(f"local-dir:{folder}", pretrained=True, **kwargs).eval()
    if folder.suffix not in WEIGHT_SUFFIXES or not folder.exists():
        raise FileNotFoundError(
            f"{folder}: expected a timm folder or a weights file ({', '.join(WEIGHT_SUFFIXES)})"
        )
    if arch is None:
        raise ValueError(
            f"{folder} is a single weights file: pass arch= (the timm architecture it belongs to)"
        )
    overlay = {"file": str(folder), "hf_hub_id": None, "url": None}
    # timm drops a head whose size differs from the config's class count; tell it the file's own.
    overlay["num_classes"] = _head_classes(folder, timm.models.get_pretrained_cfg_value(arch, "classifier"))
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()


def _head_classes(file: Path, classifier: str | None) -> int:
    """Output size of the classifier stored in a weights file (0: the file has no head)."""
    name = f"{classifier or 'head'}.weight"
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), "pt") as f:
            return f.get_slice(name).get_shape()[0] if name in f.keys() else 0
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    state = state.get("state_dict", state.get("model", state))
    return int(state[name].shape[0]) if name in state else 0


def load_vit(
    path: str | os.PathLike | None = None, arch: str | None = None, **kwargs: Any
) -> torch.nn.Module:
    """A timm ViT: the shipped ``vit-tiny-world`` or a real checkpoint (folder, or file + ``arch``).

    Extra keyword arguments go to ``timm.create_model`` (e.g. ``num_classes=0`` for features).
    """
    return _timm_model(path, VIT, arch, **kwargs)


def load_dinov2(
    path: str | os.PathLike | None = None, arch: str | None = "vit_small_patch14_dinov2", **kwargs: Any
) -> torch.nn.Module:
    """A DINOv2-architecture backbone: the shipped ``dinov2-tiny-world`` or a real checkpoint.

    A single file (timm's or Meta's original ``dinov2_vits14_pretrain.pth``) needs the matching
    ``arch`` (default ``vit_small_patch14_dinov2``; ``..._reg4_dinov2`` for register models).
    """
    if path is not None and Path(path).is_file():
        kwargs.setdefault("num_classes", 0)
    return _timm_model(path, DINOV2, arch, **kwargs)


def load_clip(
    path: str | os.PathLike | None = None, model_name: str | None = None, device: str = "cpu"
) -> tuple[torch.nn.Module, Any, Any]:
    """An open_clip model, its eval preprocess and its tokenizer.

    ``path``: None (the shipped ``clip-tiny-world``), an open_clip ``local-dir`` folder, or a
    checkpoint file with ``model_name`` naming its config (built-in or added with
    ``open_clip.add_model_config``).
    """
    import open_clip

    folder = Path(path) if path is not None else asset_path(CLIP)
    if folder.is_dir():
        name = f"local-dir:{folder}"
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
        return model.eval(), preprocess, open_clip.get_tokenizer(name)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist")
    if model_name is None:
        raise ValueError(
            f"{folder} is a checkpoint file: pass model_name= (its open_clip config, e.g. 'ViT-B-32')"
        )
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=str(folder), device=device
    )
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def load_diffusion(
    path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    **kwargs: Any,
) -> Any:
    """A diffusers pipeline folder (the shipped ``diffusion-tiny`` or e.g. an SD/SDXL/FLUX folder).

    ``DiffusionPipeline.from_pretrained`` picks the pipeline class from model_index.json; extra
    keyword arguments go to it (e.g. ``variant="fp16"``). Never touches the network.
    """
    from diffusers import DiffusionPipeline

    folder = Path(path) if path is not None else asset_path(DIFFUSION)
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    with (
        warnings.catch_warnings()
    ):  # newer diffusers rename torch_dtype to dtype; older ones know only torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(
            str(folder), torch_dtype=dtype, local_files_only=True, **kwargs
        )
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pointmap(path: str | os.PathLike | None = None) -> Any:
    """The two-view pointmap model (image pair -> per-pixel 3D points + confidence)."""
    from studio.world import pointmap_model

    folder = Path(path) if path is not None else asset_path(POINTMAP)
    return pointmap_model.load_pointmap(str(folder))


def clip_scorer(
    device: str = "cpu", path: str | os.PathLike | None = None, model_name: str | None = None
) -> Any:
    """A :class:`studio.world.clip_score.WorldClipScorer` on the shipped (or given) CLIP."""
    from studio.world.clip_score import WorldClipScorer

    model, _, tokenizer = load_clip(path, model_name=model_name, device=device)
    return WorldClipScorer(model, tokenizer, device)
