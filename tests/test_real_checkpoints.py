"""Every world model slot also loads a real checkpoint through the library's own loader.

The "real" checkpoints here are tiny models built from config and saved in each library's
native layout (timm folder / single file / Meta's DINOv2 keys, open_clip folder / file,
diffusers SD, SDXL and FLUX folders); the loaders must give back the same network.
"""

from __future__ import annotations

import json

import pytest
import torch

from studio.world import assets

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_timm_folder_and_file(tmp_path):
    import timm
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **TINY_VIT)
    save_for_hf(model, str(tmp_path / "folder"), safe_serialization=True)
    x = torch.randn(2, 3, 32, 32)
    _same_outputs(model, assets.load_vit(tmp_path / "folder"), x)
    cfg = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["model_args"]["depth"] == 1

    save_file(model.state_dict(), str(tmp_path / "vit.safetensors"))
    loaded = assets.load_vit(
        tmp_path / "vit.safetensors", arch="vit_tiny_patch16_224", num_classes=3, **TINY_VIT
    )
    _same_outputs(model, loaded, x)
    with pytest.raises(ValueError, match="arch="):
        assets.load_vit(tmp_path / "vit.safetensors")


def test_dinov2_meta_checkpoint_file(tmp_path):
    """An original DINOv2 checkpoint (Meta's key names: register_tokens, mask_token) loads via timm."""
    import timm

    args = dict(TINY_VIT, img_size=28, patch_size=14)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, **args)
    state = dict(model.state_dict())
    state["register_tokens"] = state.pop("reg_token")
    state["mask_token"] = torch.zeros(1, args["embed_dim"])
    # Meta's pos_embed has a row for the class token (timm folds it into cls_token).
    state["pos_embed"] = torch.cat([torch.zeros(1, 1, args["embed_dim"]), state["pos_embed"]], 1)
    torch.save(state, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    loaded = assets.load_dinov2(
        tmp_path / "dinov2_vits14_reg4_pretrain.pth", arch="vit_small_patch14_reg4_dinov2", **args
    )
    _same_outputs(model, loaded, torch.randn(2, 3, 28, 28))


def _tiny_open_clip_cfg() -> dict:
    return {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def test_open_clip_folder_and_file(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    cfg = _tiny_open_clip_cfg()
    model = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]).eval()
    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    image = torch.randn(1, 3, 32, 32)

    loaded, preprocess, tokenizer = assets.load_clip(folder)
    text = tokenizer(["a red circle"])
    assert text.shape == (1, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(image), model.encode_image(image))
        torch.testing.assert_close(loaded.encode_text(text), model.encode_text(text))

    # A checkpoint file plus the name of a registered config (here added from a json file).
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "tiny-test-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "cfgs")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "epoch_1.pt")
    loaded2, _, tokenizer2 = assets.load_clip(tmp_path / "epoch_1.pt", model_name="tiny-test-clip")
    with torch.no_grad():
        torch.testing.assert_close(
            loaded2.encode_text(tokenizer2(["a cat"])), model.encode_text(tokenizer2(["a cat"]))
        )


def _clip_text_parts(hidden: int = 32, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.world.recipes.clip import hf_tokenizer

    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=32, projection_dim=hidden,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)
    return model.eval(), hf_tokenizer()


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32,
    )  # fmt: skip


def _tiny_unet(**extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2, norm_num_groups=8, **extra,
    )  # fmt: skip


def _generate(pipe) -> torch.Tensor:
    out = pipe(
        "a red circle", num_inference_steps=2, guidance_scale=2.0, height=32, width=32, output_type="pt"
    )
    return out.images


@pytest.mark.slow
def test_diffusers_sd_folder(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    text_encoder, tokenizer = _clip_text_parts()
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=_tiny_unet(cross_attention_dim=32),
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(str(tmp_path / "sd"))
    loaded = assets.load_diffusion(tmp_path / "sd")
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    torch.manual_seed(0)
    a = _generate(loaded)
    torch.manual_seed(0)
    pipe.set_progress_bar_config(disable=True)
    b = _generate(pipe)
    assert a.shape == (1, 3, 32, 32)
    torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_diffusers_sdxl_folder(tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    te1, tok = _clip_text_parts(32)
    te2, _ = _clip_text_parts(32, projection=True)
    unet = _tiny_unet(
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )  # fmt: skip
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=EulerDiscreteScheduler(),
    )  # fmt: skip
    pipe.save_pretrained(str(tmp_path / "sdxl"))
    loaded = assets.load_diffusion(tmp_path / "sdxl")
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    assert _generate(loaded).shape == (1, 3, 32, 32)


@pytest.mark.slow
def test_diffusers_flux_folder(tmp_path):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    te, tok = _clip_text_parts(32)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
        (f"\u2581{w}", -1.0) for w in "a red circle".split()
    ]
    t5_tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    )
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=32, axes_dims_rope=[2, 2, 4],
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=8, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=te, tokenizer=tok,
        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer,
    )  # fmt: skip
    pipe.save_pretrained(str(tmp_path / "flux"))
    loaded = assets.load_diffusion(tmp_path / "flux")
    assert type(loaded).__name__ == "FluxPipeline"
    out = loaded(
        "a red circle", num_inference_steps=2, height=32, width=32, max_sequence_length=8, output_type="pt"
    )
    assert out.images.shape == (1, 3, 32, 32)


def test_missing_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        assets.load_diffusion(tmp_path)
    with pytest.raises(FileNotFoundError, match="timm folder"):
        assets.load_vit(tmp_path)
    with pytest.raises(KeyError):
        assets.asset_path("nope")
