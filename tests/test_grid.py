"""Grid planning, export (PNG chunks, sidecar, cells), batched == cell by cell, re-render."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from studio_helpers import max_diff, settings, tiny_service

from adapters.base import AdapterError
from studio.cli import main
from studio.grid import read_sidecar, write_grid
from studio.service_grid import Axis, GridSpec, plan_grid


@pytest.fixture(scope="module")
def svc():
    return tiny_service()


def spec() -> GridSpec:
    base = settings(adapters=["example-attn:0.8", "example-conv:1"])
    return GridSpec(base, Axis("seed", [1, 2]), Axis.parse("strength=0.5,1"))


def test_plan_grid_cells_and_labels():
    result = plan_grid(spec())
    assert result.row_labels == ["baseline (no adapter)", "strength 0.5", "strength 1"]
    assert result.col_labels == ["seed 1", "seed 2"]
    assert len(result.cells) == 6
    assert all(not c.settings.adapters for c in result.cells if c.row == 0)
    r1 = [c for c in result.cells if c.row == 1]
    assert {(a.name, a.strength) for a in r1[0].settings.adapters} == {
        ("example-attn", 0.5),
        ("example-conv", 0.5),
    }
    assert [c.settings.seed for c in r1] == [1, 2]
    adapters_axis = plan_grid(GridSpec(settings(), Axis("adapter", ["none", "example-attn"]), baseline=False))
    assert [[a.name for a in c.settings.adapters] for c in adapters_axis.cells] == [[], ["example-attn"]]
    with pytest.raises(AdapterError, match="unknown grid axis"):
        Axis.parse("colour=red")
    with pytest.raises(AdapterError, match="bad value"):
        Axis.parse("seed=one")


def test_batched_grid_equals_cell_by_cell(svc):
    batched = svc.render_grid(spec())
    single = svc.render_grid(spec(), batched=False)
    assert all(max_diff(a.image, b.image) <= 2 for a, b in zip(batched.cells, single.cells))
    # rows really differ: the adapter shows at strength 1 and not in the baseline
    assert max_diff(batched.cells[0].image, batched.cells[4].image) > 10


def test_export_and_rerender_from_sidecar(svc, tmp_path):
    result = svc.render_grid(spec())
    sources = svc.adapter_sources(["example-attn", "example-conv"])
    paths = write_grid(result, tmp_path / "g", adapter_sources=sources)
    grid = Image.open(paths["grid"])
    assert grid.width > 2 * 128 and "Grid: Y=[baseline" in grid.info["parameters"]
    data = json.loads(paths["sidecar"].read_text())
    assert data["adapters"] == {
        "example-attn": "builtin:example-attn",
        "example-conv": "builtin:example-conv",
    }
    assert len(data["cells"]) == 6 and data["cells"][3]["settings"]["seed"] == 2
    cell = Image.open(tmp_path / "g" / data["cells"][3]["file"])
    assert (
        cell.size == (32, 32)
        and "Seed: 2" in cell.info["parameters"]
        and "<lora:example-attn:0.5>" in cell.info["parameters"]
    )
    # re-render from the sidecar and from the PNG chunk, on a fresh service
    for source in (paths["sidecar"], paths["grid"]):
        planned, srcs = read_sidecar(source)
        fresh = tiny_service()
        fresh.ensure_adapters(srcs)
        again = fresh.render_grid(planned)
        assert all(max_diff(a.image, b.image) <= 2 for a, b in zip(result.cells, again.cells))


def test_cli_grid_and_from(tmp_path, capsys):
    out1, out2 = tmp_path / "a", tmp_path / "b"
    args = ["grid", "--adapter", "example-attn:0.8", "--x", "seed=1,2", "--steps", "2", "--out", str(out1)]
    assert main(args) == 0
    assert main(["grid", "--from", str(out1 / "grid.json"), "--out", str(out2)]) == 0
    for name in ("r0_c0", "r1_c1"):
        assert max_diff(Image.open(out1 / f"cells/{name}.png"), Image.open(out2 / f"cells/{name}.png")) <= 2
    assert main(["grid", "--x", "colour=red", "--out", str(tmp_path / "c")]) == 1
    assert "unknown grid axis" in capsys.readouterr().err


def test_cli_generate(tmp_path):
    out = tmp_path / "one.png"
    assert (
        main(["generate", "--adapter", "example-conv", "--steps", "2", "--seed", "3", "--out", str(out)]) == 0
    )
    assert "Seed: 3" in Image.open(out).info["parameters"]
