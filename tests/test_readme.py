"""The README: its install block is what CI runs, its links resolve, its claims match the
registries, and its examples (every block after the install one, servers left out) run in
a scratch folder and produce what it says."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.cli import main as studio_main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
INSTALL = "pip install -e '.[test]' && studio demo\npip install -e '.[test]' && python -m pytest\n"
SERVERS = {"demo", "ui"}  # `studio demo` / `studio ui` open a server: not run here


def blocks() -> list[tuple[str, str]]:
    """(language, code) of every ```bash / ```python block, in README order."""
    return re.findall(r"```(bash|python)\n(.*?)```", README.read_text(), re.S)


def command_lines(code: str) -> list[list[str]]:
    lines = (shlex.split(line, comments=True) for line in code.replace("\\\n", " ").splitlines())
    return [argv for argv in lines if argv]


def slugs(doc: Path) -> set[str]:
    """Anchors of a markdown page: explicit <a id> tags and GitHub heading slugs."""
    text = doc.read_text()
    ids = set(re.findall(r'<a id="([^"]+)"', text))
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        ids.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return ids


def test_install_block_is_the_ci_command():
    assert blocks()[0] == ("bash", INSTALL)
    assert "\npip install -e '.[test]' && python -m pytest\n" in (ROOT / ".ci" / "run").read_text()


def test_links_and_claims_match_the_code():
    from adapters.base import methods
    from pipelines import pipelines

    text = README.read_text()
    links = re.findall(r"\]\((docs/[^)#]*)(?:#([^)]+))?\)", text)
    assert {path for path, _ in links} >= {
        f"docs/{name}.md"
        for name in (
            "studio",
            "training",
            "vision_adapters",
            "quantization",
            "formats",
            "world",
            "world_models",
            "results",
        )
    }
    for path, anchor in links:
        assert (ROOT / path).exists(), path
        if anchor:
            assert anchor in slugs(ROOT / path), f"{path}#{anchor}"
    for name in [*methods(), *pipelines()]:
        assert f"`{name}`" in text, f"registered {name!r} missing from the feature map"
    (missing,) = re.findall(r"Not built yet[^:]*:(.*?)\.\n", text, re.S)
    names = [item.split()[-1].lower() for item in missing.split(",")]
    assert names == ["qalora", "pickstyle", "autolora", "lora3d"]
    for name in names:
        assert name not in methods() and name not in pipelines()


@pytest.mark.slow
def test_readme_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ran: list[str] = []
    namespaces: list[dict] = []
    out = ""
    for lang, code in blocks()[1:]:
        if lang == "python":
            namespaces.append({})
            exec(compile(code, str(README), "exec"), namespaces[-1])
            continue
        for argv in command_lines(code):
            if argv[0] == "studio" and argv[1] in SERVERS:
                continue
            if argv[0] == "studio":
                assert studio_main(argv[1:]) == 0, argv
            elif argv[:2] == ["accelerate", "launch"]:
                script = [str(ROOT / a) if a == "studio/train.py" else a for a in argv[2:]]
                proc = subprocess.run(
                    [sys.executable, "-m", "accelerate.commands.launch", *script],
                    capture_output=True,
                    text=True,
                    timeout=300,
                    env={**os.environ, "OMP_NUM_THREADS": "2"},
                )
                assert proc.returncode == 0, proc.stderr[-3000:]
                out += proc.stdout
            else:
                pytest.fail(f"README command this test cannot run: {shlex.join(argv)}")
            ran.append(" ".join(argv[:3]))
    out += capsys.readouterr().out
    assert len(namespaces) == 2 and len(ran) == 12, ran

    # studio methods / world info
    assert re.search(r"^\s+endoarss\s+EndoARSS", out, re.M) and "diffusion-tiny" in out
    # training
    assert "done: adaptertune step 10/10 (from 0)" in out
    adapter = tmp_path / "runs/shapes/adapter"
    assert {"adapter_config.json", "vision_task.json", "heads.safetensors"} <= {
        p.name for p in adapter.iterdir()
    }
    assert (tmp_path / "runs/shapes/metrics.jsonl").stat().st_size > 0
    assert re.search(r"^method:\s+adaptertune$", out, re.M)
    # generate and grids
    circle = Image.open("circle.png")
    assert circle.size == (64, 64) and "Model: tiny-world" in circle.info["parameters"]
    grid = json.loads(Path("grid/grid.json").read_text())
    assert len(grid["cells"]) == 9 and grid["cells"][0]["settings"]["adapters"] == []
    a, b = Image.open("grid/cells/r2_c2.png"), Image.open("grid-again/cells/r2_c2.png")
    assert a.info["parameters"] == b.info["parameters"] and np.array_equal(np.asarray(a), np.asarray(b))
    # LoRA files
    assert Path("style-diffusers.safetensors").is_file()
    assert re.search(r"^format:\s+kohya$", out, re.M)
    assert Path("style-studio/adapter_config.json").is_file()
    assert "<lora:style-kohya:0.1>" in Image.open("styled.png").info["parameters"]
    # 4-bit
    assert {"svdquant_model.safetensors", "svdquant_config.json"} <= {p.name for p in Path("w4").iterdir()}
    cells = json.loads(Path("grid-w4/grid.json").read_text())["cells"]
    assert {c["settings"]["precision"] for c in cells} == {"fp", "4bit"}
    assert namespaces[1]["image"].size == (64, 64)
