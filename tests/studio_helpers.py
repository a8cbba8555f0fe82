"""Shared helpers for the studio tests: a service on the from-config tiny pipeline."""

from __future__ import annotations

import numpy as np

from studio.service import StudioService
from studio.service_types import GenerationSettings


def tiny_service(tmp_path=None, **kw) -> StudioService:
    dirs = {"adapter_dirs": [tmp_path / "adapters"], "output_dir": tmp_path / "out"} if tmp_path else {}
    if tmp_path:
        (tmp_path / "adapters").mkdir(exist_ok=True)
    svc = StudioService(device="cpu", **dirs, **kw)
    svc.default_model = "tiny-sd"  # the from-config pipeline, also when the world assets exist
    svc.add_example_adapters()
    return svc


def settings(**kw) -> GenerationSettings:
    base = dict(base_model="tiny-sd", prompt="a red circle", seed=1, steps=3, guidance=5.0)
    base.update(kw)
    return GenerationSettings(**base)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def max_diff(a, b) -> float:
    return float(np.abs(pixels(a) - pixels(b)).max())
