"""studio.service on the from-config tiny pipeline: adapters, strengths, schedules, fuse, batching."""

from __future__ import annotations

import threading

import pytest
import torch
from studio_helpers import max_diff, settings, tiny_service

from adapters.base import AdapterError
from studio.service_files import safe_path
from studio.service_types import AdapterUse, GenerationSettings

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def svc():
    return tiny_service()


@pytest.fixture(scope="module")
def baseline(svc):
    return svc.generate(settings()).image


def test_generate_is_seeded_and_carries_parameters(svc, baseline):
    again = svc.generate(settings())
    assert again.image.size == (32, 32)
    assert max_diff(again.image, baseline) == 0
    assert max_diff(svc.generate(settings(seed=2)).image, baseline) > 10
    assert "Seed: 1" in again.parameters and again.image.info["parameters"] == again.parameters
    assert GenerationSettings.from_dict(again.settings.to_dict()) == again.settings


def test_adapter_changes_image_and_never_leaks(svc, baseline):
    styled = svc.generate(settings(adapters=["example-attn:1"])).image
    assert max_diff(styled, baseline) > 10
    assert max_diff(svc.generate(settings(adapters=["example-attn:0"])).image, baseline) == 0
    # the next request without adapters must not see the previous stack
    assert max_diff(svc.generate(settings()).image, baseline) == 0


def test_per_block_strengths(svc, baseline):
    full = svc.generate(settings(adapters=["example-attn:1"])).image
    off = AdapterUse("example-attn", 1.0, blocks={".*": 0.0})
    assert max_diff(svc.generate(settings(adapters=[off])).image, baseline) == 0
    up_off = AdapterUse("example-attn", 1.0, blocks={r"unet\.up_blocks.*": 0.0})
    partial = svc.generate(settings(adapters=[up_off])).image
    assert max_diff(partial, baseline) > 1 and max_diff(partial, full) > 1


def test_timestep_schedules(svc, baseline):
    full = svc.generate(settings(adapters=["example-attn:1"])).image
    flat = svc.generate(settings(adapters=[AdapterUse("example-attn", 1.0, schedule="0:1, 1:1")])).image
    assert max_diff(flat, full) == 0
    zero = svc.generate(settings(adapters=[AdapterUse("example-attn", 1.0, schedule="0:0, 1:0")])).image
    assert max_diff(zero, baseline) == 0
    fade = svc.generate(settings(adapters=[AdapterUse("example-attn", 1.0, schedule="0:1, 1:0")])).image
    assert max_diff(fade, full) > 1 and max_diff(fade, baseline) > 1


