"""diffusers plug-in: custom_pipeline from a saved from-config pipeline, from_pipe, schedules, callbacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from studio_helpers import max_diff, settings, tiny_service

from adapters.base import AdapterError
from studio.plugin import StudioStableDiffusionPipeline
from studio.service_models import build_tiny_pipeline, example_lora_parts

PLUGIN_FILE = str(Path(__file__).resolve().parents[1] / "studio" / "custom_pipeline" / "pipeline.py")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipe(saved):
    from diffusers import DiffusionPipeline

    p = DiffusionPipeline.from_pretrained(
        saved, custom_pipeline=PLUGIN_FILE, trust_remote_code=True, local_files_only=True
    )
    p.set_progress_bar_config(disable=True)
    p.add_studio_adapter("attn", example_lora_parts(p.unet, "example-attn"), strength=0.0)
    return p


def call(p, seed=1, **kw):
    return p(
        "a red circle",
        num_inference_steps=3,
        guidance_scale=5.0,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    ).images[0]


def test_custom_pipeline_loads_and_matches_the_service(pipe):
    assert type(pipe).__name__ == "StudioStableDiffusionPipeline"
    assert hasattr(pipe, "load_lora_weights") and hasattr(pipe, "set_adapters")
    pipe.set_studio_strength("attn", 0.7)
    try:
        got = call(pipe)
    finally:
        pipe.set_studio_strength("attn", 0.0)
    svc = tiny_service()
    want = svc.generate(settings(adapters=["example-attn:0.7"], guidance=5.0)).image
    assert max_diff(got, want) <= 1


def test_schedules_scale_and_callbacks(pipe):
    base = call(pipe)
    pipe.set_studio_strength("attn", 1.0)
    try:
        full = call(pipe)
        assert max_diff(full, base) > 10
        assert max_diff(call(pipe, studio_schedules={"attn": "0:0, 1:0"}), base) == 0
        assert max_diff(call(pipe, studio_schedules={"attn": "0:1, 1:1"}), full) == 0
        assert max_diff(call(pipe, cross_attention_kwargs={"scale": 0.0}), base) == 0
        seen = []

        def user_cb(p, i, t, kw):
            seen.append(i)
            return kw

        faded = call(pipe, studio_schedules={"attn": "0:1, 1:0"}, callback_on_step_end=user_cb)
        assert seen == [0, 1, 2] and max_diff(faded, full) > 1 and max_diff(faded, base) > 1
        assert max_diff(call(pipe), full) == 0  # strengths restored after the call
        with pytest.raises(AdapterError, match="unknown studio adapters"):
            call(pipe, studio_schedules={"nope": "0:1"})
    finally:
        pipe.set_studio_strength("attn", 0.0)


def test_from_pipe_fuse_and_peft_lora_side_by_side(pipe, capsys):
    plain = build_tiny_pipeline()
    plain.set_progress_bar_config(disable=True)
    studio = StudioStableDiffusionPipeline.from_pipe(plain)
    assert studio.unet is plain.unet
    studio.add_studio_adapter("attn", example_lora_parts(studio.unet, "example-attn"), strength=0.8)
    unfused = call(studio)
    studio.fuse_studio_adapters()
    assert max_diff(call(studio), unfused) <= 2
    studio.unfuse_studio_adapters()
    # a vanilla diffusers (PEFT) LoRA next to the studio one; scale=0 turns both off
    spec, state = example_lora_parts(studio.unet, "example-conv")["unet"]
    peft = {f"unet.{k.rsplit('.', 1)[0]}.{k.rsplit('.', 1)[1]}.weight": v for k, v in state.items()}
    studio.load_lora_weights(peft, adapter_name="conv")
    with_both = call(studio)
    assert max_diff(with_both, unfused) > 1
    studio.set_studio_strength("attn", 0.0)
    studio.set_adapters(["conv"], [0.0])
    base = call(studio)
    studio.set_studio_strength("attn", 0.8)
    studio.set_adapters(["conv"], [1.0])
    assert max_diff(call(studio, cross_attention_kwargs={"scale": 0.0}), base) <= 1
    studio.set_progress_bar_config(disable=False)
    call(studio)
    assert "3/3" in capsys.readouterr().err  # the diffusers progress bar still runs


def test_plugin_on_tiny_world_pipeline():
    try:
        from studio.world.assets import load_diffusion

        world = load_diffusion()
    except (ImportError, FileNotFoundError, OSError) as err:
        pytest.skip(f"tiny world diffusion assets not installed yet: {err}")
    studio = StudioStableDiffusionPipeline.from_pipe(world)
    studio.set_progress_bar_config(disable=True)
    studio.add_studio_adapter("attn", example_lora_parts(studio.unet, "example-attn"), strength=1.0)
    img = studio(
        "a red circle",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        studio_schedules={"attn": "0:1, 1:0"},
    ).images[0]
    assert np.asarray(img).std() > 0
