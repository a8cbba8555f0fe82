"""The shipped world models load through the standard loaders and do what their cards say.

Each test checks a property that a broken or untrained asset would fail: probe and zero-shot
accuracies far above chance, the diffusion model drawing the prompted colour and shape (as
judged by the small CLIP), the text encoder being exactly the CLIP's text tower, the pointmap
model beating a bound. Few images, few steps: the whole file runs in well under a minute.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from studio.world import assets, shapes
from studio.world.recipes.common import label_attrs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scorer():
    return assets.clip_scorer()


@pytest.fixture(scope="module")
def world():
    data = shapes.make_captioned(300, seed=4242)
    return data, label_attrs(data.attrs)


def _probe(model, data, labels, attr: str) -> float:
    from sklearn.linear_model import LogisticRegression

    from studio.world.recipes.backbones import extract

    feats = extract(model, data.images, "cpu")
    clf = LogisticRegression(max_iter=2000).fit(feats[:200], labels[attr][:200])
    return clf.score(feats[200:], labels[attr][200:])


def test_vit_loads_with_timm_local_dir_and_transfers(world):
    import timm

    folder = assets.asset_path(assets.VIT)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["model_args"]["patch_size"] == 8
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    data, labels = world
    assert _probe(model, data, labels, "shape") > 0.7  # chance 0.2
    # Its own supervised head (first group of logits = shapes) reads the shape too.
    with torch.no_grad():
        x = torch.from_numpy(data.images[:100]).permute(0, 3, 1, 2).float() / 127.5 - 1
        pred = model(x)[:, : len(shapes.SHAPES)].argmax(1).numpy()
    assert (pred == labels["shape"][:100]).mean() > 0.8


def test_dinov2_architecture_and_features(world):
    model = assets.load_dinov2()
    cfg = json.loads((assets.asset_path(assets.DINOV2) / "config.json").read_text())
    assert cfg["architecture"] == "vit_small_patch14_reg4_dinov2"
    assert model.num_reg_tokens == 4 and model.num_classes == 0
    data, labels = world
    # Self-supervised, never saw a label: colour and background are linearly readable.
    assert _probe(model, data, labels, "colour") > 0.9  # chance ~0.2
    assert _probe(model, data, labels, "background") > 0.9


def test_clip_zero_shot_attributes(scorer, world):
    data, labels = world
    pred = scorer.classify(data.images[:120], ("shape", "colour", "background"))
    acc = {a: float((pred[a] == labels[a][:120]).mean()) for a in pred}
    assert acc["shape"] > 0.8 and acc["colour"] > 0.9 and acc["background"] > 0.9, acc


def test_clip_loads_through_open_clip_local_dir():
    import open_clip

    folder = assets.asset_path(assets.CLIP)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    assert tokenizer(["a red circle"]).shape == (1, 32)
    img = shapes.render(shapes.SceneAttrs("circle", "red", "large", 0.5, 0.5, "white", "flat"))
    from PIL import Image

    with torch.no_grad():
        image = model.encode_image(preprocess(Image.fromarray(img))[None])
        text = model.encode_text(tokenizer(["a large red circle on a white background", "a small blue star"]))
    sim = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    assert sim[0, 0] > sim[0, 1]


def test_diffusion_text_encoder_is_the_clip_text_tower():
    from diffusers import DiffusionPipeline

    from studio.world.recipes.clip import open_clip_token_states

    pipe = DiffusionPipeline.from_pretrained(str(assets.asset_path(assets.DIFFUSION)))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    clip, _, tokenizer = assets.load_clip()
    prompts = ["a small red triangle on a striped blue background", "a red circle", ""]
    ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=32, truncation=True, return_tensors="pt"
    ).input_ids
    assert torch.equal(ids, tokenizer(prompts))
    with torch.no_grad():
        ours = pipe.text_encoder(ids).last_hidden_state
        theirs = open_clip_token_states(clip, ids)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("colour,shape", [("red", "circle"), ("blue", "square")])
def test_diffusion_follows_colour_and_shape(scorer, colour, shape):
    pipe = assets.load_diffusion()
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    out = pipe(
        [f"a {colour} {shape}"] * 6,
        num_inference_steps=12,
        guidance_scale=5.0,
        generator=gens,
        output_type="np",
    )
    images = (out.images * 255).round().astype(np.uint8)
    assert images.shape == (6, 64, 64, 3)
    pred = scorer.predict_names(images, ("shape", "colour"))
    # Chance is 1/6 for a colour and 1/5 for a shape.
    assert pred["colour"].count(colour) >= 5, pred
    assert pred["shape"].count(shape) >= 3, pred


def test_pointmap_beats_bound():
    from studio.world import multiview, pointmap_model

    model = assets.load_pointmap()
    result = pointmap_model.evaluate(model, multiview.make_pairs(16, seed=4321))
    # The card's "mean pointmap" prior scores ~0.17 median relative error; the model ~0.11.
    assert result["median_rel_err"] < 0.15, result


def test_cards_and_build_report_carry_measurements():
    report = json.loads((assets.assets_dir() / "world_build.json").read_text())
    assert "H100" in report["runs"][-1]["device"]
    for name in assets.ASSET_NAMES:
        folder = assets.asset_path(name)
        card = (folder / "README.md").read_text()
        assert re.search(r"\d\.\d", card), name
        assert name in report["models"]
    sizes = sum(f.stat().st_size for f in assets.assets_dir().rglob("*") if f.is_file())
    assert sizes < 80 * 2**20


def test_world_info_lists_every_asset(capsys):
    from studio.cli import main

    assert main(["world", "info"]) == 0
    out = capsys.readouterr().out
    for name in assets.ASSET_NAMES:
        assert re.search(rf"{name}\s+\d+\.\d+ MB", out), out


def test_only_rejects_unknown_names():
    from studio.world.recipes.build import parse_only

    assert parse_only("clip-tiny-world, diffusion-tiny") == ["clip-tiny-world", "diffusion-tiny"]
    with pytest.raises(ValueError, match="unknown world model"):
        parse_only("clip")


def test_smoke_build_writes_loadable_clip(tmp_path):
    """The build recipe end to end (a few steps, tiny data) for the CLIP: loads with open_clip."""
    from studio.commands.world import main

    assert (
        main(["build", "--smoke", "--device", "cpu", "--only", "clip-tiny-world", "--out", str(tmp_path)])
        == 0
    )
    model, _, tokenizer = assets.load_clip(tmp_path / "clip-tiny-world")
    assert model.encode_text(tokenizer(["a red circle"])).shape == (1, 128)
    assert (tmp_path / "clip-tiny-world" / "README.md").exists()
    report = json.loads((tmp_path / "world_build.json").read_text())
    assert report["models"]["clip-tiny-world"]["train"]["steps"] == 3


def test_docs_python_example_runs(capsys):
    text = (ROOT / "docs" / "world_models.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/world_models.md", "exec"), {})
    assert "(1, 192)" in capsys.readouterr().out.replace("torch.Size([1, 192])", "(1, 192)")
