"""Multi-view 3D scenes rendered by a small vectorised numpy ray caster.

A scene is a textured ground square (z = 0, z is up) with 1-3 spheres and 1-2 boxes
(rotated about z) resting on it, lit by one directional light. Cameras look at the scene
centre from a circle around it. Conventions:

- ``K``: pinhole intrinsics, pixel centres at integer coordinates (u right, v down).
- poses: camera-to-world 4x4, OpenCV camera axes (x right, y down, z forward).
- ``depth``: the camera-frame z of the surface (not the ray length); 0 where no surface.
- pointmaps: ``pts_cam = depth * K^-1 [u, v, 1]``, ``pts_world = pose @ pts_cam``.
- ``valid``: a surface was hit (the sky is invalid).

Conditions: ``normal``; ``low_light`` (images at ~25% brightness with sensor noise);
``low_overlap`` (the views are 60-100 degrees apart instead of 10-30).

:func:`make_pairs` gives two-view pairs in the DUSt3R convention: both pointmaps in view 1's
camera frame. Everything is drawn from ``default_rng(seed)`` up front (noise from a per-scene
generator), so the bytes do not depend on the chunk size used to render.
"""

from __future__ import annotations

import numpy as np

CONDITIONS = ("normal", "low_light", "low_overlap")
MAX_SPHERES, MAX_BOXES = 3, 2
GROUND_HALF = 3.5  # the ground is the square |x|, |y| <= GROUND_HALF
FOCAL = 0.9  # focal length as a fraction of the image size (~58 degree field of view)
CHUNK = 64  # scenes rendered together (bounds memory; results do not depend on it)


def intrinsics(size: int) -> np.ndarray:
    """float64 [3, 3] pinhole matrix of a ``size`` x ``size`` view."""
    c = (size - 1) / 2.0
    return np.array([[FOCAL * size, 0.0, c], [0.0, FOCAL * size, c], [0.0, 0.0, 1.0]])


def look_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world [..., 4, 4] of cameras at ``position`` looking at ``target`` (z up)."""
    z = target - position
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    x = np.cross(z, np.array([0.0, 0.0, 1.0]))
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    y = np.cross(z, x)
    pose = np.zeros(position.shape[:-1] + (4, 4))
    pose[..., :3, 0], pose[..., :3, 1], pose[..., :3, 2], pose[..., :3, 3] = x, y, z, position
    pose[..., 3, 3] = 1.0
    return pose


def sample_scenes(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Random scene parameters for ``n`` scenes (padded slots are inactive)."""
    s = {}
    s["sphere_on"] = np.arange(MAX_SPHERES) < rng.integers(1, MAX_SPHERES + 1, (n, 1))
    s["sphere_r"] = rng.uniform(0.35, 0.75, (n, MAX_SPHERES))
    s["sphere_c"] = np.concatenate(
        [rng.uniform(-1.2, 1.2, (n, MAX_SPHERES, 2)), s["sphere_r"][..., None]], -1
    )
    s["sphere_rgb"] = rng.uniform(40, 235, (n, MAX_SPHERES, 3))
    s["box_on"] = np.arange(MAX_BOXES) < rng.integers(1, MAX_BOXES + 1, (n, 1))
    s["box_h"] = rng.uniform(0.25, 0.6, (n, MAX_BOXES, 3))
    s["box_c"] = np.concatenate([rng.uniform(-1.2, 1.2, (n, MAX_BOXES, 2)), s["box_h"][..., 2:]], -1)
    s["box_yaw"] = rng.uniform(0, np.pi / 2, (n, MAX_BOXES))
    s["box_rgb"] = rng.uniform(40, 235, (n, MAX_BOXES, 3))
    s["ground_rgb"] = rng.uniform(60, 220, (n, 2, 3))
    s["sky_rgb"] = rng.uniform(150, 240, (n, 3))
    az, el = rng.uniform(0, 2 * np.pi, n), rng.uniform(np.deg2rad(35), np.deg2rad(70), n)
    s["light"] = np.stack([np.cos(az) * np.cos(el), np.sin(az) * np.cos(el), np.sin(el)], -1)
    return s


