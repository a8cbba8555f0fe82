"""What the app's buttons do: plain functions over studio.service, UI values in and out.

Every handler turns any failure into ``gr.Error`` with a one-line message (never a
traceback in the page).  GPU work goes through the service lock, and the app puts
those events in one queue with ``concurrency_limit=1``.
"""

from __future__ import annotations

import functools
import inspect
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from adapters.base import AdapterError
from studio.grid import write_grid
from studio.service import StudioService
from studio.service_grid import AXIS_KINDS, Axis, GridSpec
from studio.service_types import AdapterUse, GenerationSettings

SLOTS = 3  # adapter slots in the Generate tab's stack


def user_errors(fn: Callable) -> Callable:
    """Show any exception as a message in the page (works for generator handlers too)."""

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001
                raise _as_message(err) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the page must stay alive
            raise _as_message(err) from None

    return wrapper


def _as_message(err: Exception) -> gr.Error:
    if isinstance(err, gr.Error):
        return err
    if isinstance(err, (AdapterError, ValueError, FileNotFoundError, KeyError)):
        return gr.Error(_one_line(err), print_exception=False)
    return gr.Error(f"{type(err).__name__}: {_one_line(err)}", print_exception=False)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().strip("'\"")
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def parse_blocks(text: str) -> dict[str, float]:
    """``"unet.up_blocks.*=0.5; unet.mid_block.*=0"`` -> {pattern: factor}."""
    out: dict[str, float] = {}
    for part in re.split(r"[;\n]", text or ""):
        if not part.strip():
            continue
        pattern, sep, value = part.rpartition("=")
        if not sep or not pattern.strip():
            raise AdapterError(f"write block factors as PATTERN=FACTOR; got {part.strip()!r}")
        out[pattern.strip()] = float(value)
    return out


