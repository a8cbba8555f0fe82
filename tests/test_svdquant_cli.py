"""`studio quantize` on a tiny diffusers UNet built from config, and the docs example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from adapters.svdquant import SVDQuantLinear, load_quantized
from studio.cli import main
from studio.commands.quantize import calibration_batches, tiny_unet

DOCS = Path(__file__).resolve().parents[1] / "docs" / "quantization.md"


@pytest.mark.slow
def test_quantize_tiny_unet_cli_and_reload(tmp_path: Path) -> None:
    args = ["--rank", "8", "--calib-batches", "1", "--alphas", "0.5", "--refine-iters", "0"]
    assert main(["quantize", "--model", "tiny", "--out", str(tmp_path), *args]) == 0
    assert (tmp_path / "svdquant_model.safetensors").exists()
    ref_model, model = tiny_unet().eval(), tiny_unet().eval()
    load_quantized(model, tmp_path)
    n_q = sum(isinstance(m, SVDQuantLinear) for m in model.modules())
    assert n_q > 10
    batch = calibration_batches(ref_model, 1, seed=123)[0]
    with torch.no_grad():
        want, got = ref_model(**batch).sample, model(**batch).sample
    assert ((got - want).norm() / want.norm()).item() < 0.15


def test_quantize_rejects_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 1
    assert "not 'tiny'" in capsys.readouterr().err


def test_docs_python_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), {})
