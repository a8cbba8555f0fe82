"""The tiny world's data generators: determinism, shapes, labels and geometry."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from studio.world import clips, multiview, packaged, segmentation, shapes

DOCS = Path(__file__).resolve().parents[1] / "docs" / "world.md"


# ---------------------------------------------------------------- captioned shapes


def test_captioned_deterministic_and_typed():
    a, b = shapes.make_captioned(24, seed=3), shapes.make_captioned(24, seed=3)
    assert a.images.shape == (24, 64, 64, 3) and a.images.dtype == np.uint8
    assert a.images.tobytes() == b.images.tobytes() and a.captions == b.captions
    assert shapes.make_captioned(24, seed=4).images.tobytes() != a.images.tobytes()
    assert shapes.make_captioned(3, seed=3, size=32).images.shape == (3, 32, 32, 3)
    assert len(shapes.SHAPES) >= 4 and len(shapes.COLOURS) >= 4


def test_caption_names_every_attribute():
    data = shapes.make_captioned(60, seed=1)
    for attrs, text in zip(data.attrs, data.captions):
        assert text == shapes.caption(attrs)
        words = re.findall(r"[a-z]+", text)
        for field in ("shape", "colour", "size", "background"):
            assert getattr(attrs, field) in words, (field, text)
        assert attrs.background != attrs.colour
        assert (attrs.style in words) == (attrs.style != "flat") or attrs.style == "outlined"
        if attrs.style == "outlined":
            assert "outline" in words
    assert shapes.caption(
        replace(data.attrs[0], shape="star", colour="red", size="small", background="blue", style="striped")
    ) == ("a small red star on a striped blue background")


def _nearest_colour(rgb: np.ndarray) -> str:
    names = list(shapes.COLOURS)
    table = np.array([shapes.COLOURS[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((table - rgb) ** 2).sum(1)))]


@pytest.mark.parametrize("style", shapes.STYLES)
def test_mask_covers_shape_and_colour_is_kept(style):
    data = shapes.make_captioned(20, seed=7, styles=[style])
    for img, attrs in zip(data.images, data.attrs):
        mask = shapes.render_mask(attrs)
        assert mask.dtype == bool and mask.shape == (64, 64)
        assert mask.sum() >= (60 if style == "outlined" else 100)  # small shapes are >= ~14 px across
        ys, xs = np.nonzero(mask)
        assert abs(xs.mean() + 0.5 - attrs.x * 64) < 4 and abs(ys.mean() + 0.5 - attrs.y * 64) < 4
        inside = img[mask].astype(np.float64).mean(0)
        if style == "dark":
            inside = inside / 0.35
        assert _nearest_colour(inside) == attrs.colour, (style, attrs)
        # Outside the (slightly dilated) shape, the shape's colour is absent.
        flat = shapes.render(replace(attrs, style="flat"))
        far = ~_dilate(shapes.render_mask(replace(attrs, style="flat")), 2)
        assert np.abs(flat[far].astype(int) - shapes.COLOURS[attrs.colour]).sum(-1).min() > 30


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def test_sample_attrs_restrictions():
    rng = np.random.default_rng(0)
    got = [shapes.sample_attrs(rng, styles=["noisy"], shapes=["circle"], colours=["red"]) for _ in range(10)]
    assert {(a.style, a.shape, a.colour) for a in got} == {("noisy", "circle", "red")}


# ---------------------------------------------------------------- segmentation


def test_segmentation_domains_share_masks():
    src = segmentation.make_segmentation(12, seed=5)
    again = segmentation.make_segmentation(12, seed=5)
    shifted = segmentation.make_segmentation(12, seed=5, domain="shifted")
    assert src["images"].shape == (12, 64, 64, 3) and src["masks"].shape == (12, 64, 64)
    assert src["images"].tobytes() == again["images"].tobytes()
    assert np.array_equal(src["masks"], shifted["masks"])  # same layouts, different look
    assert src["masks"].max() < len(src["class_names"]) and (src["masks"] > 0).any(axis=(1, 2)).all()
    assert src["images"].mean() - shifted["images"].mean() > 40  # the shifted domain is darker
    assert segmentation.make_segmentation(12, seed=6)["masks"].tobytes() != src["masks"].tobytes()
    with pytest.raises(ValueError):
        segmentation.make_segmentation(1, 0, domain="night")


def test_multitask_activity_matches_mask():
    data = segmentation.make_multitask(60, seed=2)
    assert data.images.shape == (60, 64, 64, 3) and data.masks.shape == (60, 64, 64)
    assert data.class_names == list(segmentation.TOOL_CLASSES)
    for act, mask in zip(data.activities, data.masks):
        tools = segmentation.ACTIVITIES[segmentation.ACTIVITY_NAMES[act]]
        present = {data.class_names[c] for c in np.unique(mask) if c}
        assert present == set(tools)
    assert len(set(data.activities.tolist())) == len(segmentation.ACTIVITY_NAMES)
    assert segmentation.make_multitask(60, seed=2).images.tobytes() == data.images.tobytes()


# ---------------------------------------------------------------- multi-view


@pytest.fixture(scope="module")
def pairs():
    return multiview.make_pairs(16, seed=11, size=32)


def test_pairs_deterministic_and_typed(pairs):
    again = multiview.make_pairs(16, seed=11, size=32)
    for key, value in pairs.items():
        assert value.tobytes() == again[key].tobytes(), key
    assert pairs["img1"].shape == (16, 32, 32, 3) and pairs["img1"].dtype == np.uint8
    assert pairs["pts2_in_cam1"].shape == (16, 32, 32, 3) and pairs["valid1"].dtype == bool
    assert pairs["K"].shape == (16, 3, 3) and pairs["pose2"].shape == (16, 4, 4)
    assert 0.3 < pairs["valid1"].mean() < 0.95
    assert multiview.make_pairs(16, seed=12, size=32)["img1"].tobytes() != pairs["img1"].tobytes()


def test_chunking_does_not_change_bytes(monkeypatch):
    ref = multiview.make_scenes(5, seed=1, n_views=2, size=16, condition="low_light")
    monkeypatch.setattr(multiview, "CHUNK", 2)
    small = multiview.make_scenes(5, seed=1, n_views=2, size=16, condition="low_light")
    assert ref["images"].tobytes() == small["images"].tobytes()
    assert np.allclose(ref["depth"], small["depth"])


def test_pointmaps_match_depth_intrinsics_and_poses():
    views = multiview.make_scenes(6, seed=4, n_views=3, size=24)
    k_inv = np.linalg.inv(views["K"].astype(np.float64))
    v, u = np.mgrid[0:24, 0:24]
    rays = np.stack([u, v, np.ones_like(u)], -1) @ k_inv.T
    unproj = views["depth"][..., None] * rays
    valid = views["valid"]
    assert np.allclose(unproj[valid], views["pts_cam"][valid], atol=1e-4)
    assert (views["depth"][valid] > 0).all() and (views["depth"][~valid] == 0).all()
    poses = views["poses"].astype(np.float64)
    world = (
        np.einsum("nvij,nvhwj->nvhwi", poses[..., :3, :3], views["pts_cam"]) + poses[..., None, None, :3, 3]
    )
    assert np.allclose(world[valid], views["pts_world"][valid], atol=1e-3)
    # Points on the ground have z = 0; nothing is below the ground.
    assert views["pts_world"][valid][:, 2].min() > -1e-3


def test_pair_pointmaps_in_cam1_frame(pairs):
    rel = np.linalg.inv(pairs["pose1"].astype(np.float64)) @ pairs["pose2"].astype(np.float64)
    k_inv = np.linalg.inv(pairs["K"][0].astype(np.float64))
    v, u = np.mgrid[0:32, 0:32]
    pts2_cam2 = pairs["depth2"][..., None] * (np.stack([u, v, np.ones_like(u)], -1) @ k_inv.T)
    expect = np.einsum("nij,nhwj->nhwi", rel[:, :3, :3], pts2_cam2) + rel[:, None, None, :3, 3]
    assert np.allclose(expect[pairs["valid2"]], pairs["pts2_in_cam1"][pairs["valid2"]], atol=1e-3)
    # Cross-view check: project view 2's points into view 1; where visible there, they land on view 1's surface.
    k = pairs["K"][0].astype(np.float64)
    errors = []
    for i in range(len(rel)):
        p = pairs["pts2_in_cam1"][i][pairs["valid2"][i]].astype(np.float64)
        uvw = p @ k.T
        uu, vv = np.rint(uvw[:, 0] / uvw[:, 2]).astype(int), np.rint(uvw[:, 1] / uvw[:, 2]).astype(int)
        inside = (uvw[:, 2] > 0) & (uu >= 0) & (uu < 32) & (vv >= 0) & (vv < 32)
        p, uu, vv = p[inside], uu[inside], vv[inside]
        ok = pairs["valid1"][i][vv, uu]
        seen = np.abs(pairs["depth1"][i][vv, uu][ok] - p[ok, 2]) < 0.2 * p[ok, 2]  # not occluded
        errors.append(
            np.linalg.norm(pairs["pts1_in_cam1"][i][vv, uu][ok][seen] - p[ok][seen], axis=1) / p[ok][seen, 2]
        )
    errors = np.concatenate(errors)
    assert len(errors) > 1000 and np.median(errors) < 0.03


def test_conditions():
    normal = multiview.make_pairs(8, seed=3, size=24)
    dark = multiview.make_pairs(8, seed=3, size=24, condition="low_light")
    wide = multiview.make_pairs(8, seed=3, size=24, condition="low_overlap")
    assert np.array_equal(normal["depth1"], dark["depth1"])  # same geometry, darker pictures
    assert dark["img1"].mean() < 0.4 * normal["img1"].mean()

    def angle(p):
        rel = np.linalg.inv(p["pose1"]) @ p["pose2"]
        return np.degrees(np.arccos(np.clip((np.trace(rel[:, :3, :3], axis1=1, axis2=2) - 1) / 2, -1, 1)))

    assert angle(wide).min() > angle(normal).max()
    with pytest.raises(ValueError):
        multiview.make_pairs(1, 0, condition="fog")


# ---------------------------------------------------------------- clips and style pairs


def test_style_pairs():
    pairs = clips.make_style_pairs(6, seed=2, style="striped")
    assert pairs["source"].shape == pairs["styled"].shape == (6, 64, 64, 3)
    for src, sty, attrs in zip(pairs["source"], pairs["styled"], pairs["attrs"]):
        assert np.array_equal(src, shapes.render(attrs))
        assert np.array_equal(sty, shapes.render(replace(attrs, style="striped")))
    assert "striped" in pairs["captions"][0]
    sepia = clips.make_style_pairs(3, seed=2, style="sepia")
    assert sepia["captions"][0].startswith("a sepia picture of a ")
    assert np.array_equal(sepia["source"], clips.make_style_pairs(3, seed=2, style="inverted")["source"])


def test_clip_motion_is_shared_and_exact():
    still = shapes.make_captioned(1, seed=9).images[0]
    pan = clips.make_clip(still, clips.CameraMotion(pan_x=4 / 64), n_frames=2)
    assert np.array_equal(pan[0], still)
    assert np.array_equal(pan[1][:, 4:], still[:, :-4])
    data = clips.make_clip_pairs(5, seed=1, style="inverted", n_frames=6)
    assert data["source"].shape == (5, 6, 64, 64, 3)
    assert np.abs(data["styled"].astype(int) - (255 - data["source"].astype(int))).max() <= 1
    moving = np.abs(data["source"][:, -1].astype(int) - data["source"][:, 0]).mean()
    assert moving > 1.0
    again = clips.make_clip_pairs(5, seed=1, style="inverted", n_frames=6)
    assert again["source"].tobytes() == data["source"].tobytes() and again["motions"] == data["motions"]
    # Geometric styles: the styled clip is the styled still under the same motion.
    striped = clips.make_clip_pairs(2, seed=1, style="striped", n_frames=3)
    restyled = clips.make_style_pairs(2, seed=1, style="striped")["styled"]
    for i, motion in enumerate(striped["motions"]):
        assert np.array_equal(striped["styled"][i], clips.make_clip(restyled[i], motion, 3))


# ---------------------------------------------------------------- packaged data


def test_digits_multitask():
    images, labels, masks = packaged.digits_multitask(size=16)
    assert images.shape == (1797, 16, 16, 3) and images.dtype == np.uint8
    assert set(np.unique(labels)) == set(range(10)) and set(np.unique(masks)) == {0, 1}
    assert images[..., 0][masks == 1].min() >= 127 and images[..., 0][masks == 0].max() < 128
    assert 0.1 < masks.mean() < 0.5


def test_bundled_images_and_crops():
    photos = packaged.sample_photos()
    assert set(photos) == {"china", "flower"} and photos["china"].shape == (427, 640, 3)
    for name in ("astronaut", "camera", "horse", "logo"):
        img = packaged.load_image(name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    crops = packaged.photo_crops(8, seed=0, size=32)
    assert (
        crops.shape == (8, 32, 32, 3)
        and crops.tobytes() == packaged.photo_crops(8, seed=0, size=32).tobytes()
    )
    left, right, disparity = packaged.stereo_motorcycle()
    assert left.shape == right.shape and disparity.shape == left.shape[:2]


# ---------------------------------------------------------------- docs


def test_docs_examples_run(tmp_path, monkeypatch):
    text = DOCS.read_text()
    text = text[text.index("<!-- data:start -->") : text.index("<!-- data:end -->")]  # the data part only
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), {})
    assert (DOCS.parent / "world_samples.png").exists()
