"""`studio world build --steps-from` (fixed-step replay) and `studio world compare`."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest

from studio.commands.world import main
from studio.world.compare import DIGITS, compare_reports, sample_size
from studio.world.recipes.build import MODELS
from studio.world.recipes.common import BuildContext, StepBudget, load_fixed_steps

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "world_build.json"


def steps_file(tmp_path: Path, models: dict) -> Path:
    path = tmp_path / "steps.json"
    path.write_text(json.dumps({"models": models}))
    return path


def test_step_plan_replays_exactly_and_schedules_by_steps():
    ctx = BuildContext(out=Path("."), device="cpu", fixed_steps={"clip-tiny-world": 40})
    steps, cap = ctx.step_plan("clip-tiny-world", 5000, 60.0)
    assert (steps, cap) == (40, math.inf)
    budget = StepBudget(steps, cap)
    assert list(budget) == list(range(40)) and not budget.stopped_early
    assert budget.lr(20, warmup=4, base=1.0) == pytest.approx(0.5)  # cosine half way through the steps
    with pytest.raises(ValueError, match="diffusion-tiny/unet"):
        ctx.step_plan("diffusion-tiny/unet", 10, 1.0)
    assert BuildContext(out=Path(".")).step_plan("clip-tiny-world", 5000, 60.0) == (5000, 60.0)


def test_shipped_report_has_every_step_count():
    fixed = load_fixed_steps(SHIPPED, MODELS)
    shipped = json.loads(SHIPPED.read_text())["models"]
    assert fixed["diffusion-tiny/unet"] == shipped["diffusion-tiny"]["unet"]["steps"]
    assert set(fixed) == {*MODELS, "diffusion-tiny/vae", "diffusion-tiny/unet"} - {"diffusion-tiny"}


def test_missing_entry_is_refused_naming_the_model(tmp_path):
    path = steps_file(tmp_path, {"clip-tiny-world": {"train": {"steps": 3}}})
    args = ["build", "--smoke", "--device", "cpu", "--out", str(tmp_path / "out"), "--steps-from", str(path)]
    with pytest.raises(ValueError, match="pointmap-tiny"):
        main([*args, "--only", "clip-tiny-world,pointmap-tiny"])
    assert not (tmp_path / "out" / "clip-tiny-world").exists()  # refused before anything trained


def test_pointmap_replay_runs_the_recorded_steps(tmp_path):
    path = steps_file(tmp_path, {"pointmap-tiny": {"steps": 7}})
    out = tmp_path / "out"
    argv = ["build", "--smoke", "--device", "cpu", "--only", "pointmap-tiny", "--out", str(out)]
    assert main([*argv, "--steps-from", str(path)]) == 0
    report = json.loads((out / "world_build.json").read_text())
    assert report["models"]["pointmap-tiny"]["steps"] == 7  # the smoke budget alone stops elsewhere
    (run,) = report["runs"]
    assert run["fixed_steps"] == {"from": str(path), "steps": {"pointmap-tiny": 7}}
    assert run["command"].endswith(f"--steps-from {path}")


@pytest.mark.slow
def test_smoke_build_replays_every_recorded_step_count(tmp_path, monkeypatch):
    """Backbone, CLIP, diffusion VAE + UNet and pointmap loops each run exactly the file's count."""
    from studio.world.recipes import backbones, diffusion

    # Measurements the replay does not change, and the slow part of a CPU smoke build.
    monkeypatch.setattr(backbones, "probe_report", lambda *a, **k: {"shape": {"probe": 0.5, "chance": 0.2}})
    monkeypatch.setattr(diffusion, "cpu_seconds_per_image", lambda *a, **k: 0.0)
    models = {
        "vit-tiny-world": {"train": {"steps": 5}},  # more than the smoke recipe's 3
        "clip-tiny-world": {"train": {"steps": 2}},
        "diffusion-tiny": {"vae": {"steps": 4}, "unet": {"steps": 3}},
        "pointmap-tiny": {"steps": 6},
    }
    path = steps_file(tmp_path, models)
    out = tmp_path / "out"
    argv = ["build", "--smoke", "--device", "cpu", "--only", ",".join(models), "--out", str(out)]
    assert main([*argv, "--steps-from", str(path)]) == 0
    got = json.loads((out / "world_build.json").read_text())["models"]
    vit = got["vit-tiny-world"]["train"]
    assert vit["steps"] == 5 and not vit["stopped_early"]
    assert got["clip-tiny-world"]["train"]["steps"] == 2
    assert (got["diffusion-tiny"]["vae"]["steps"], got["diffusion-tiny"]["unet"]["steps"]) == (4, 3)
    assert got["pointmap-tiny"]["steps"] == 6


