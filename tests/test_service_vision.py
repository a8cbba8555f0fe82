"""Vision and Train tabs on the real pipelines: shipped examples, folder loading, Train-tab runs."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.base import AdapterError
from pipelines import vision_data
from pipelines.vision_common import ConfusionMeter
from studio.service import StudioService
from studio.service_train import run_trainer
from studio.service_vision_load import vision_models_from_folder
from studio.world.assets import assets_dir

EXAMPLES = assets_dir() / "examples"
SEED = 4242  # no training or test split of the examples uses this data seed


def held_out(method: str, n: int = 48) -> vision_data.VisionData:
    """Fresh images of the example's task, from a seed its recipe never saw."""
    if method == "adaptertune":
        return vision_data.shapes_classification(n, SEED, 64)
    if method == "salt":
        return vision_data.segmentation_domain(n, SEED, 64, "target")
    return vision_data.multitask_scenes(n, SEED, 64)


@pytest.fixture(scope="module")
def examples():
    return {
        m: vision_models_from_folder(EXAMPLES / f"vision-{m}") for m in ("adaptertune", "salt", "endoarss")
    }


@pytest.mark.parametrize("method", ["adaptertune", "salt", "endoarss"])
@torch.no_grad()
def test_shipped_example_beats_chance(examples, method):
    data = held_out(method)
    models = examples[method]
    assert [m.task for m in models] == {
        "adaptertune": ["classify"],
        "salt": ["segment"],
        "endoarss": ["classify", "segment"],
    }[method]
    for vm in models:
        assert vm.size == 64 and str(EXAMPLES) in vm.source and vm.path
        logits = vm.model(data.images)
        if vm.task == "classify":
            assert len(vm.classes) == logits.shape[1] and "class 0" not in vm.classes
            acc = (logits.argmax(1) == data.labels).float().mean().item()
            chance = data.labels.bincount().max().item() / len(data)
            assert acc > chance + 0.3, (vm.name, acc, chance)
        else:
            assert vm.classes[0] == "background" and len(vm.classes) == logits.shape[1]
            meter, base = ConfusionMeter(len(vm.classes)), ConfusionMeter(len(vm.classes))
            meter.update(logits.argmax(1), data.masks)
            base.update(torch.zeros_like(data.masks), data.masks)
            assert meter.miou() > base.miou() + 0.05, (vm.name, meter.miou(), base.miou())


def test_examples_are_small_and_carded():
    for folder in sorted(EXAMPLES.glob("vision-*")):
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        assert size < 1_200_000, (folder.name, size)
        card = (folder / "README.md").read_text()
        assert "studio world build --only vision-examples" in card and "seed 0" in card


