"""The generation-time service every surface shares (UI, CLI, tests).  No gradio here.

One ``StudioService`` owns the base pipelines and the loaded adapters.  All model work
runs under one lock (one GPU queue): a request's adapter stack, strengths and seed are
applied inside the lock and reset before it is released, so concurrent users never see
each other's adapters.  ``render`` batches cells that share steps / guidance / size into
one pipeline call whose rows carry their own strengths and seeds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters.base import AdapterError, AdapterSpec, remove, unmerge
from studio.schedules import step_end_callback
from studio.service_adapters import AdapterRecord, compress_record
from studio.service_components import (  # noqa: F401 - ADAPTER_COMPONENTS: re-export
    ADAPTER_COMPONENTS,
    _fuse,
    _names,
    _zero,
    components,
    quantized_copy,
)
from studio.service_files import _clean_name, safe_path, scan_adapters
from studio.service_grid import GridResult, GridSpec, plan_grid
from studio.service_models import BaseModel, list_base_models
from studio.service_strengths import StrengthPlan
from studio.service_types import AdapterInfo, AdapterUse, GenerationSettings
from studio.service_vision import VisionModel
from studio.service_vision_load import vision_folders
from studio.service_vision_mixin import VisionServiceMixin

#: progress(done, total, message)
Progress = Callable[[int, int, str], None]


@dataclass
class RenderedImage:
    image: Any  # PIL.Image with info["parameters"] set
    settings: GenerationSettings
    parameters: str
    seconds: float


class StudioService(VisionServiceMixin):
    """Base models, adapters and generation behind one lock (vision models: ``VisionServiceMixin``)."""

    def __init__(
        self,
        model_dirs: Iterable[str | Path] = (),
        adapter_dirs: Iterable[str | Path] = (),
        output_dir: str | Path | None = None,
        device: str | None = None,
        dtype: torch.dtype = torch.float32,
        max_batch: int = 8,
        max_pipelines: int = 2,
    ) -> None:
        self.model_dirs = [Path(p) for p in model_dirs]
        self.adapter_dirs = [Path(p) for p in adapter_dirs]
        self.output_dir = Path(output_dir) if output_dir else None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self.max_batch = max_batch
        self.max_pipelines = max_pipelines
        self.lock = threading.RLock()
        self._pipes: dict[tuple[str, str], Any] = {}
        self._records: dict[str, AdapterRecord] = {}
        self._vision: dict[str, VisionModel] = {}
        #: Base model preselected in the UI and used for loading adapters (None: first listed).
        self.default_model: str | None = None

    # ------------------------------------------------------------------ base models
    def list_base_models(self) -> list[dict[str, str]]:
        return [{"name": m.name, "kind": m.kind, "source": m.source} for m in self._base_models()]

    def _base_models(self) -> list[BaseModel]:
        return list_base_models(self.model_dirs)

    def default_base_model(self) -> str:
        return self.default_model or self._base_models()[0].name

    def pipeline(self, name: str, precision: str = "fp") -> Any:
        """The cached pipeline for base model ``name`` (loads it on first use)."""
        with self.lock:
            key = (name, precision)
            if key not in self._pipes:
                if precision == "4bit":
                    pipe = self._quantized_copy(self.pipeline(name, "fp"))
                else:
                    models = {m.name: m for m in self._base_models()}
                    if name not in models:
                        raise AdapterError(f"unknown base model {name!r}; known: {', '.join(models)}")
                    pipe = models[name].load().to(self.device)
                    if self.dtype != torch.float32:
                        pipe = pipe.to(dtype=self.dtype)
                while len(self._pipes) >= self.max_pipelines:
                    self._pipes.pop(next(k for k in self._pipes if k != (name, "fp")))
                self._pipes[key] = pipe
            return self._pipes[key]

    def _quantized_copy(self, pipe: Any) -> Any:
        """A copy whose UNet linears are SVDQuant 4-bit, calibrated on a short sampling run."""
        return quantized_copy(pipe)

    # ------------------------------------------------------------------ adapters
    def list_adapters(self) -> list[dict[str, Any]]:
        """Loaded adapters, then adapter files in the configured folders not loaded yet."""
        with self.lock:
            out = [r.info().to_dict() for r in self._records.values()]
            loaded_paths = {r.path for r in self._records.values()}
        vision = vision_folders(self.adapter_dirs)
        for path in scan_adapters(self.adapter_dirs):
            if any(path == v or path.is_relative_to(v) for v in vision):
                continue  # a trained vision model: the Vision tab loads it (load_vision_model)
            if str(path) not in loaded_paths:
                out.append(AdapterInfo(name=path.stem, path=str(path), loaded=False).to_dict())
        return out

    def add_adapter(
        self, name: str, parts: dict[str, tuple[AdapterSpec, dict[str, torch.Tensor]]], **meta: Any
    ) -> AdapterInfo:
        """Register an adapter made in memory (training result, compression, tests)."""
        with self.lock:
            if name in self._records:
                raise AdapterError(f"an adapter named {name!r} is already loaded")
            self._records[name] = AdapterRecord(name, parts, **meta)
            return self._records[name].info()

    def load_adapter(
        self, path: str | Path, name: str | None = None, base_model: str | None = None
    ) -> AdapterInfo:
        """Load an adapter file or folder from inside the configured adapter folders."""
        resolved = safe_path(path, self.adapter_dirs)
        try:
            from adapters import formats
        except ImportError:
            raise AdapterError(
                "loading adapter files needs adapters.formats, which is not installed yet"
            ) from None
        with self.lock:
            pipe = self.pipeline(base_model or self.default_base_model())
            comps = components(pipe)
            name = name or _clean_name(resolved.stem)
            if name in self._records:
                raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first")
            try:
                name = formats.load_adapter(pipe, str(resolved), name)
            except AdapterError:
                raise
            except Exception as err:  # a corrupt or foreign file: one clear line
                raise AdapterError(f"cannot load {resolved.name}: {err}") from None
            record = AdapterRecord.capture(
                comps, name, path=str(resolved), base_model=base_model or self.default_base_model()
            )
            try:
                record.metadata = dict(
                    getattr(formats.read_adapter_info(str(resolved)), "metadata", {}) or {}
                )
            except Exception:  # noqa: BLE001 - metadata is optional
                pass
            for module in comps.values():
                for host_name in _names(module):
                    if host_name == name:
                        _zero(module, name)
            self._records[name] = record
            return record.info()

    def add_example_adapters(self, base_model: str = "tiny-sd") -> list[str]:
        """The shipped example adapters: world assets when present, else seeded random LoRAs."""
        from studio.service_models import EXAMPLE_LORAS, example_lora_parts

        added = []
        with self.lock:
            unet = components(self.pipeline(base_model))["unet"]
            for name in EXAMPLE_LORAS:
                if name not in self._records:
                    self.add_adapter(
                        name, example_lora_parts(unet, name), path=f"builtin:{name}", base_model=base_model
                    )
                    added.append(name)
        return added

    def adapter_sources(self, names: Iterable[str]) -> dict[str, str]:
        """name -> file path (or builtin:NAME) for re-rendering a grid elsewhere."""
        with self.lock:
            return {n: self._records[n].path for n in names if n in self._records}

    def ensure_adapters(self, sources: dict[str, str], base_model: str | None = None) -> None:
        """Load every adapter of ``sources`` (name -> path) that is not loaded yet."""
        for name, path in sources.items():
            if name in self._records:
                continue
            if path.startswith("builtin:"):
                self.add_example_adapters(base_model or "tiny-sd")
            elif path:
                self.load_adapter(path, name, base_model)
            else:
                raise AdapterError(f"adapter {name!r} was made in memory and cannot be reloaded")

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            self._record(name)
            for pipe in self._pipes.values():
                for module in components(pipe).values():
                    if name in _names(module):
                        remove(module, name)
            del self._records[name]

    def adapter_info(self, name: str) -> AdapterInfo:
        with self.lock:
            return self._record(name).info()

    def inspect_file(self, path: str | Path) -> dict[str, Any]:
        """Method, rank, targets, base model and metadata of an adapter file (not loaded)."""
        resolved = safe_path(path, self.adapter_dirs)
        import dataclasses

        from adapters import formats

        return dataclasses.asdict(formats.read_adapter_info(str(resolved)))

    def compress_adapter(self, name: str, rank: int, new_name: str | None = None) -> dict[str, Any]:
        """A rank-``rank`` copy of adapter ``name`` by truncated SVD; returns its info and error."""
        with self.lock:
            record, errors = compress_record(self._record(name), rank, new_name or f"{name}-r{rank}")
            if record.name in self._records:
                raise AdapterError(f"an adapter named {record.name!r} is already loaded")
            self._records[record.name] = record
            return {"info": record.info().to_dict(), "error": errors}

    def _record(self, name: str) -> AdapterRecord:
        if name not in self._records:
            raise AdapterError(
                f"no adapter named {name!r} is loaded; loaded: {', '.join(self._records) or 'none'}"
            )
        return self._records[name]

    # ------------------------------------------------------------------ grids
    def render_grid(
        self,
        spec: GridSpec | dict | GridResult,
        progress: Progress | None = None,
        batched: bool = True,
        clip: bool = False,
    ) -> GridResult:
        """Plan (or take a planned / sidecar) grid and render every cell in batched passes."""
        if isinstance(spec, dict):
            spec = GridSpec.from_dict(spec)
        result = spec if isinstance(spec, GridResult) else plan_grid(spec)
        for key in {(c.settings.base_model, c.settings.precision) for c in result.cells}:
            self.pipeline(*key)  # load outside the timed part
        start = time.perf_counter()
        images = self.render([c.settings for c in result.cells], progress, batched=batched)
        for cell, img in zip(result.cells, images):
            cell.image = img.image
        result.seconds = time.perf_counter() - start
        if clip:
            scores = self.clip_scores(
                [c.image for c in result.cells], [c.settings.prompt for c in result.cells]
            )
            for cell, score in zip(result.cells, scores or []):
                cell.clip_score = score
        return result

    def clip_scores(self, images: list[Any], prompts: list[str]) -> list[float] | None:
        """Cosine similarity of image and prompt under the tiny world's CLIP (None if absent)."""
        try:
            from studio.world.assets import load_clip
        except ImportError:
            return None
        with self.lock:
            if getattr(self, "_clip", None) is None:
                self._clip = load_clip(device=self.device)
            return _clip_scores(self._clip, images, prompts)

    # ------------------------------------------------------------------ generation
    def generate(
        self, settings: GenerationSettings | dict, progress: Progress | None = None
    ) -> RenderedImage:
        return self.render([settings], progress)[0]

    def render(
        self,
        cells: Sequence[GenerationSettings | dict],
        progress: Progress | None = None,
        batched: bool = True,
    ) -> list[RenderedImage]:
        """Render every cell; cells with equal ``batch_key`` share batched pipeline calls."""
        cells = [c if isinstance(c, GenerationSettings) else GenerationSettings.from_dict(c) for c in cells]
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(cells):
            groups.setdefault(c.batch_key(), []).append(i)
        size = self.max_batch if batched else 1
        batches = [idx[k : k + size] for idx in groups.values() for k in range(0, len(idx), size)]
        total = sum(cells[b[0]].steps for b in batches)
        done = 0
        out: list[RenderedImage | None] = [None] * len(cells)
        with self.lock:
            for batch in batches:

                def step(k: int, n: int, base: int = done) -> None:
                    if progress is not None:
                        progress(base + k, total, f"step {base + k}/{total}")

                for i, img in zip(batch, self._run_batch([cells[i] for i in batch], step)):
                    out[i] = img
                done += cells[batch[0]].steps
        return out  # type: ignore[return-value]

    def _run_batch(
        self, cells: list[GenerationSettings], on_step: Callable[[int, int], None]
    ) -> list[RenderedImage]:
        first = cells[0]
        pipe = self.pipeline(first.base_model, first.precision)
        comps = components(pipe)
        for name in {a.name for c in cells for a in c.adapters}:
            self._record(name).place(comps)
        plan = StrengthPlan(comps, [c.adapters for c in cells])
        steps = first.steps
        fused: list[str] = []
        start = time.perf_counter()
        try:
            plan.apply(0, steps)
            if first.fuse:
                if plan.has_schedule:
                    raise AdapterError("per-timestep schedules cannot be fused; turn fusing off")
                fused = _fuse(comps, {a.name for c in cells for a in c.adapters})
            callback = step_end_callback(
                lambda s: plan.apply(s, steps) if plan.has_schedule else None, steps, on_step=on_step
            )
            result = pipe(
                prompt=[c.prompt for c in cells],
                negative_prompt=[c.negative_prompt for c in cells],
                num_inference_steps=steps,
                guidance_scale=first.guidance,
                width=first.width,
                height=first.height,
                generator=[torch.Generator("cpu").manual_seed(int(c.seed)) for c in cells],
                callback_on_step_end=callback,
                output_type="pil",
            )
        finally:
            for name in fused:
                for module in comps.values():
                    if name in _names(module):
                        unmerge(module, name)
            plan.reset()
        seconds = (time.perf_counter() - start) / len(cells)
        images = []
        for c, img in zip(cells, result.images):
            text = c.parameters_text()
            img.info["parameters"] = text
            images.append(RenderedImage(img, c, text, seconds))
        return images


# ---------------------------------------------------------------------- helpers


def _clip_scores(clip: Any, images: list[Any], prompts: list[str]) -> list[float]:
    """``clip`` is (model, preprocess, tokenizer) as open_clip gives them."""
    model, preprocess, tokenizer = clip
    device = next(model.parameters()).device
    with torch.no_grad():
        pixels = torch.stack([preprocess(im.convert("RGB")) for im in images]).to(device)
        img = model.encode_image(pixels)
        txt = model.encode_text(tokenizer(prompts).to(device))
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
    return [round(float(v), 4) for v in (img * txt).sum(-1)]


def uses(*items: AdapterUse | dict | str) -> list[AdapterUse]:
    """Shorthand: uses("a:0.8", "b") -> [AdapterUse("a", 0.8), AdapterUse("b", 1.0)]."""
    return [AdapterUse.from_any(i) for i in items]
