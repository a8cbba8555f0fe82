"""The two-view pointmap model: shapes, loss, augmentation geometry, training smoke, save/load."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from studio.world import multiview
from studio.world.pointmap_model import (
    PointmapConfig,
    PointmapNet,
    load_pointmap,
    pointmap_loss,
    save_pointmap,
    to_input,
)
from studio.world.pointmap_train import SMOKE, augment, make_pair_data, train_pointmap

TINY = PointmapConfig(image_size=16, patch_size=4, dim=32, heads=2, enc_depth=1, dec_depth=1)


@pytest.fixture(scope="module")
def data():
    return make_pair_data(8, seed=0, size=16, workers=1)


def _batch(data, n=8):
    return {k: torch.as_tensor(v[:n]) for k, v in data.items()}


def test_forward_shapes_and_config_round_trip():
    model = PointmapNet(TINY)
    out = model(torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16))
    assert out["pts1"].shape == out["pts2"].shape == (3, 16, 16, 3)
    assert out["conf1"].shape == (3, 16, 16) and (out["conf1"] > 1).all()
    assert PointmapConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY
    # Another resolution works (position embedding interpolated).
    assert model(torch.rand(1, 3, 24, 24), torch.rand(1, 3, 24, 24))["pts2"].shape == (1, 24, 24, 3)
    with pytest.raises(ValueError):
        PointmapNet(replace(TINY, image_size=18))


def test_loss_is_scale_invariant_and_rewards_confidence(data):
    b = _batch(data)
    gt1, gt2, v1, v2 = b["pts1_in_cam1"], b["pts2_in_cam1"], b["valid1"], b["valid2"]
    noisy = {"pts1": gt1 + 0.05 * torch.randn_like(gt1), "pts2": gt2 + 0.05 * torch.randn_like(gt2)}
    ones = torch.ones(v1.shape)
    loss, logs = pointmap_loss({**noisy, "conf1": ones, "conf2": ones}, gt1, gt2, v1, v2)
    scaled = {"pts1": noisy["pts1"] * 3.0, "pts2": noisy["pts2"] * 3.0, "conf1": ones, "conf2": ones}
    assert torch.allclose(pointmap_loss(scaled, gt1, gt2, v1, v2)[0], loss, rtol=1e-5)
    perfect = {"pts1": gt1 * 2.0, "pts2": gt2 * 2.0, "conf1": ones, "conf2": ones}
    assert pointmap_loss(perfect, gt1, gt2, v1, v2)[1]["regr"] < 1e-5 < logs["regr"]
    # On exact points, higher confidence lowers the loss (the -alpha log C term).
    sure = {**perfect, "conf1": ones * 5, "conf2": ones * 5}
    assert pointmap_loss(sure, gt1, gt2, v1, v2)[0] < pointmap_loss(perfect, gt1, gt2, v1, v2)[0]


def test_augment_swap_expresses_truth_in_new_first_camera():
    data = make_pair_data(4, seed=0, size=16, workers=1)  # chunk 0 of seed 0 == make_pairs(seed=0)
    pairs = multiview.make_pairs(4, seed=0, size=16)
    b = {k: torch.as_tensor(v) for k, v in data.items()}
    gen = torch.Generator().manual_seed(0)
    # Draw until the first sample is swapped and not flipped.
    for _ in range(50):
        out = augment(b, gen)
        if torch.equal(out["img1"][0], b["img2"][0]):
            break
    else:
        pytest.fail("no unflipped swap drawn")
    k_inv = np.linalg.inv(pairs["K"][0].astype(np.float64))
    v, u = np.mgrid[0:16, 0:16]
    cam2 = pairs["depth2"][0][..., None] * (np.stack([u, v, np.ones_like(u)], -1) @ k_inv.T)
    mask = pairs["valid2"][0]
    assert np.allclose(out["pts1"][0].numpy()[mask], cam2[mask], atol=1e-3)


def test_augment_flip_negates_x(data):
    b = _batch(data, 2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        out = augment(b, gen)
        if torch.equal(out["img1"][0], b["img1"][0].flip(1)) and not torch.equal(
            b["img1"][0], b["img1"][0].flip(1)
        ):
            break
    else:
        pytest.fail("no unswapped flip drawn")
    expect = b["pts1_in_cam1"][0].flip(1) * torch.tensor([-1.0, 1.0, 1.0])
    assert torch.allclose(out["pts1"][0], expect)


def test_loss_decreases_over_a_few_cpu_steps(data):
    torch.manual_seed(0)
    model = PointmapNet(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    b = _batch(data)
    losses = []
    for _ in range(25):
        out = model(to_input(b["img1"], "cpu"), to_input(b["img2"], "cpu"))
        loss, logs = pointmap_loss(out, b["pts1_in_cam1"], b["pts2_in_cam1"], b["valid1"], b["valid2"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append((float(loss.detach()), logs["regr"]))
    assert losses[-1][0] < losses[0][0] - 0.3 and losses[-1][1] < losses[0][1]


def test_save_load_round_trip(tmp_path):
    model = PointmapNet(TINY).eval()
    x1, x2 = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    save_pointmap(model, tmp_path / "exact", dtype=torch.float32)
    again = load_pointmap(tmp_path / "exact")
    with torch.no_grad():
        assert torch.equal(model(x1, x2)["pts1"], again(x1, x2)["pts1"])
    save_pointmap(model, tmp_path / "half")
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < (
        tmp_path / "exact" / "model.safetensors"
    ).stat().st_size
    half = load_pointmap(tmp_path / "half")
    with torch.no_grad():
        assert torch.allclose(model(x1, x2)["pts2"], half(x1, x2)["pts2"], atol=1e-2)
    with pytest.raises(FileNotFoundError):
        load_pointmap(tmp_path)


def test_train_pointmap_smoke_writes_a_loadable_model(tmp_path):
    recipe = replace(
        SMOKE, image_size=16, n_train=16, n_eval=4, batch_size=4, fixed_steps=3, warmup_steps=2, model=TINY
    )
    metrics = train_pointmap(
        tmp_path / "pm", seed=0, device="cpu", minutes_budget=1.0, recipe=recipe, log=lambda s: None
    )
    assert metrics["steps"] == 3
    for key in (
        "normal_median_rel_err",
        "low_light_within_10pct",
        "low_overlap_median_rel_err",
        "prior_median_rel_err",
    ):
        assert 0.0 <= metrics[key] < 100.0, key
    assert {"README.md", "metrics.json", "config.json", "model.safetensors"} <= {
        p.name for p in (tmp_path / "pm").iterdir()
    }
    model = load_pointmap(tmp_path / "pm")
    pairs = multiview.make_pairs(2, seed=5, size=16)
    out = model.predict(pairs["img1"], pairs["img2"])
    assert out["pts1"].shape == (2, 16, 16, 3) and np.isfinite(out["conf2"]).all()


def test_docs_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).resolve().parents[1] / "docs" / "world.md").read_text()
    part = text[text.index("<!-- pointmap:start -->") : text.index("<!-- pointmap:end -->")]
    (block,) = re.findall(r"```python\n(.*?)```", part, flags=re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/world.md", "exec"), {})
    assert (tmp_path / "pointmap-example" / "model.safetensors").exists()