def test_service_loads_examples_and_classifies(tmp_path):
    service = StudioService(adapter_dirs=[tmp_path, EXAMPLES], device="cpu")
    assert str(EXAMPLES / "vision-salt") in service.vision_folders()
    names = [m["name"] for m in service.load_vision_model(EXAMPLES / "vision-endoarss")]
    assert names == ["vision-endoarss-classify", "vision-endoarss-segment"]
    assert str(EXAMPLES / "vision-endoarss") not in service.vision_folders()
    assert not [a for a in service.list_adapters() if "vision-" in a["path"]]  # not offered as LoRAs
    image = Image.fromarray(
        (held_out("endoarss", 1).images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    )
    scores = service.classify("vision-endoarss-classify", image)
    assert abs(sum(scores.values()) - 1) < 1e-4 and "idle" in scores
    overlay, shares = service.segment("vision-endoarss-segment", image.resize((100, 100)))
    assert overlay.size == (100, 100) and "grasper" in shares
    with pytest.raises(AdapterError, match="already loaded"):
        service.load_vision_model(EXAMPLES / "vision-endoarss")


def test_paths_outside_folders_are_refused(tmp_path):
    service = StudioService(adapter_dirs=[tmp_path], device="cpu")
    for path in (EXAMPLES / "vision-salt", "/etc", tmp_path / ".." / "elsewhere"):
        with pytest.raises(AdapterError, match="outside the configured folders"):
            service.load_vision_model(path)


def test_non_vision_folder_is_a_clear_error(tmp_path):
    from adapters.base import inject
    from adapters.formats import save_adapter
    from adapters.lora import LoraSpec

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    inject(model, LoraSpec(targets=["0"], rank=2), "plain")
    save_adapter(model, "plain", tmp_path / "plain-lora", base_model_id="tiny-linear")
    (tmp_path / "empty").mkdir()
    service = StudioService(adapter_dirs=[tmp_path], device="cpu")
    for name in ("plain-lora", "empty"):
        with pytest.raises(AdapterError, match="not a vision pipeline output"):
            service.load_vision_model(tmp_path / name)
    assert service.vision_folders() == []


TINY = dict(tiny=True, image_size=32, n_total=64, n_test=16)


def test_train_tab_pipeline_run_progress_cancel_and_listing(tmp_path):
    service = StudioService(adapter_dirs=[tmp_path / "adapters"], output_dir=tmp_path / "out", device="cpu")
    seen: list[tuple[int, int, float]] = []
    lock_free: list[bool] = []

    # RLock is owned per thread: acquire and release in one helper thread.
    def probe_lock() -> bool:
        ok: list[bool] = []

        def grab() -> None:
            got = service.lock.acquire(timeout=5)
            ok.append(got)
            if got:
                service.lock.release()

        t = threading.Thread(target=grab)
        t.start()
        t.join()
        return ok[0]

    def on_progress(step: int, total: int, loss: float) -> None:
        seen.append((step, total, loss))
        lock_free.append(probe_lock())

    summary = run_trainer(
        service, "pipeline:adaptertune", 3, on_progress, lambda: False, name="shapes 1", options=TINY
    )
    assert [s for s, _, _ in seen] == [1, 2, 3] and all(t == 3 and np.isfinite(loss) for _, t, loss in seen)
    assert all(lock_free), "the service lock was held during a pipeline run"
    assert summary["kind"] == "vision" and summary["names"] == ["shapes_1"] and not summary["stopped"]
    assert 0 <= summary["metrics"]["accuracy"] <= 1
    published = tmp_path / "adapters" / "trained" / "shapes_1"
    assert summary["path"] == str(published) and (published / "train_result.json").is_file()
    assert any(p.name == "metrics.jsonl" for p in (tmp_path / "out" / "runs").rglob("*"))
    listed = {v["name"]: v for v in service.list_vision_models()}
    assert listed["shapes_1"]["task"] == "classify" and listed["shapes_1"]["path"] == str(published)
    assert set(service.classify("shapes_1", Image.new("RGB", (20, 20), "red"))) == set(
        listed["shapes_1"]["classes"]
    )

    seen.clear()
    summary = run_trainer(
        service,
        "pipeline:adaptertune",
        50,
        on_progress,
        lambda: len(seen) >= 2,
        name="shapes 1",
        options=TINY,
    )
    assert summary["stopped"] and summary["steps"] == 2 and [s for s, _, _ in seen] == [1, 2]
    assert [v["name"] for v in service.list_vision_models()].count("shapes_1") == 1  # replaced


def test_train_tab_errors_are_messages(tmp_path):
    service = StudioService(adapter_dirs=[tmp_path], output_dir=tmp_path, device="cpu")
    with pytest.raises(AdapterError, match="unknown trainer"):
        run_trainer(service, "nope", 2, lambda *a: None, lambda: False)
    with pytest.raises(ValueError, match="unknown AdapterTune mode"):
        run_trainer(service, "pipeline:adaptertune", 2, lambda *a: None, lambda: False, options={"mode": "x"})
    with pytest.raises(AdapterError, match="no adapter folder"):
        run_trainer(StudioService(device="cpu"), "pipeline:salt", 2, lambda *a: None, lambda: False)


@pytest.mark.parametrize(
    "pipeline, options, tasks",
    [
        (
            "salt",
            dict(tiny=True, image_size=32, n_train=16, n_test=8, n_source=32, source_steps=2),
            ["segment"],
        ),
        ("endoarss", TINY, ["classify", "segment"]),
        ("lora", dict(n_test=100), ["classify"]),
    ],
)
def test_train_tab_other_pipelines_become_vision_models(tmp_path, pipeline, options, tasks):
    service = StudioService(adapter_dirs=[tmp_path / "adapters"], output_dir=tmp_path / "out", device="cpu")
    summary = run_trainer(service, f"pipeline:{pipeline}", 1, lambda *a: None, lambda: False, options=options)
    assert [v["task"] for v in service.list_vision_models()] == tasks and summary["steps"] == 1
    restarted = StudioService(adapter_dirs=[tmp_path / "adapters"], device="cpu")
    assert restarted.vision_folders() == [summary["path"]] and restarted.list_adapters() == []
    assert [m["name"] for m in restarted.load_vision_model(summary["path"])] == summary["names"]


def test_examples_recipe_smoke_through_the_cli(tmp_path):
    from studio.cli import main

    assert (
        main(
            [
                "world",
                "build",
                "--only",
                "vision-examples",
                "--device",
                "cpu",
                "--smoke",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    for method in ("adaptertune", "salt", "endoarss"):
        folder = tmp_path / "examples" / f"vision-{method}"
        assert "(--smoke run)" in (folder / "README.md").read_text() and (folder / "metrics.json").is_file()
        assert vision_models_from_folder(folder)


def test_relative_adapter_folder_of_the_app_loads_its_vision_models(tmp_path, monkeypatch):
    """`studio demo --adapters runs`: the folder is relative to the working directory."""
    import shutil

    from studio.commands.ui import make_service

    shutil.copytree(EXAMPLES / "vision-salt", tmp_path / "runs" / "x" / "adapter")
    monkeypatch.chdir(tmp_path)
    service = make_service(
        adapter_dirs=["runs"], data_dir=str(tmp_path / "data"), device="cpu", examples=False
    )
    folder = next(f for f in service.vision_folders() if f.endswith("x/adapter"))
    assert Path(folder).is_absolute()
    assert service.load_vision_model(folder)