def report(shape: float, colour: float, loss: float, steps: int, test: int = 2000) -> dict:
    return {
        "runs": [{"command": "studio world build --device cuda --seed 0", "data": {"test": test}}],
        "models": {
            "clip-tiny-world": {
                "zero_shot": {"shape": shape, "colour": colour},
                "chance": {"shape": 0.2},
                "train": {"steps": steps, "final_loss": loss, "train_seconds": 60.0, "stopped_early": True},
                "size_mb": 17.0,
            }
        },
    }


def test_compare_flags_differences_beyond_binomial_noise(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(report(0.95, 1.0, 1.10, 2207)))
    b.write_text(json.dumps(report(0.90, 0.999, 1.30, 1900)))
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    # shape: 0.05 apart on 2000 images, noise hypot(2 sqrt(.95*.05/2000), 2 sqrt(.9*.1/2000)) = 0.0166
    assert "| clip-tiny-world/zero_shot/shape | 0.95 | 0.9 | -0.0500 | 0.0166 | yes |" in out
    assert "| clip-tiny-world/zero_shot/colour | 1.0 | 0.999 | -0.0010 | 0.0014 |  |" in out
    assert "| clip-tiny-world/train/final_loss | 1.1 | 1.3 | +0.2000 | - | - |" in out
    assert "| clip-tiny-world | 2207 | 1900 | -307 |" in out  # steps: their own table
    assert "/chance" not in out and "size_mb" not in out and "train_seconds" not in out
    assert "1 of 2 proportions differ" in out


def test_sample_sizes_follow_the_evaluation_code():
    from sklearn.datasets import load_digits

    shipped = json.loads(SHIPPED.read_text())
    assert DIGITS == len(load_digits().target)
    assert sample_size(("vit-tiny-world", "probes", "digits", "probe"), shipped) == DIGITS - DIGITS // 2
    assert sample_size(("vit-tiny-world", "probes", "shape", "probe"), shipped) == 2000
    assert sample_size(("diffusion-tiny", "prompt_following", "by_guidance", "7.5", "shape"), shipped) == 96
    assert sample_size(("clip-tiny-world", "caption_retrieval_top1_of_100"), shipped) == 100
    assert sample_size(("pointmap-tiny", "normal_within_10pct"), shipped) is None


def test_docs_example_runs(tmp_path, capsys):
    """The docs' replay block: its build line parses and its file has every count; compare runs."""
    import argparse

    from studio.commands.world import register

    text = (ROOT / "docs" / "world_models.md").read_text()
    part = text[text.index("<!-- replay:start -->") : text.index("<!-- replay:end -->")]
    (block,) = re.findall(r"```bash\n(.*?)```", part, flags=re.S)
    build_line, compare_line = [line for line in block.splitlines() if line.startswith("studio ")]
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(shlex.split(build_line)[1:])
    assert args.func.__name__ == "run_build" and args.device == "cuda" and args.seed == 0
    assert len(load_fixed_steps(ROOT / args.steps_from, MODELS)) == 6
    # compare: the shipped report against a copy with one probe changed (the docs' excerpt)
    changed = json.loads(SHIPPED.read_text())
    changed["models"]["vit-tiny-world"]["probes"]["shape"]["probe"] = 0.9
    copy = tmp_path / "world_build.json"
    copy.write_text(json.dumps(changed))
    words = shlex.split(compare_line)
    assert words[1:3] == ["world", "compare"]
    assert main(["compare", str(ROOT / words[3]), str(copy)]) == 0
    out = capsys.readouterr().out
    after = text[text.index("<!-- replay:end -->") :]
    excerpt = after[after.index("| metric |") :].split("```")[0].strip().splitlines()
    assert excerpt and all(line in out for line in excerpt)
    assert "1 of 43 proportions differ" in out
    assert compare_reports(changed, changed).count("| yes |") == 0


def test_a_corrupt_or_foreign_report_is_refused_with_its_name(tmp_path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    for path, why in ((bad, "not JSON"), (other, "no 'models' table")):
        done = subprocess.run(
            [sys.executable, "-m", "studio.cli", "world", "compare", str(path), "assets/world_build.json"],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 1 and str(path) in done.stderr and why in done.stderr, done.stderr
