"""Bad files: each gives a clear AdapterFileError naming the file (and key) and changes nothing."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from formats_tiny import randomize_lora, same_snapshot, snapshot
from safetensors.torch import load_file, save_file
from tiny_models import tiny_dit, tiny_unet

from adapters import formats, formats_studio
from adapters.base import AdapterError, inject
from adapters.formats_io import AdapterFileError
from adapters.lora import LoraSpec

TARGETS = ["to_q", "to_v", r".*resnets\.\d+\.conv1"]


def _unet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tiny_unet().eval()


@pytest.fixture
def saved(tmp_path) -> dict[str, Path]:
    """One LoRA saved in every format."""
    unet = _unet()
    inject(unet, LoraSpec(targets=TARGETS, rank=2, alpha=2.0), "style")
    randomize_lora(unet)
    kw = {"base_model_id": "tiny-unet"}
    return {
        "studio": formats.save_adapter(unet, "style", tmp_path / "studio", **kw),
        "diffusers": formats.save_adapter(
            unet, "style", tmp_path / "d.safetensors", format="diffusers", **kw
        ),
        "kohya": formats.save_adapter(unet, "style", tmp_path / "k.safetensors", format="kohya", **kw),
    }


@pytest.fixture
def model() -> torch.nn.Module:
    """A UNet that already carries another adapter, which must survive every failed load."""
    unet = _unet()
    inject(unet, LoraSpec(targets=["to_k"], rank=2), "keep")
    randomize_lora(unet, seed=9)
    return unet


def _refused(model: torch.nn.Module, path: Path, match: str, **kw) -> str:
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=match) as err:
        formats.load_adapter(model, path, **kw)
    assert same_snapshot(before, snapshot(model)), "a failed load changed the model"
    message = str(err.value)
    assert str(path.name) in message and "\n" not in message
    return message


def _weights(saved: dict[str, Path], fmt: str) -> Path:
    p = saved[fmt]
    return p / "adapter_model.safetensors" if p.is_dir() else p


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickles_are_refused_without_unpickling(tmp_path, model, monkeypatch, suffix: str) -> None:
    path = tmp_path / f"lora{suffix}"
    torch.save({"w": torch.zeros(2)}, path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    message = _refused(model, path, "refusing to load a pickle")
    assert "safetensors.torch.save_file" in message
    with pytest.raises(AdapterFileError, match="pickle"):
        formats.read_adapter_info(path)


def test_disguised_pickle_and_pickle_only_folder(tmp_path, model) -> None:
    disguised = tmp_path / "lora.safetensors"
    disguised.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    _refused(model, disguised, "pickle")
    folder = tmp_path / "peft"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "adapter_model.bin")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    _refused(model, folder, "pickle")


@pytest.mark.parametrize("fmt", ["studio", "diffusers", "kohya"])
def test_truncated_file_names_the_cut_tensor(saved, model, fmt: str) -> None:
    path = _weights(saved, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    message = _refused(model, saved[fmt], "truncated")
    assert "tensor '" in message


def test_corrupt_header_and_garbage(tmp_path, saved, model) -> None:
    path = _weights(saved, "diffusers")
    data = bytearray(path.read_bytes())
    data[8:20] = b"#" * 12  # break the JSON header
    path.write_bytes(bytes(data))
    _refused(model, path, "corrupt safetensors header")
    garbage = tmp_path / "noise.safetensors"
    garbage.write_bytes(b"\x07" * 3)
    _refused(model, garbage, "not a safetensors file")
    config = saved["studio"] / "adapter_config.json"
    config.write_text("{not json")
    _refused(model, saved["studio"], "corrupt JSON")


def _rewrite(path: Path, edit) -> None:
    """Change one tensor of a safetensors file, keeping its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)


def _first(tensors: dict, part: str) -> str:
    return sorted(k for k in tensors if part in k)[0]


@pytest.mark.parametrize("fmt,part", [("studio", "lora_A"), ("diffusers", "lora_A"), ("kohya", "lora_down")])
def test_wrong_shape_names_the_key(saved, model, fmt: str, part: str) -> None:
    path = _weights(saved, fmt)
    bad = {}

    def edit(t):
        bad["key"] = key = _first(t, part)
        t[key] = torch.zeros(t[key].shape[0], t[key].shape[1] + 3, *t[key].shape[2:])

    _rewrite(path, edit)
    message = _refused(model, saved[fmt], "shape")
    module = bad["key"].split(".lora")[0].removeprefix("unet.").removeprefix("lora_unet_")
    assert module in message


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("fmt", ["studio", "diffusers", "kohya"])
def test_nan_or_inf_weights_name_the_key(saved, model, fmt: str, value: float) -> None:
    path = _weights(saved, fmt)
    bad = {}

    def edit(t):
        bad["key"] = key = _first(t, "lora_B" if fmt != "kohya" else "lora_up")
        t[key][0, 0] = value

    _rewrite(path, edit)
    message = _refused(model, saved[fmt], "NaN" if value != value else "Inf")
    assert repr(bad["key"]) in message


def test_lora_for_another_base_model(tmp_path, saved, model) -> None:
    _refused(model, saved["studio"], "made for base model 'tiny-unet'", base_model_id="sd15")
    _refused(model, saved["diffusers"], "made for base model", base_model_id="sd15")
    # A DiT LoRA on a UNet: its keys name modules the UNet does not have.
    torch.manual_seed(0)
    dit = tiny_dit()
    inject(dit, LoraSpec(targets=["ff.net.2"], rank=2), "d")
    for fmt, name in (("studio", "dit"), ("diffusers", "dit.safetensors"), ("kohya", "dit_k.safetensors")):
        path = formats.save_adapter(dit, "d", tmp_path / name, base_model_id="", format=fmt)
        _refused(model, path, "another base model")
    # A UNet with other widths: same names, other shapes.
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    wide = UNet2DConditionModel(**{**dict(tiny_unet().config), "block_out_channels": (24, 48)})
    before = snapshot(wide)
    with pytest.raises(AdapterFileError, match="shape"):
        formats.load_adapter(wide, saved["studio"])
    assert same_snapshot(before, snapshot(wide))


def test_failure_after_injection_removes_the_adapter(saved, model, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(formats_studio, "load_adapter_state_dict", boom)
    before = snapshot(model)
    for fmt in saved:
        with pytest.raises(RuntimeError, match="disk on fire"):
            formats.load_adapter(model, saved[fmt], "new")
        assert same_snapshot(before, snapshot(model))


def test_unknown_files_and_keys(tmp_path, model) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(path))
    _refused(model, path, "not an adapter file")
    dora = tmp_path / "dora.safetensors"
    save_file(
        {
            "unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 32),
            "unet.mid_block.attentions.0.proj_in.lora_magnitude_vector": torch.zeros(32),
        },
        str(dora),
    )
    _refused(model, dora, "not a plain LoRA factor")
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}, str(loha))
    _refused(model, loha, "not a plain kohya LoRA")
    with pytest.raises(AdapterFileError, match="no such file"):
        formats.load_adapter(model, tmp_path / "absent.safetensors")
    with pytest.raises(AdapterError):
        formats.read_adapter_info(tmp_path / "absent")
