"""Studio folder format, kohya round trip, conversions, info; every method x tiny model on disk."""

from __future__ import annotations

import json
import os

import pytest
import torch
from formats_tiny import generate, randomize_lora, tiny_pipeline
from safetensors import safe_open
from test_core_matrix import MATRIX, METHOD_SPECS, _inputs, _perturb, _setup
from tiny_models import TinyCase, tiny_unet

from adapters import formats
from adapters.base import (
    AdapterError,
    adapter_names,
    adapter_state_dict,
    get_spec,
    get_strengths,
    inject,
    unload,
)
from adapters.formats_io import AdapterFileError
from adapters.lora import LoraSpec

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", r".*resnets\.\d+\.conv1"]


def _unet_inputs() -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor(7),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
    }


def _lora_unet(spec: LoraSpec, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    unet = tiny_unet().eval()
    inject(unet, spec, "style")
    randomize_lora(unet, 0.2, seed)
    return unet


def _fresh_unet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tiny_unet().eval()


def _run(unet: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return unet(**_unet_inputs()).sample


# Cases where a method does not apply (its matrix_spec returns None) are left out.
APPLICABLE = [(m, c) for m, c in MATRIX if METHOD_SPECS[m](c) is not None]


@pytest.mark.parametrize("method,case", APPLICABLE, ids=[f"{m}-{c.name}" for m, c in APPLICABLE])
def test_studio_folder_round_trip_is_bit_exact(tmp_path, method: str, case: TinyCase) -> None:
    model, spec = _setup(method, case)
    inject(model, spec, "a")
    _perturb(model, "a")
    inputs = _inputs(case)
    with torch.no_grad():
        expected = case.run(model, inputs)
    saved = adapter_state_dict(model, "a")
    folder = formats.save_adapter(model, "a", tmp_path / "ad", base_model_id=case.name, metadata={"seed": 0})
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]

    fresh, _ = _setup(method, case)
    assert formats.load_adapter(fresh, folder, base_model_id=case.name) == "a"
    assert get_spec(fresh, "a") == spec
    loaded = adapter_state_dict(fresh, "a")
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(case.run(fresh, inputs), expected)


def test_studio_config_contents_and_info(tmp_path) -> None:
    spec = LoraSpec(targets=UNET_TARGETS, rank=4, alpha=8.0)
    unet = _lora_unet(spec)
    folder = formats.save_adapter(
        unet, "style", tmp_path / "s", base_model_id="tiny-unet", metadata={"steps": 5}
    )
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["format"] == "adapter-studio" and config["format_version"] == 1
    assert config["method"] == "lora" and config["spec"] == spec.to_dict()
    assert config["base_model_id"] == "tiny-unet" and config["metadata"] == {"steps": 5}
    shapes = config["components"][""]["shapes"]
    state = adapter_state_dict(unet, "style")
    assert shapes == {k: list(v.shape) for k, v in state.items()}
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["studio.config"])["spec"] == spec.to_dict()

    info = formats.read_adapter_info(folder)
    assert (info.format, info.method, info.rank, info.alpha) == ("studio", "lora", 4, 8.0)
    assert info.base_model_id == "tiny-unet" and info.metadata == {"steps": 5}
    assert info.n_params == sum(t.numel() for t in state.values())
    assert "mid_block.attentions.0.transformer_blocks.0.attn1.to_q" in info.targets
    assert "down_blocks.0.resnets.0.conv1" in info.targets
    assert info.size_bytes > 4 * info.n_params
    assert dict(info)["rank"] == 4 and info.get("metadata") == {"steps": 5}
    # The weights file alone is self-describing.
    assert formats.read_adapter_info(folder / "adapter_model.safetensors").rank == 4


def test_save_is_atomic_and_replaces_an_old_folder(tmp_path) -> None:
    unet = _lora_unet(LoraSpec(targets=["to_q"], rank=2))
    target = tmp_path / "ad"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    formats.save_adapter(unet, "style", target, base_model_id="x")
    assert sorted(os.listdir(tmp_path)) == ["ad"]  # no temp folder left behind
    assert not (target / "stale.txt").exists()


def test_load_sets_strength_and_refuses_name_clash(tmp_path) -> None:
    unet = _lora_unet(LoraSpec(targets=["to_q", "to_v"], rank=2))
    folder = formats.save_adapter(unet, "style", tmp_path / "s", base_model_id="x")
    fresh = _fresh_unet()
    formats.load_adapter(fresh, folder, "soft", strength=0.5)
    assert set(get_strengths(fresh, "soft").values()) == {0.5}
    with pytest.raises(AdapterError, match="already on the model"):
        formats.load_adapter(fresh, folder, "soft")
    with pytest.raises(AdapterError, match="torch attribute"):
        formats.load_adapter(fresh, folder, "half")
    assert adapter_names(fresh) == ["soft"]


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_kohya_round_trip(tmp_path, init: str) -> None:
    spec = LoraSpec(targets=UNET_TARGETS, rank=4, alpha=3.0, init=init)
    unet = _lora_unet(spec)
    expected = _run(unet)
    meta = {"steps": 120, "lr": 1e-4, "seed": 3}
    path = formats.save_adapter(
        unet, "style", tmp_path / "k.safetensors", base_model_id="tiny", metadata=meta, format="kohya"
    )
    with safe_open(str(path), "pt") as f:
        keys, md = list(f.keys()), f.metadata()
    assert all(k.startswith("lora_unet_") for k in keys)
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.alpha" in keys
    rank = 4 if init == "default" else 8  # PiSSA exports exactly as a plain rank-2r LoRA
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == str(rank)
    assert float(md["ss_network_alpha"]) == pytest.approx(spec.scale() * rank)
    assert md["ss_max_train_steps"] == "120" and md["ss_learning_rate"] == "0.0001" and md["ss_seed"] == "3"
    assert "ss_base_model_version" in md

    fresh = _fresh_unet()
    formats.load_adapter(fresh, path, "back")
    torch.testing.assert_close(_run(fresh), expected, rtol=0, atol=1e-5)
    if init == "default":  # same factors and scale, bit for bit
        a, b = adapter_state_dict(unet, "style"), adapter_state_dict(fresh, "back")
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert get_spec(fresh, "back").scale() == spec.scale()
    # kohya -> studio -> kohya keeps every tensor.
    studio = formats.convert(path, tmp_path / "studio", to="studio")
    again = formats.convert(studio, tmp_path / "k2.safetensors", to="kohya")
    with safe_open(str(path), "pt") as f1, safe_open(str(again), "pt") as f2:
        assert set(f1.keys()) == set(f2.keys())
        assert all(torch.equal(f1.get_tensor(k), f2.get_tensor(k)) for k in f1.keys())


