"""Run the examples of docs/studio.md (python blocks as code, `studio` bash lines through the CLI)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from PIL import Image

from studio.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "studio.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S)


def test_python_examples_run():
    code = blocks("python")
    assert len(code) == 3
    for block in code:
        exec(compile(block, str(DOC), "exec"), {})


def test_bash_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = [ln for b in blocks("bash") for ln in b.splitlines() if ln.startswith("studio ")]
    assert len(lines) == 2
    for line in lines:
        assert main(shlex.split(line)[1:]) == 0
    a, b = Image.open("grid_demo/cells/r1_c0.png"), Image.open("grid_again/cells/r1_c0.png")
    assert a.info["parameters"] == b.info["parameters"]
    assert list(a.getdata()) == list(b.getdata())
