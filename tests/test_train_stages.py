"""Stages outside the optimizer steps: SALT's source training reports progress and honours a cancel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines import salt
from studio.service import StudioService
from studio.service_train import TAB_OPTIONS, run_trainer

SOURCE_STEPS = 4
TINY_SALT = dict(tiny=True, image_size=32, n_train=16, n_test=8, n_source=32, source_steps=SOURCE_STEPS)


@pytest.fixture(autouse=True)
def cold_source_cache_one_thread(monkeypatch):
    """Each test trains the source stage itself (it is cached per process and key), on one thread."""
    monkeypatch.setattr(salt._SourceStage, "cache", {})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models gain nothing from threads; on a busy CPU they lose a lot
    yield
    torch.set_num_threads(threads)


def _service(tmp_path) -> StudioService:
    # Run folders inside the adapter folder: a half-written run would be listed as a vision model.
    return StudioService(adapter_dirs=[tmp_path], output_dir=tmp_path, device="cpu")


def test_salt_source_stage_reports_before_the_main_steps(tmp_path):
    service = _service(tmp_path)
    events: list[tuple[str, int, int, float]] = []
    summary = run_trainer(
        service,
        "pipeline:salt",
        2,
        lambda step, total, loss: events.append(("train", step, total, loss)),
        lambda: False,
        options=TINY_SALT,
        on_stage=lambda stage, step, total, loss: events.append((stage, step, total, loss)),
    )
    assert [e[0] for e in events] == ["source"] * SOURCE_STEPS + ["train"] * 2 + ["evaluate"] * 2
    source = events[:SOURCE_STEPS]
    assert [(s, t) for _, s, t, _ in source] == [(i, SOURCE_STEPS) for i in range(1, SOURCE_STEPS + 1)]
    assert all(np.isfinite(loss) for *_, loss in source)
    assert [(s, t) for _, s, t, _ in events[SOURCE_STEPS:-2]] == [(1, 2), (2, 2)]
    assert [s for _, s, _, _ in events[-2:]] == [0, 1] and math.isnan(events[-1][3])
    assert summary["names"] and not summary["stopped"] and summary["steps"] == 2


def test_cancel_in_the_source_stage_stops_at_once_and_publishes_nothing(tmp_path):
    service = _service(tmp_path)
    events: list[tuple[str, int]] = []
    summary = run_trainer(
        service,
        "pipeline:salt",
        5,
        lambda step, total, loss: events.append(("train", step)),
        lambda: len(events) >= 2,
        options={**TINY_SALT, "source_steps": 50},
        on_stage=lambda stage, step, total, loss: events.append((stage, step)),
    )
    assert events == [("source", 1), ("source", 2)], "the stage went on after the cancel"
    assert summary == {"kind": "vision", "names": [], "steps": 0, "stopped": True, "metrics": {}, "path": ""}
    assert service.vision_folders() == [] and service.list_vision_models() == []
    assert not (tmp_path / "trained").exists() and list((tmp_path / "runs").iterdir()) == []
    assert salt._SourceStage.cache == {}, "a half-trained source decoder was cached"
    # A cancel that comes while the task generates its data stops before the loop starts.
    events.clear()
    on = lambda *a: events.append(a)  # noqa: E731
    summary = run_trainer(service, "pipeline:salt", 5, on, lambda: True, options=TINY_SALT, on_stage=on)
    assert summary["stopped"] and not summary["names"] and events == []
    assert list((tmp_path / "runs").iterdir()) == []
    # The training slot and accelerate's state were released: the next run trains and publishes.
    summary = run_trainer(service, "pipeline:salt", 1, lambda *a: None, lambda: False, options=TINY_SALT)
    assert summary["steps"] == 1 and [m["name"] for m in service.list_vision_models()] == summary["names"]


def test_cli_shows_a_progress_bar_for_the_source_stage(tmp_path, capsys):
    from studio.train import run

    argv = ["--pipeline", "salt", "--output_dir", str(tmp_path / "run"), "--max_steps", "2"]
    argv += ["--batch_size", "8", "--cpu", "true"]
    for key, value in TINY_SALT.items():
        argv += [f"--pipeline_options.{key}", str(value).lower()]
    assert run(argv) == 0
    err = capsys.readouterr().err
    source = err.rfind(f"salt source: 100%|██████████| {SOURCE_STEPS}/{SOURCE_STEPS}")
    assert source >= 0 and "loss=" in err[:source]
    assert err.find("salt: ", source) > source, "the main bar does not follow the source bar"


def test_train_tab_shows_the_source_stage_and_cancels_there(tmp_path, monkeypatch):
    from ui.app import _train_stream

    monkeypatch.setitem(TAB_OPTIONS, "salt", {**TINY_SALT, "source_steps": 2000})
    lines = []
    for status, frame, flag in _train_stream(_service(tmp_path))("pipeline:salt", 5, "", "tiny-sd", None):
        lines.append(status)
        if "source stage" in status:
            assert set(frame["stage"]) == {"source"} and "loss" in status
            flag.set()  # what the Cancel button does
    assert any(line.startswith("training pipeline:salt: source stage ") for line in lines)
    assert lines[-1] == "cancelled before training started"
