"""Interop both ways with vanilla diffusers + PEFT on a tiny StableDiffusionPipeline (no hub)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from formats_tiny import generate, randomize_lora, tiny_pipeline
from safetensors import safe_open

from adapters import formats
from adapters.base import adapter_names, get_spec, inject
from adapters.lora import LoraSpec

pytest.importorskip("peft")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", r".*resnets\.\d+\.conv1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
ATOL = 1e-5  # float summation order differs; a real mismatch is ~1e-1 (see the first assert)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).max()) <= ATOL


@pytest.fixture(scope="module")
def base_images(tmp_path_factory) -> np.ndarray:
    return generate(tiny_pipeline(tmp_path_factory.mktemp("base")))


def _studio_pipe(tmp_path, init: str = "default"):
    pipe = tiny_pipeline(tmp_path)
    inject(pipe.unet, LoraSpec(targets=UNET_TARGETS, rank=4, alpha=8.0, init=init), "style")
    inject(pipe.text_encoder, LoraSpec(targets=TE_TARGETS, rank=2, alpha=3.0, use_rslora=True), "style")
    randomize_lora(pipe.unet, seed=1)
    randomize_lora(pipe.text_encoder, seed=2)
    return pipe


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_studio_lora_loads_with_vanilla_load_lora_weights(tmp_path, base_images, init: str) -> None:
    pipe = _studio_pipe(tmp_path, init)
    studio_images = generate(pipe)
    assert not _close(studio_images, base_images)  # the adapter really changes the images

    folder = formats.save_adapter(
        pipe, "style", tmp_path / "diffusers", base_model_id="tiny", format="diffusers"
    )
    with safe_open(str(folder), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("unet.") and k.endswith(".lora_A.weight") for k in keys)
    assert any(k.startswith("text_encoder.") and k.endswith(".lora_B.weight") for k in keys)

    vanilla = tiny_pipeline(tmp_path)
    vanilla.load_lora_weights(str(folder.parent))  # the folder, as users pass it
    assert set(vanilla.unet.peft_config) and set(vanilla.text_encoder.peft_config)
    assert _close(generate(vanilla), studio_images)

    # The same adapter through a kohya file, read by diffusers' own kohya converter.
    kohya = formats.save_adapter(
        pipe, "style", tmp_path / "k.safetensors", base_model_id="tiny", format="kohya"
    )
    vanilla_k = tiny_pipeline(tmp_path)
    vanilla_k.load_lora_weights(str(kohya))
    assert _close(generate(vanilla_k), studio_images)


def test_text_encoder_part_matters(tmp_path) -> None:
    """Guard against a silently dropped text-encoder LoRA: prompt embeddings must move."""
    pipe = _studio_pipe(tmp_path)
    folder = formats.save_adapter(pipe, "style", tmp_path / "d", base_model_id="tiny", format="diffusers")
    plain = tiny_pipeline(tmp_path)
    vanilla = tiny_pipeline(tmp_path)
    vanilla.load_lora_weights(str(folder))
    ids = plain.tokenizer(["a red cat"], return_tensors="pt").input_ids
    with torch.no_grad():
        e0 = plain.text_encoder(ids)[0]
        e1 = vanilla.text_encoder(ids)[0]
        e2 = pipe.text_encoder(ids)[0]
    assert (e1 - e0).abs().max() > 1e-2
    torch.testing.assert_close(e1, e2, rtol=0, atol=ATOL)


def _peft_pipe(tmp_path):
    from peft import LoraConfig

    pipe = tiny_pipeline(tmp_path)
    torch.manual_seed(5)
    unet_config = LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"],
        rank_pattern={"to_k": 2},
        alpha_pattern={"to_v": 3},
        init_lora_weights=False,
    )
    pipe.unet.add_adapter(unet_config)
    pipe.text_encoder.add_adapter(
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    return pipe


def test_diffusers_peft_lora_loads_into_the_studio(tmp_path, base_images) -> None:
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    pipe = _peft_pipe(tmp_path)
    peft_images = generate(pipe)
    assert not _close(peft_images, base_images)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "peft",
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
    )
    info = formats.read_adapter_info(tmp_path / "peft")
    assert (info.format, info.rank, info.alpha) == ("diffusers", 4, 6.0)
    assert "text_encoder.encoder.layers.0.self_attn.q_proj" in info.targets

    studio = tiny_pipeline(tmp_path)
    name = formats.load_adapter(studio, tmp_path / "peft", "peft")
    assert adapter_names(studio.unet) == [name] and adapter_names(studio.text_encoder) == [name]
    assert _close(generate(studio), peft_images)
    # Ranks 4 and 2 share one spec: the rank-2 modules are zero-padded, alphas folded in.
    assert get_spec(studio.unet, "peft").rank == 4

    # ...and it survives a trip through the studio folder and back to diffusers.
    folder = formats.convert(tmp_path / "peft", tmp_path / "studio", to="studio")
    back = formats.convert(folder, tmp_path / "back.safetensors", to="diffusers")
    vanilla = tiny_pipeline(tmp_path)
    vanilla.load_lora_weights(str(back))
    assert _close(generate(vanilla), peft_images)


def test_bare_model_peft_file_and_no_metadata_convention(tmp_path) -> None:
    """``unet.save_lora_adapter`` (unprefixed keys) and a file without any LoraConfig."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    pipe = _peft_pipe(tmp_path)
    expected = generate(pipe)
    pipe.unet.save_lora_adapter(str(tmp_path / "bare"))
    studio = tiny_pipeline(tmp_path)
    formats.load_adapter(studio.unet, tmp_path / "bare", "u")
    # Only the UNet part was saved, so compare with the UNet LoRA alone.
    pipe.text_encoder.disable_adapters()
    assert _close(generate(studio), generate(pipe))
    pipe.text_encoder.enable_adapters()
    assert _close(generate(pipe), expected)

    # No metadata: diffusers takes alpha = rank (scale 1); the studio must agree.
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()}
    save_file(state, str(tmp_path / "plain.safetensors"))
    vanilla = tiny_pipeline(tmp_path)
    vanilla.load_lora_weights(str(tmp_path / "plain.safetensors"))
    studio = tiny_pipeline(tmp_path)
    formats.load_adapter(studio, tmp_path / "plain.safetensors")
    assert _close(generate(studio), generate(vanilla))