def test_kohya_names_resolve_against_real_modules(tmp_path) -> None:
    """A foreign kohya file (no recorded names) resolves ``to_out_0`` to ``to_out.0`` etc."""
    unet = _lora_unet(LoraSpec(targets=["to_out.0", "proj_in", "time_emb_proj"], rank=2, alpha=2.0))
    path = formats.save_adapter(unet, "style", tmp_path / "k.safetensors", base_model_id="", format="kohya")
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(tmp_path / "foreign.safetensors"))  # drops the studio metadata
    fresh = _fresh_unet()
    formats.load_adapter(fresh, tmp_path / "foreign.safetensors", "f")
    torch.testing.assert_close(_run(fresh), _run(unet), rtol=0, atol=1e-6)
    names = {n for n, _ in fresh.named_modules() if n.endswith("to_out.0")}
    assert names and all(type(fresh.get_submodule(n)).__name__ == "AdaptedModule" for n in names)
    with pytest.raises(AdapterFileError, match="base model"):
        formats.convert(tmp_path / "foreign.safetensors", tmp_path / "out", to="studio")
    assert formats.convert(
        tmp_path / "foreign.safetensors", tmp_path / "out", to="studio", base_model=tiny_unet()
    )


def test_kohya_text_encoder_keys_need_a_text_encoder(tmp_path) -> None:
    pipe = tiny_pipeline(tmp_path)
    inject(pipe.unet, LoraSpec(targets=["to_q"], rank=2), "s")
    inject(pipe.text_encoder, LoraSpec(targets=["q_proj", "out_proj"], rank=2), "s")
    randomize_lora(pipe.unet)
    randomize_lora(pipe.text_encoder)
    path = formats.save_adapter(pipe, "s", tmp_path / "k.safetensors", base_model_id="tiny", format="kohya")
    with safe_open(str(path), "pt") as f:
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in f.keys()
    expected = generate(pipe)
    fresh = tiny_pipeline(tmp_path)
    formats.load_adapter(fresh, path)
    assert adapter_names(fresh.text_encoder) == ["k"]
    torch.testing.assert_close(
        torch.from_numpy(generate(fresh)), torch.from_numpy(expected), rtol=0, atol=1e-6
    )
    bare = tiny_unet()
    with pytest.raises(AdapterFileError, match="text_encoder"):
        formats.load_adapter(bare, path)
    assert adapter_names(bare) == []


def test_model_free_conversions_keep_the_function(tmp_path) -> None:
    spec = LoraSpec(targets=UNET_TARGETS, rank=3, alpha=5.0, use_rslora=True)
    unet = _lora_unet(spec, seed=4)
    expected = _run(unet)
    studio = formats.save_adapter(unet, "style", tmp_path / "s", base_model_id="tiny")
    chain = [
        ("diffusers", tmp_path / "d.safetensors"),
        ("kohya", tmp_path / "k.safetensors"),
        ("studio", tmp_path / "s2"),
    ]
    src = studio
    for to, dst in chain:
        src = formats.convert(src, dst, to=to)
        assert formats.detect_format(src)[0] == to
        fresh = _fresh_unet(4)
        formats.load_adapter(fresh, src, "c")
        torch.testing.assert_close(_run(fresh), expected, rtol=0, atol=1e-5)
    assert formats.read_adapter_info(src).base_model_id == "tiny"
    with pytest.raises(AdapterError, match="unknown target format"):
        formats.convert(studio, tmp_path / "x", to="ckpt")
    with pytest.raises(AdapterError, match="unknown format"):
        formats.save_adapter(unet, "style", tmp_path / "y", base_model_id="tiny", format="ckpt")


def test_only_lora_exports_to_plain_formats(tmp_path) -> None:
    from adapters.tesla import TeslaSpec

    torch.manual_seed(0)
    unet = tiny_unet()
    inject(unet, TeslaSpec(targets=["to_q"]), "t")
    studio = formats.save_adapter(unet, "t", tmp_path / "t", base_model_id="x")
    with pytest.raises(AdapterError, match="only LoRA"):
        formats.save_adapter(unet, "t", tmp_path / "t.safetensors", base_model_id="x", format="kohya")
    with pytest.raises(AdapterError, match="only LoRA"):
        formats.convert(studio, tmp_path / "t2.safetensors", to="diffusers")
    unload(unet)
