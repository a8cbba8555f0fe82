"""`studio quantize --calib-prompts`: real-prompt calibration on the tiny world's pipeline (CPU)."""

from __future__ import annotations

import copy
import importlib
import json
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.svdquant import SVDQuantConfig, SVDQuantLinear, load_quantized, quantize_model
from studio.calibration import parse_prompts, record_denoiser_calls
from studio.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "quantization.md"
LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # text tokens: real CLIP states
FAST = ["--targets", LAYER, "--alphas", "0.5", "--refine-iters", "0"]
PROMPTS = ["a large green triangle on a white background", "a small red circle on a blue background"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the randomized SVD's small QRs crawl when 2 threads share busy cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    from studio.world.assets import load_diffusion

    return load_diffusion()


def _smooth(out: Path) -> torch.Tensor:
    return load_file(str(out / "svdquant_model.safetensors"))[f"{LAYER}.smooth_inv"]


def test_cli_calib_prompts_file_records_calibration(tmp_path: Path, pipe) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "q"
    args = ["quantize", "--model", "tiny-world", "--out", str(out), "--calib-prompts", str(prompts)]
    assert main([*args, "--calib-steps", "2", "--calib-seed", "3", *FAST]) == 0
    meta = json.loads((out / "svdquant_config.json").read_text())["meta"]
    calib = meta["calibration"]
    assert calib["kind"] == "prompts" and calib["prompts"] == 2 and calib["steps"] == 2
    assert calib["seed"] == 3 and calib["guidance"] == 7.5 and calib["calls"] == 2
    assert len(calib["prompts_sha256"]) == 16
    model = copy.deepcopy(pipe.unet)
    load_quantized(model, out)
    assert isinstance(model.get_submodule(LAYER), SVDQuantLinear)


def test_recorded_calls_feed_the_smoothing(tmp_path: Path, pipe) -> None:
    """The CLI's smoothing equals quantize_model on the recorded calls, and differs from synthetic."""
    synth, real = tmp_path / "synth", tmp_path / "real"
    assert main(["quantize", "--model", "tiny-world", "--out", str(synth), *FAST]) == 0
    synth_meta = json.loads((synth / "svdquant_config.json").read_text())["meta"]["calibration"]
    assert synth_meta == {"kind": "synthetic", "batches": 4, "seed": 0}
    text = "|".join(PROMPTS)
    args = ["quantize", "--model", "tiny-world", "--out", str(real), "--calib-prompts", text]
    assert main([*args, "--calib-steps", "2", *FAST]) == 0
    calls = record_denoiser_calls(pipe, PROMPTS, steps=2, seed=0)
    model = copy.deepcopy(pipe.unet)
    quantize_model(model, calls, SVDQuantConfig(alphas=(0.5,), refine_iters=0), targets=[LAYER])
    want = model.get_submodule(LAYER).smooth_inv
    assert torch.allclose(_smooth(real), want, rtol=1e-5)
    spread = (_smooth(real) / _smooth(synth)).abs()
    assert float(spread.max() / spread.min()) > 1.2  # real text states have other outlier channels


def test_record_denoiser_calls_cfg_batch_and_chunks(pipe) -> None:
    three = [*PROMPTS, "a pixelated image of a large red star on a grey background"]
    calls = record_denoiser_calls(pipe, three, steps=3, seed=5, chunk=2)
    assert len(calls) == 6  # 2 chunks x 3 steps
    first = calls[0]
    assert set(first) == {"sample", "timestep", "encoder_hidden_states"}
    assert first["sample"].shape[0] == 4 and calls[3]["sample"].shape[0] == 2  # uncond + cond
    assert len({float(c["timestep"]) for c in calls[:3]}) == 3
    whole = record_denoiser_calls(pipe, three, steps=3, seed=5, chunk=None)
    # Per-prompt generators: the third prompt's start latents do not depend on the chunking.
    assert torch.equal(whole[0]["sample"][2], calls[3]["sample"][0])


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_prompts_file_is_a_clear_error(
    tmp_path: Path, content: str, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text(content)
    args = ["quantize", "--model", "tiny-world", "--out", str(tmp_path / "q"), "--calib-prompts", str(empty)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "studio: error:" in err and "no prompts" in err and "empty.txt" in err
    assert not (tmp_path / "q").exists()


def test_bad_calibration_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out", str(tmp_path / "q")]
    assert main(["quantize", "--model", "tiny", *out, "--calib-prompts", "a|b"]) == 1
    assert "needs a diffusers pipeline folder" in capsys.readouterr().err
    assert main(["quantize", "--model", "tiny-world", *out, "--calib-prompts", "missing.txt"]) == 1
    assert "no such calibration prompts file" in capsys.readouterr().err
    assert (
        main(["quantize", "--model", "tiny-world", *out, "--calib-prompts", "a", "--calib-steps", "0"]) == 1
    )
    assert "--calib-steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no prompts given"):
        parse_prompts(" | ")
    assert parse_prompts("a red ball | a blue cube") == ["a red ball", "a blue cube"]


def test_docs_calibration_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The docs' --calib-prompts command, restricted to one layer to stay fast."""
    blocks = re.findall(r"```bash\n(.*?)```", DOCS.read_text(), re.S)
    line = next(b.strip() for b in blocks if "--calib-prompts" in b)
    argv = shlex.split(line)
    assert argv[0] == "studio"
    monkeypatch.chdir(tmp_path)
    assert main([*argv[1:], *FAST]) == 0
    out = argv[argv.index("--out") + 1]
    meta = json.loads((tmp_path / out / "svdquant_config.json").read_text())["meta"]["calibration"]
    assert meta["kind"] == "prompts" and meta["prompts"] == 2 and meta["steps"] == 4


def test_calib_bench_tiny(pipe) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    bench = importlib.import_module("calib_w4_world")
    cfg = bench.CalibBenchConfig(
        prompt_sets=((1, 2),),
        calib_seeds=(0,),
        synthetic_seeds=(0,),
        test_prompts=1,
        test_steps=2,
        formats=("int4",),
        targets=(LAYER,),
    )
    result = bench.run(cfg, pipe)
    rows = {r["calibration"]: r for r in result["rows"]}
    real = "1 prompts x 2 steps, seed 0"
    assert set(rows) == {"-", "synthetic, seed 0", real}
    assert result["calib_calls"][real] == 2 and result["test_calls"] == 2
    for name in ("synthetic, seed 0", real):
        assert rows[name]["eps_rel_err"] < rows["-"]["eps_rel_err"]  # SVDQuant beats naive 4-bit
    assert "| int4 | SVDQuant r32 | synthetic, seed 0 |" in bench.table(result)
