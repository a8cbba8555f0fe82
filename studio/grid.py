"""Grid export: a labelled PNG, A1111-style ``parameters`` chunks, a JSON sidecar, the cells.

Layout on disk (``write_grid(result, folder)``)::

    folder/grid.png        labelled grid; "parameters" chunk + "studio-grid" chunk (the sidecar)
    folder/grid.json       sidecar: every cell's full settings, enough to re-render exactly
    folder/cells/rR_cC.png each cell at native size with its own "parameters" chunk
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from studio.service_grid import GridCell, GridResult
from studio.service_types import GenerationSettings

SIDECAR_VERSION = 1


def png_info(parameters: str, extra: dict[str, str] | None = None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    for key, value in (extra or {}).items():
        info.add_text(key, value)
    return info


def save_png(
    image: Image.Image, path: str | Path, parameters: str, extra: dict[str, str] | None = None
) -> Path:
    """Save with a ``parameters`` text chunk (what A1111 and most viewers read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=png_info(parameters, extra))
    return path


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def compose(result: GridResult, cell_px: int = 128, pad: int = 6) -> Image.Image:
    """The grid image: column labels on top, row labels on the left, a legend below."""
    rows, cols = len(result.row_labels), len(result.col_labels)
    font, small = _font(14), _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def width(text: str, f: ImageFont.ImageFont) -> int:
        return int(probe.textlength(text, font=f))

    left = max([width(t, font) for t in result.row_labels] + [0]) + 2 * pad
    top = 24
    score_h = 16 if any(c.clip_score is not None for c in result.cells) else 0
    legend = result.legend + [f"Y: {', '.join(result.row_labels)}", f"X: {', '.join(result.col_labels)}"]
    legend_h = 16 * len(legend) + pad
    cell_w = max(cell_px, max(width(t, small) for t in result.col_labels) + pad)
    w = left + cols * (cell_w + pad) + pad
    h = top + rows * (cell_px + score_h + pad) + legend_h + pad
    w = max(w, max(width(t, small) for t in legend) + 2 * pad)
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(result.col_labels):
        x = left + c * (cell_w + pad)
        draw.text((x + (cell_w - width(label, small)) // 2, 5), label, fill="black", font=small)
    for r, label in enumerate(result.row_labels):
        y = top + r * (cell_px + score_h + pad)
        draw.text((pad, y + cell_px // 2 - 8), label, fill="black", font=font)
    for cell in result.cells:
        x = left + cell.col * (cell_w + pad) + (cell_w - cell_px) // 2
        y = top + cell.row * (cell_px + score_h + pad)
        if cell.image is not None:
            canvas.paste(cell.image.convert("RGB").resize((cell_px, cell_px), Image.NEAREST), (x, y))
        if cell.clip_score is not None:
            draw.text((x, y + cell_px + 1), f"CLIP {cell.clip_score:.3f}", fill="dimgray", font=small)
    y = h - legend_h
    for line in legend:
        draw.text((pad, y), line, fill="black", font=small)
        y += 16
    return canvas


def sidecar(
    result: GridResult, cell_files: list[str] | None = None, adapter_sources: dict[str, str] | None = None
) -> dict[str, Any]:
    """Every cell's full settings, the grid spec that produced them and where each adapter came from."""
    return {
        "version": SIDECAR_VERSION,
        "adapters": adapter_sources or {},
        "spec": result.spec,
        "row_labels": result.row_labels,
        "col_labels": result.col_labels,
        "legend": result.legend,
        "cells": [
            {
                "row": c.row,
                "col": c.col,
                "row_label": c.row_label,
                "col_label": c.col_label,
                "settings": c.settings.to_dict(),
                "file": cell_files[i] if cell_files else None,
                "clip_score": c.clip_score,
            }
            for i, c in enumerate(result.cells)
        ],
    }


def grid_parameters(result: GridResult) -> str:
    first = result.cells[0].settings.parameters_text() if result.cells else ""
    return f"{first}\nGrid: Y=[{'; '.join(result.row_labels)}], X=[{'; '.join(result.col_labels)}]"


def write_grid(
    result: GridResult, folder: str | Path, cell_px: int = 128, adapter_sources: dict[str, str] | None = None
) -> dict[str, Path]:
    """Write grid.png, grid.json and cells/; returns their paths."""
    folder = Path(folder)
    (folder / "cells").mkdir(parents=True, exist_ok=True)
    files = []
    for c in result.cells:
        rel = f"cells/r{c.row}_c{c.col}.png"
        save_png(c.image, folder / rel, c.settings.parameters_text())
        files.append(rel)
    data = sidecar(result, files, adapter_sources)
    text = json.dumps(data, indent=2)
    (folder / "grid.json").write_text(text)
    save_png(compose(result, cell_px), folder / "grid.png", grid_parameters(result), {"studio-grid": text})
    return {"grid": folder / "grid.png", "sidecar": folder / "grid.json", "cells": folder / "cells"}


def read_sidecar(path: str | Path) -> tuple[GridResult, dict[str, str]]:
    """The cells (settings only, no images) of a sidecar JSON or a grid PNG's chunk, and adapter sources."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        with Image.open(path) as im:
            data = json.loads(im.info["studio-grid"])
    else:
        data = json.loads(path.read_text())
    if data.get("version") != SIDECAR_VERSION:
        raise ValueError(f"{path}: unsupported grid sidecar version {data.get('version')!r}")
    cells = [
        GridCell(
            c["row"], c["col"], c["row_label"], c["col_label"], GenerationSettings.from_dict(c["settings"])
        )
        for c in data["cells"]
    ]
    result = GridResult(
        cells, data["row_labels"], data["col_labels"], data.get("spec"), data.get("legend", [])
    )
    return result, dict(data.get("adapters", {}))
