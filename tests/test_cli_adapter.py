"""`studio adapter inspect / convert` through the installed console script, and docs/formats.md."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from formats_tiny import randomize_lora
from tiny_models import tiny_unet

from adapters import formats
from adapters.base import inject
from adapters.lora import LoraSpec

STUDIO = Path(sys.executable).parent / "studio"
DOC = Path(__file__).resolve().parent.parent / "docs" / "formats.md"


def _studio(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = str(STUDIO) if STUDIO.exists() else "/work/venv/bin/studio"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def lora_folder(tmp_path) -> Path:
    torch.manual_seed(0)
    unet = tiny_unet()
    inject(unet, LoraSpec(targets=["to_q", "to_v"], rank=4, alpha=2.0), "style")
    randomize_lora(unet)
    return formats.save_adapter(
        unet, "style", tmp_path / "style", base_model_id="tiny-unet", metadata={"steps": 7}
    )


def test_inspect_and_convert_with_the_console_script(tmp_path, lora_folder) -> None:
    out = _studio("adapter", "inspect", str(lora_folder), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for expected in ("format:      studio", "method:      lora", "rank:        4", "alpha:       2.0"):
        assert expected in text
    assert "base model:  tiny-unet" in text and "steps: 7" in text
    n_params = formats.read_adapter_info(lora_folder).n_params
    assert f"parameters:  {n_params:,}" in text
    assert "mid_block.attentions.0.transformer_blocks.0.attn1.to_q" in text

    out = _studio("adapter", "convert", str(lora_folder), "k.safetensors", "--to", "kohya", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    info = formats.read_adapter_info(tmp_path / "k.safetensors")
    assert (info.format, info.rank, info.alpha) == ("kohya", 4, 2.0)
    assert info.metadata["ss_network_dim"] == "4"


@pytest.mark.parametrize(
    "make,args,needle",
    [
        (lambda p: torch.save({"w": torch.zeros(1)}, p / "lora.ckpt"), ["inspect", "lora.ckpt"], "pickle"),
        (
            lambda p: (p / "bad.safetensors").write_bytes(b"junk" * 3),
            ["inspect", "bad.safetensors"],
            "bad.safetensors",
        ),
        (lambda p: None, ["convert", "absent", "out", "--to", "kohya"], "no such file"),
    ],
    ids=["pickle", "corrupt", "missing"],
)
def test_bad_file_is_one_line_and_nonzero(tmp_path, make, args: list[str], needle: str) -> None:
    make(tmp_path)
    out = _studio("adapter", *args, cwd=tmp_path)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("studio: error:") and needle in lines[0]
    assert "Traceback" not in out.stderr + out.stdout


def test_bad_target_format_is_an_argument_error(tmp_path, lora_folder) -> None:
    from studio.cli import main

    with pytest.raises(SystemExit) as err:
        main(["adapter", "convert", str(lora_folder), "x", "--to", "ckpt"])
    assert err.value.code != 0


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S)


def test_docs_examples_run(tmp_path, monkeypatch, capsys) -> None:
    """Every ```python block of docs/formats.md in order, then every ```bash line via studio.cli."""
    from studio.cli import main

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in _blocks("python"):
        exec(compile(block, str(DOC), "exec"), namespace)
    assert "style from-kohya" in capsys.readouterr().out
    torch.save({"w": torch.zeros(1)}, tmp_path / "lora.ckpt")
    for block in _blocks("bash"):
        for line in block.strip().splitlines():
            command, _, comment = line.partition("#")
            argv = shlex.split(command)
            assert argv[0] == "studio"
            code = main(argv[1:])
            captured = capsys.readouterr()
            if comment.strip().startswith("studio: error:"):
                assert code == 1 and captured.err.startswith("studio: error:"), line
            else:
                assert code == 0, f"{line}: {captured.err}"
            if "--json" in argv:
                assert json.loads(captured.out)["format"] == "kohya"
    assert formats.detect_format(tmp_path / "style-for-diffusers.safetensors")[0] == "diffusers"


def test_convert_foreign_kohya_needs_and_uses_base_model(tmp_path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    from studio.cli import main
    from studio.service_models import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    inject(pipe.unet, LoraSpec(targets=["to_out.0", "proj_in"], rank=2), "s")
    path = formats.save_adapter(pipe, "s", tmp_path / "k.safetensors", base_model_id="", format="kohya")
    foreign = tmp_path / "foreign.safetensors"
    save_file(load_file(str(path)), str(foreign))  # no studio metadata: names must be resolved
    assert main(["adapter", "convert", str(foreign), str(tmp_path / "a"), "--to", "studio"]) == 1
    assert "--base-model" in capsys.readouterr().err
    assert (
        main(
            [
                "adapter",
                "convert",
                str(foreign),
                str(tmp_path / "b"),
                "--to",
                "studio",
                "--base-model",
                "nope",
            ]
        )
        == 1
    )
    assert "unknown base model" in capsys.readouterr().err
    argv = [
        "adapter",
        "convert",
        str(foreign),
        str(tmp_path / "c"),
        "--to",
        "studio",
        "--base-model",
        "tiny-sd",
    ]
    assert main(argv) == 0
    targets = formats.read_adapter_info(tmp_path / "c").targets
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0" in targets