def sample_cameras(rng: np.random.Generator, n: int, n_views: int, condition: str) -> np.ndarray:
    """Camera-to-world poses [n, n_views, 4, 4] circling the scene centre."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    lo, hi = (60.0, 100.0) if condition == "low_overlap" else (10.0, 30.0)
    steps = rng.uniform(lo, hi, (n, n_views)) * rng.choice([-1.0, 1.0], (n, 1))
    steps[:, 0] = rng.uniform(0, 360, n)
    az = np.deg2rad(np.cumsum(steps, axis=1))
    el = np.deg2rad(rng.uniform(15, 35, (n, n_views)))
    dist = rng.uniform(3.3, 4.3, (n, n_views))
    pos = np.stack([np.cos(az) * np.cos(el), np.sin(az) * np.cos(el), np.sin(el)], -1) * dist[..., None]
    target = np.concatenate([rng.uniform(-0.3, 0.3, (n, n_views, 2)), np.full((n, n_views, 1), 0.3)], -1)
    return look_at(pos, target)


def _checker(*coords: np.ndarray) -> np.ndarray:
    return sum(np.floor(c).astype(np.int64) for c in coords) % 2


def _cell_hash(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random value in [0, 1) per integer cell (aperiodic ground texture)."""
    v = np.sin(i * 12.9898 + j * 78.233) * 43758.5453
    return v - np.floor(v)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot product over a last axis of 3 (numpy's reductions over tiny axes are slow)."""
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _hit_sphere(o, d, c, r):
    oc = o - c[:, None, None, :]
    a = _dot(d, d)
    b = _dot(d, oc)
    disc = b * b - a * (_dot(oc, oc) - (r * r)[:, None, None])
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    hit = (disc > 0) & (t > 1e-4)
    normal = (oc + t[..., None] * d) / r[:, None, None, None]
    lon, lat = np.arctan2(normal[..., 1], normal[..., 0]), np.arcsin(np.clip(normal[..., 2], -1, 1))
    tex = _checker(lon * 4 / np.pi, lat * 3 / np.pi)
    return t, hit, normal, tex


def _hit_box(o, d, c, h, yaw):
    cos, sin = np.cos(yaw)[:, None, None], np.sin(yaw)[:, None, None]

    def to_local(v):
        return np.stack(
            [cos * v[..., 0] + sin * v[..., 1], -sin * v[..., 0] + cos * v[..., 1], v[..., 2]], -1
        )

    lo, ld = to_local(o - c[:, None, None, :]), to_local(d)
    ld = np.where(np.abs(ld) < 1e-9, 1e-9, ld)
    hh = h[:, None, None, :]
    t1, t2 = (-hh - lo) / ld, (hh - lo) / ld
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    axis = near.argmax(-1)
    t = np.take_along_axis(near, axis[..., None], -1)[..., 0]
    hit = (t <= np.minimum(np.minimum(far[..., 0], far[..., 1]), far[..., 2])) & (t > 1e-4)
    local_n = -np.sign(np.take_along_axis(ld, axis[..., None], -1)) * (np.arange(3) == axis[..., None])
    normal = np.stack(
        [
            cos * local_n[..., 0] - sin * local_n[..., 1],
            sin * local_n[..., 0] + cos * local_n[..., 1],
            local_n[..., 2],
        ],
        -1,
    )
    p = (lo + t[..., None] * ld) / 0.2
    return t, hit, normal, _checker(p[..., 0] + 0.5, p[..., 1] + 0.5, p[..., 2] + 0.5)


def render_batch(scenes: dict[str, np.ndarray], poses: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Ray-cast ``B`` scenes from ``V`` cameras each (poses [B, V, 4, 4]).

    Returns float32 ``rgb`` [B, V, H, W, 3] (0..255, before any condition), ``depth`` [B, V, H, W],
    ``pts_cam`` / ``pts_world`` [B, V, H, W, 3] and bool ``valid`` [B, V, H, W].
    """
    b, v = poses.shape[:2]
    # float32 throughout: the caster is memory-bound, and 1e-7 relative error is plenty here.
    scenes = {key: x.astype(np.float32) if x.dtype == np.float64 else x for key, x in scenes.items()}
    poses = poses.astype(np.float32)
    k = intrinsics(size)
    vv, uu = np.mgrid[0:size, 0:size].astype(np.float32)
    rays_cam = np.stack([(uu - k[0, 2]) / k[0, 0], (vv - k[1, 2]) / k[1, 1], np.ones_like(uu)], -1).reshape(
        -1, 3
    )
    rays_cam = rays_cam.astype(np.float32)
    # Flatten (scene, view) into one axis of "cameras": M = B * V.
    rot = poses[..., :3, :3].reshape(b * v, 3, 3)
    o = np.broadcast_to(poses[..., :3, 3].reshape(b * v, 1, 1, 3), (b * v, 1, rays_cam.shape[0], 3))
    d = (rot @ rays_cam.T).transpose(0, 2, 1)[:, None]  # [M, 1, N, 3]

    def per_cam(x):
        return np.repeat(x, v, axis=0)

    best_t = np.full(d.shape[:-1], np.inf, dtype=np.float32)
    normal = np.zeros(d.shape, dtype=np.float32)
    albedo = np.zeros(d.shape, dtype=np.float32)
    # Ground plane.
    t = np.where(d[..., 2] < -1e-9, -o[..., 2] / np.minimum(d[..., 2], -1e-9), np.inf)
    p = o + np.where(np.isfinite(t), t, 0.0)[..., None] * d
    on = np.isfinite(t) & (np.abs(p[..., 0]) <= GROUND_HALF) & (np.abs(p[..., 1]) <= GROUND_HALF)
    cell = np.floor(p[..., :2] / 0.5)
    shade = 0.7 + 0.3 * _cell_hash(cell[..., 0], cell[..., 1])
    g = per_cam(scenes["ground_rgb"])[:, None, None]  # [M, 1, 1, 2, 3]
    tex = _checker(cell[..., 0], cell[..., 1])[..., None]
    best_t = np.where(on, t, best_t)
    albedo = np.where(
        on[..., None], np.where(tex == 1, g[..., 1, :], g[..., 0, :]) * shade[..., None], albedo
    )
    normal = np.where(on[..., None], np.array([0.0, 0.0, 1.0]), normal)
    prims = [("sphere", i) for i in range(MAX_SPHERES)] + [("box", i) for i in range(MAX_BOXES)]
    for kind, i in prims:
        if kind == "sphere":
            t, hit, n_, tex = _hit_sphere(
                o, d, per_cam(scenes["sphere_c"][:, i]), per_cam(scenes["sphere_r"][:, i])
            )
            rgb, active = scenes["sphere_rgb"][:, i], scenes["sphere_on"][:, i]
        else:
            args = (
                per_cam(scenes["box_c"][:, i]),
                per_cam(scenes["box_h"][:, i]),
                per_cam(scenes["box_yaw"][:, i]),
            )
            t, hit, n_, tex = _hit_box(o, d, *args)
            rgb, active = scenes["box_rgb"][:, i], scenes["box_on"][:, i]
        closer = hit & (t < best_t) & per_cam(active)[:, None, None]
        best_t = np.where(closer, t, best_t)
        normal = np.where(closer[..., None], n_, normal)
        colour = per_cam(rgb)[:, None, None] * np.where(tex == 1, 1.0, 0.6)[..., None]
        albedo = np.where(closer[..., None], colour, albedo)
    valid = np.isfinite(best_t)
    light = per_cam(scenes["light"])[:, None, None]
    lambert = np.clip(_dot(normal, light), 0.0, 1.0)
    sky = (
        per_cam(scenes["sky_rgb"])[:, None, None]
        * (0.75 + 0.25 * (rays_cam[:, 1] + 1.0) / 2)[None, None, :, None]
    )
    rgb = np.where(valid[..., None], albedo * (0.35 + 0.65 * lambert[..., None]), sky)
    depth = np.where(valid, best_t, 0.0)
    pts_cam = depth[..., None] * rays_cam
    pts_world = np.where(valid[..., None], o + depth[..., None] * d, 0.0)

    def shaped(x, *tail):
        return x.reshape(b, v, size, size, *tail)

    return {
        "rgb": shaped(rgb, 3).astype(np.float32),
        "depth": shaped(depth).astype(np.float32),
        "pts_cam": shaped(pts_cam, 3).astype(np.float32),
        "pts_world": shaped(pts_world, 3).astype(np.float32),
        "valid": shaped(valid),
    }


def _finish(rgb: np.ndarray, condition: str, seed: int, index: int) -> np.ndarray:
    """float [V, H, W, 3] -> uint8 with the condition's photometric nuisance applied."""
    if condition == "low_light":
        noise = np.random.default_rng((seed, index)).normal(0.0, 5.0, rgb.shape)
        rgb = rgb * 0.25 + noise
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def make_scenes(
    n: int, seed: int, n_views: int = 4, size: int = 64, condition: str = "normal"
) -> dict[str, np.ndarray]:
    """``n`` scenes seen from ``n_views`` cameras each.

    Returns ``images`` uint8 [n, V, H, W, 3], ``depth`` float32 [n, V, H, W], ``pts_cam`` and
    ``pts_world`` float32 [n, V, H, W, 3], ``valid`` bool [n, V, H, W], ``K`` float32 [3, 3] and
    ``poses`` float32 [n, V, 4, 4] (camera-to-world).
    """
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(rng, n)
    poses = sample_cameras(rng, n, n_views, condition)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("images", "depth", "pts_cam", "pts_world", "valid")}
    for start in range(0, n, CHUNK):
        part = {k: x[start : start + CHUNK] for k, x in scenes.items()}
        r = render_batch(part, poses[start : start + CHUNK], size)
        out["images"].append(
            np.stack([_finish(x, condition, seed, start + j) for j, x in enumerate(r["rgb"])])
        )
        for key in ("depth", "pts_cam", "pts_world", "valid"):
            out[key].append(r[key])
    result = {k: np.concatenate(x) if x else np.zeros((0,)) for k, x in out.items()}
    result["K"] = intrinsics(size).astype(np.float32)
    result["poses"] = poses.astype(np.float32)
    return result


def make_pairs(n: int, seed: int, size: int = 64, condition: str = "normal") -> dict[str, np.ndarray]:
    """``n`` two-view pairs, both pointmaps in view 1's camera frame (DUSt3R convention).

    Keys: ``img1``, ``img2`` uint8 [n, H, W, 3]; ``pts1_in_cam1``, ``pts2_in_cam1`` float32
    [n, H, W, 3]; ``valid1``, ``valid2`` bool [n, H, W]; ``depth1``, ``depth2`` float32 [n, H, W];
    ``K`` float32 [n, 3, 3]; ``pose1``, ``pose2`` float32 [n, 4, 4] camera-to-world.
    """
    views = make_scenes(n, seed, n_views=2, size=size, condition=condition)
    poses = views["poses"].astype(np.float64)
    world_to_cam1 = np.linalg.inv(poses[:, 0])
    rel = world_to_cam1 @ poses[:, 1]  # camera 2 -> camera 1
    pts2 = views["pts_cam"][:, 1].reshape(n, -1, 3)
    rel = rel.astype(np.float32)
    pts2_in_cam1 = (pts2 @ rel[:, :3, :3].transpose(0, 2, 1) + rel[:, None, :3, 3]).reshape(
        pts2.shape[0], size, size, 3
    )
    valid2 = views["valid"][:, 1]
    return {
        "img1": views["images"][:, 0],
        "img2": views["images"][:, 1],
        "pts1_in_cam1": views["pts_cam"][:, 0],
        "pts2_in_cam1": np.where(valid2[..., None], pts2_in_cam1, 0.0).astype(np.float32),
        "valid1": views["valid"][:, 0],
        "valid2": valid2,
        "depth1": views["depth"][:, 0],
        "depth2": views["depth"][:, 1],
        "K": np.broadcast_to(views["K"], (n, 3, 3)).copy(),
        "pose1": views["poses"][:, 0],
        "pose2": views["poses"][:, 1],
    }
