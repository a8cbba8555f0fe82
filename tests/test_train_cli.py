"""Training config (TOML + overrides), `studio train`, the pipeline registry and docs/training.md."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from studio import checkpoints as ckpt
from studio.cli import main as studio_main
from studio.config import ConfigError, config_from_args
from studio.train import build_task

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "training.md"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the CI box has two shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_toml_file_then_command_line_overrides(tmp_path):
    toml = write(
        tmp_path,
        'pipeline = "lora"\nmax_steps = 7\nlr = 0.01\ntrackers = ["csv"]\nresume = "latest"\n'
        "[pipeline_options]\nrank = 2\ntargets = ['head']\n",
    )
    c = config_from_args(
        [f"--config={toml}", "--lr", "2e-3", "--cpu", "--batch_size=16", "--resume", "none"]
        + ["--pipeline_options.rank", "8", "--pipeline_options.alpha=3.5", "--trackers", "csv,tensorboard"]
    )
    assert (c.max_steps, c.lr, c.batch_size, c.cpu, c.resume) == (7, 2e-3, 16, True, None)
    assert c.trackers == ["csv", "tensorboard"]
    assert c.pipeline_options == {"rank": 8, "targets": ["head"], "alpha": 3.5}
    assert config_from_args(["--mixed_precision", "bf16", "--progress", "false"]).progress is False
    task = build_task(c)
    assert (task.cfg.rank, task.cfg.alpha, task.cfg.targets) == (8, 3.5, ["head"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus", "1"], "unknown option --bogus"),
        (["--max_steps", "ten"], "max_steps must be a number"),
        (["--max_steps", "2.5"], "max_steps must be an integer"),
        (["--max_steps", "0"], "max_steps must be >= 1"),
        (["--mixed_precision", "fp8"], "mixed_precision must be no, bf16 or fp16"),
        (["--lr_schedule", "step"], "lr_schedule must be"),
        (["--config", "missing.toml"], "missing.toml does not exist"),
        (["stray"], "unexpected argument 'stray'"),
        (["--cpu", "maybe"], "cpu must be true or false"),
    ],
)
def test_bad_options_raise_one_line_errors(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_args(argv)


def test_bad_toml_and_pipeline_options(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        config_from_args([f"--config={write(tmp_path, 'max_steps = ')}"])
    with pytest.raises(ConfigError, match="unknown training option"):
        config_from_args([f"--config={write(tmp_path, 'max_step = 3')}"])
    with pytest.raises(ConfigError, match="unknown lora pipeline option.*rnak"):
        build_task(config_from_args(["--pipeline_options.rnak", "4"]))
    with pytest.raises(ValueError, match="unknown pipeline 'nope'; known: .*lora"):
        build_task(config_from_args(["--pipeline", "nope"]))


@pytest.mark.parametrize("argv", [["--bogus", "1"], ["--pipeline", "nope"], ["--batch_size", "x"]])
def test_studio_train_bad_argument_is_one_line_and_non_zero(argv, capsys):
    assert studio_main(["train", *argv]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("studio: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out


def test_studio_train_help_and_methods(capsys):
    assert studio_main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--max_steps" in out and "Global batch per optimizer step" in out
    assert studio_main(["methods"]) == 0
    assert re.search(r"^\s+lora\s+LoRA on a tiny timm ViT", capsys.readouterr().out, re.M)


def doc_blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(), re.S)


@pytest.mark.slow
def test_docs_examples_run(tmp_path, monkeypatch, capsys):
    """Every `studio train` line of docs/training.md, then its Python example, in a scratch folder."""
    from adapters.formats import load_adapter
    from pipelines.lora import LoraTask

    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    commands = [ln for block in doc_blocks("bash") for ln in block.splitlines() if ln.startswith("studio ")]
    assert len(commands) == 4
    for line in commands:
        argv = shlex.split(line)[1:] + ["--progress", "false"]
        assert studio_main(argv) == 0, line
    out = capsys.readouterr().out
    assert "done: lora step 20/20 (from 0)" in out
    assert "done: lora step 16/16 (from 12)" in out
    assert [s for s, _ in ckpt.list_checkpoints("runs/resume")] == [12]

    # The saved adapter loads into a fresh base model and scores what the run reported.
    records = ckpt.read_metrics("runs/lora")
    task = LoraTask()
    model = task.build_base()
    load_adapter(model, "runs/lora/adapter")
    model.eval()
    assert task.evaluate(model)["accuracy"] == pytest.approx(records[-1]["eval/accuracy"], abs=1e-6)
    assert records[-1]["step"] == 20 and records[0]["loss"] > records[-2]["loss"]

    (python,) = doc_blocks("python")[:1]
    exec(compile(python, str(DOC), "exec"), {})
    assert "5 True runs/py/adapter" in capsys.readouterr().out