def test_schedule_parse_errors():
    from studio.schedules import StrengthSchedule

    s = StrengthSchedule.parse("0:1, 0.5:0.5, 1:0")
    assert [s.at(i, 5) for i in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(AdapterError, match="bad strength schedule"):
        StrengthSchedule.parse("fast then slow")
    with pytest.raises(AdapterError, match="lie in"):
        StrengthSchedule.parse("0:1, 2:0")


def test_fuse_matches_unfused_and_restores(svc, baseline):
    stack = ["example-attn:0.7", "example-conv:1"]
    plain = svc.generate(settings(adapters=stack)).image
    fused = svc.generate(settings(adapters=stack, fuse=True)).image
    assert max_diff(plain, fused) <= 2
    assert max_diff(svc.generate(settings()).image, baseline) == 0
    with pytest.raises(AdapterError, match="schedules cannot be fused"):
        svc.generate(settings(adapters=[AdapterUse("example-attn", 1, schedule="0:1,1:0")], fuse=True))
    assert max_diff(svc.generate(settings()).image, baseline) == 0


def test_batched_render_matches_cell_by_cell(svc):
    cells = [
        settings(seed=s, adapters=stack)
        for s in (1, 2)
        for stack in ([], ["example-attn:1"], ["example-attn:0.5", "example-conv:1"])
    ]
    cells.append(settings(seed=3, adapters=[AdapterUse("example-attn", 1, schedule="0:0,1:1")]))
    batched = svc.render(cells)
    single = svc.render(cells, batched=False)
    for b, s in zip(batched, single):
        assert b.settings == s.settings
        assert max_diff(b.image, s.image) <= 2


def test_concurrent_threads_do_not_mix(svc):
    requests = [settings(seed=i % 3, adapters=(["example-attn:1"] if i % 2 else [])) for i in range(6)]
    solo = [svc.generate(r).image for r in requests]
    got: dict[int, object] = {}

    def worker(i: int) -> None:
        got[i] = svc.generate(requests[i]).image

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(max_diff(got[i], solo[i]) == 0 for i in range(6))


def test_compress_adapter_reports_error(svc):
    same = svc.compress_adapter("example-attn", 4, "attn-r4")
    assert same["error"]["max"] < 1e-4 and same["info"]["rank"] == 4
    low = svc.compress_adapter("example-attn", 1, "attn-r1")
    assert 0.05 < low["error"]["mean"] < 1.0
    full = svc.generate(settings(adapters=["example-attn"])).image
    assert max_diff(svc.generate(settings(adapters=["attn-r4"])).image, full) <= 2
    svc.unload_adapter("attn-r4")
    svc.unload_adapter("attn-r1")
    assert {a["name"] for a in svc.list_adapters()} == {"example-attn", "example-conv"}


def test_errors_are_clear(svc):
    with pytest.raises(AdapterError, match="no adapter named 'missing'"):
        svc.generate(settings(adapters=["missing"]))
    with pytest.raises(AdapterError, match="unknown base model"):
        svc.generate(settings(base_model="nope"))
    with pytest.raises(AdapterError, match="multiples of 8"):
        settings(width=30)


def test_path_safety(tmp_path):
    inside = tmp_path / "adapters"
    inside.mkdir()
    (inside / "ok.safetensors").write_bytes(b"x")
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    (inside / "link.safetensors").symlink_to(tmp_path / "secret.safetensors")
    assert safe_path("ok.safetensors", [inside]) == (inside / "ok.safetensors").resolve()
    for bad in [
        "../secret.safetensors",
        str(tmp_path / "secret.safetensors"),
        "link.safetensors",
        "/etc/passwd",
    ]:
        with pytest.raises(AdapterError, match="access refused"):
            safe_path(bad, [inside])
    with pytest.raises(AdapterError, match="no such file"):
        safe_path("absent.safetensors", [inside])
    svc = tiny_service(tmp_path)
    with pytest.raises(AdapterError, match="access refused"):
        svc.load_adapter(str(tmp_path / "secret.safetensors"))


def test_four_bit_path_runs_adapters_and_resets(svc):
    q_base = svc.generate(settings(precision="4bit")).image
    q_styled = svc.generate(settings(adapters=["example-attn:1"], precision="4bit")).image
    assert max_diff(q_styled, q_base) > 10
    assert max_diff(svc.generate(settings(adapters=["example-attn:0"], precision="4bit")).image, q_base) == 0
    assert "Precision: 4bit" in svc.generate(settings(precision="4bit")).parameters


def test_load_adapter_file_through_formats(svc, tmp_path):
    from adapters.base import unload
    from adapters.formats import save_adapter
    from studio.service_models import build_tiny_pipeline, example_lora_parts

    pipe = build_tiny_pipeline()
    spec, state = example_lora_parts(pipe.unet, "example-attn")["unet"]
    from adapters.base import inject, load_adapter_state_dict

    inject(pipe.unet, spec, "saved")
    load_adapter_state_dict(pipe.unet, "saved", state)
    folder = tmp_path / "adapters"
    save_adapter(pipe, "saved", folder / "saved", base_model_id="tiny-sd", metadata={"note": "test"})
    unload(pipe.unet)
    file_svc = tiny_service(tmp_path)
    info = file_svc.load_adapter("saved")
    assert info.name == "saved" and info.method == "lora" and info.rank == 4
    want = svc.generate(settings(adapters=["example-attn:0.6"])).image
    assert max_diff(file_svc.generate(settings(adapters=["saved:0.6"])).image, want) <= 1
    assert file_svc.inspect_file("saved")["method"] == "lora"