def _tiny_sd3(seed: int = 0) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=8,
    ).eval()


def _sd3_run(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(2, 4, 8, 8, generator=g),
            encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
            pooled_projections=torch.randn(2, 16, generator=g),
            timestep=torch.full((2,), 10),
        ).sample


def test_diffusers_transformer_both_ways(tmp_path) -> None:
    """A DiT-style transformer: studio -> ``load_lora_adapter`` and PEFT -> studio."""
    from peft import LoraConfig

    studio = _tiny_sd3()
    inject(studio, LoraSpec(targets=["to_q", "to_k", "add_q_proj", "ff.net.2"], rank=4, alpha=2.0), "s")
    randomize_lora(studio)
    expected = _sd3_run(studio)
    path = formats.save_adapter(
        studio, "s", tmp_path / "t.safetensors", base_model_id="x", format="diffusers"
    )
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())
    vanilla = _tiny_sd3()
    vanilla.load_lora_adapter(str(path), prefix="transformer")  # what the SD3 pipeline's loader calls
    assert not torch.allclose(_sd3_run(_tiny_sd3()), expected, atol=1e-3)
    torch.testing.assert_close(_sd3_run(vanilla), expected, rtol=0, atol=ATOL)

    peft_model = _tiny_sd3()
    peft_model.add_adapter(
        LoraConfig(r=2, lora_alpha=5, target_modules=["to_q", "proj_out"], init_lora_weights=False)
    )
    peft_out = _sd3_run(peft_model)
    peft_model.save_lora_adapter(str(tmp_path / "peft"))
    loaded = _tiny_sd3()
    formats.load_adapter(loaded, tmp_path / "peft")
    torch.testing.assert_close(_sd3_run(loaded), peft_out, rtol=0, atol=ATOL)