class Handlers:
    def __init__(self, service: StudioService, work_dir: str | Path) -> None:
        self.service = service
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ shared
    def adapter_names(self) -> list[str]:
        return [a["name"] for a in self.service.list_adapters() if a["loaded"]]

    def settings(
        self, base_model, prompt, negative, seed, steps, guidance, size, precision, fuse, blocks, *slots
    ) -> GenerationSettings:
        factors = parse_blocks(blocks)
        stack = []
        for k in range(0, len(slots), 3):
            name, strength, schedule = slots[k : k + 3]
            if name:
                stack.append(AdapterUse(name, float(strength), dict(factors), (schedule or "").strip()))
        return GenerationSettings(
            base_model=base_model,
            prompt=prompt or "",
            negative_prompt=negative or "",
            seed=int(seed),
            steps=int(steps),
            guidance=float(guidance),
            width=int(size),
            height=int(size),
            adapters=stack,
            precision=precision,
            fuse=bool(fuse),
        )

    # ------------------------------------------------------------------ generate
    @user_errors
    def generate(self, *values, progress=gr.Progress()) -> tuple[Any, str]:
        s = self.settings(*values)
        result = self.service.generate(s, progress=lambda d, t, m: progress((d, t), desc="sampling"))
        return result.image, result.parameters

    # ------------------------------------------------------------------ compare
    @user_errors
    def grid(self, x_kind, x_values, y_kind, y_values, baseline, clip, *values, progress=gr.Progress()):
        s = self.settings(*values)
        x = Axis.parse(f"{x_kind}={x_values}")
        y = Axis.parse(f"{y_kind}={y_values}") if y_kind and y_kind != "none" else None
        spec = GridSpec(s, x, y, bool(baseline))
        result = self.service.render_grid(
            spec, lambda d, t, m: progress((d, t), desc="grid"), clip=bool(clip)
        )
        folder = self.work_dir / "grids" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        names = {a.name for c in result.cells for a in c.settings.adapters}
        paths = write_grid(result, folder, adapter_sources=self.service.adapter_sources(names))
        labels = [f"{c.row},{c.col}: {c.row_label} / {c.col_label}" for c in result.cells]
        table = [[c.row_label, c.col_label, c.settings.seed, c.clip_score] for c in result.cells]
        cells = {lab: str(folder / f"cells/r{c.row}_c{c.col}.png") for lab, c in zip(labels, result.cells)}
        a, b = labels[0], labels[-1]
        return (
            str(paths["grid"]),
            [str(paths["grid"]), str(paths["sidecar"])],
            table,
            cells,
            gr.Dropdown(choices=labels, value=a),
            gr.Dropdown(choices=labels, value=b),
            (cells[a], cells[b]),
        )

    @user_errors
    def ab(self, cells: dict[str, str], a: str, b: str):
        if not cells or a not in cells or b not in cells:
            raise AdapterError("render a grid first, then pick two of its cells")
        return (cells[a], cells[b])

    # ------------------------------------------------------------------ adapters
    def adapter_table(self) -> list[list[Any]]:
        rows = []
        for a in self.service.list_adapters():
            rows.append([a["name"], a["method"], a["rank"], a["size_bytes"], a["loaded"], a["path"]])
        return rows

    def disk_choices(self) -> list[str]:
        return [a["path"] for a in self.service.list_adapters() if not a["loaded"] and a["path"]]

    def refresh(self):
        names = self.adapter_names()
        return (
            self.adapter_table(),
            gr.Dropdown(choices=self.disk_choices()),
            gr.Dropdown(choices=names),
            *[gr.Dropdown(choices=[""] + names) for _ in range(SLOTS)],
        )

    @user_errors
    def load_path(self, path: str, name: str):
        if not path:
            raise AdapterError("pick or type an adapter path inside the adapter folders")
        info = self.service.load_adapter(path, name.strip() or None)
        return (info.to_dict(), *self.refresh())

    @user_errors
    def upload(self, file: str | None, name: str):
        if not file:
            raise AdapterError("choose a file to upload")
        if not self.service.adapter_dirs:
            raise AdapterError("no adapter folder is configured for uploads")
        target = self.service.adapter_dirs[0] / "uploads"
        target.mkdir(parents=True, exist_ok=True)
        clean = re.sub(r"[^A-Za-z0-9_.\-]", "_", Path(file).name)
        dest = target / clean
        shutil.copyfile(file, dest)
        try:
            info = self.service.load_adapter(dest, name.strip() or None)
        except Exception:
            dest.unlink(missing_ok=True)
            raise
        return (info.to_dict(), *self.refresh())

    @user_errors
    def inspect(self, name: str) -> dict[str, Any]:
        if not name:
            raise AdapterError("pick a loaded adapter")
        return self.service.adapter_info(name).to_dict()

    @user_errors
    def unload(self, name: str):
        if not name:
            raise AdapterError("pick a loaded adapter")
        self.service.unload_adapter(name)
        return ({"unloaded": name}, *self.refresh())

    @user_errors
    def compress(self, name: str, rank: float):
        if not name:
            raise AdapterError("pick a loaded adapter")
        out = self.service.compress_adapter(name, int(rank))
        err = out["error"]
        summary = {"new adapter": out["info"]["name"], "mean relative error": err["mean"], "max": err["max"]}
        return (summary, *self.refresh())

    @user_errors
    def convert(self, name: str, fmt: str) -> str:
        if not name:
            raise AdapterError("pick a loaded adapter")
        path = self.service.adapter_info(name).path
        if not path or path.startswith("builtin:"):
            raise AdapterError(f"{name} has no file to convert (built in or made in memory)")
        from adapters import formats

        dest = self.work_dir / "converted" / f"{name}-{fmt}"
        dest = dest if fmt == "studio" else dest.with_suffix(".safetensors")
        formats.convert(path, str(dest), to=fmt)
        if dest.is_dir():
            return shutil.make_archive(str(dest), "zip", dest)
        return str(dest)

    # ------------------------------------------------------------------ vision
    @user_errors
    def vision(self, model: str, image: Any):
        if image is None:
            raise AdapterError("upload an image first")
        if not model:
            raise AdapterError("pick a vision model")
        task = {v["name"]: v["task"] for v in self.service.list_vision_models()}.get(model)
        if task == "segment":
            overlay, shares = self.service.segment(model, image)
            return shares, overlay
        return self.service.classify(model, image), None

    def vision_source(self, model: str | None) -> str:
        info = {v["name"]: v for v in self.service.list_vision_models()}.get(model or "")
        if info is None:
            return ""
        return f"{info['task']} · {info['size']} px · {info['source']}"

    def refresh_vision(self, value: str | None = None):
        names = [v["name"] for v in self.service.list_vision_models()]
        return (
            gr.Dropdown(choices=names, value=value if value in names else (names or [None])[0]),
            gr.Dropdown(choices=self.service.vision_folders(), value=None),
        )

    @user_errors
    def load_vision(self, path: str):
        if not path:
            raise AdapterError("pick or type a trained vision folder inside the adapter folders")
        models = self.service.load_vision_model(path)
        first = models[0]["name"]
        loaded = ", ".join(m["name"] for m in models)
        return (f"loaded {loaded}: {self.vision_source(first)}", *self.refresh_vision(first))


__all__ = ["AXIS_KINDS", "Handlers", "SLOTS", "parse_blocks", "user_errors"]
