"""The Vision-tab half of ``StudioService``: register, list, load and run vision models.

``VisionServiceMixin`` holds the methods only; ``StudioService`` inherits them and owns
the state they use (``lock``, ``device``, ``adapter_dirs`` and the ``_vision`` dict).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from adapters.base import AdapterError
from studio.service_files import _clean_name, safe_path
from studio.service_vision import VisionModel, classify, segment
from studio.service_vision_load import vision_folders


class VisionServiceMixin:
    """Vision models (classify / segment) behind the service's lock."""

    lock: threading.RLock
    device: str
    adapter_dirs: list[Path]
    _vision: dict[str, VisionModel]

    def add_vision_model(self, vm: VisionModel) -> None:
        with self.lock:
            self._vision[vm.name] = vm.__class__(**{**vm.__dict__, "model": vm.model.to(self.device)})

    def list_vision_models(self) -> list[dict[str, Any]]:
        with self.lock:
            return [
                {
                    "name": v.name,
                    "task": v.task,
                    "classes": v.classes,
                    "size": v.size,
                    "source": v.source,
                    "path": v.path,
                }
                for v in self._vision.values()
            ]

    def vision_folders(self) -> list[str]:
        """Trained vision outputs inside the adapter folders that are not loaded yet."""
        with self.lock:
            loaded = {v.path for v in self._vision.values()}
        return [str(p) for p in vision_folders(self.adapter_dirs) if str(p) not in loaded]

    def load_vision_model(
        self, path: str | Path, name: str | None = None, replace: bool = False
    ) -> list[dict[str, Any]]:
        """Register the Vision-tab models of a trained vision output folder (inside the adapter folders).

        adaptertune / lora give a classifier, salt a segmenter, endoarss both
        (``NAME-classify``, ``NAME-segment``); ``replace`` swaps models of the same names.
        """
        from studio.service_vision_load import vision_models_from_folder

        resolved = safe_path(path, self.adapter_dirs)
        models = vision_models_from_folder(resolved, name and _clean_name(name))  # outside the lock
        with self.lock:
            taken = [vm.name for vm in models if vm.name in self._vision]
            if taken and not replace:
                raise AdapterError(f"a vision model named {taken[0]!r} is already loaded")
            for vm in models:
                self.add_vision_model(vm)
        names = {vm.name for vm in models}
        return [v for v in self.list_vision_models() if v["name"] in names]

    def _vision_model(self, name: str) -> VisionModel:
        if name not in self._vision:
            raise AdapterError(
                f"no vision model named {name!r}; available: {', '.join(self._vision) or 'none'}"
            )
        return self._vision[name]

    def classify(self, name: str, image: Any) -> dict[str, float]:
        with self.lock:
            return classify(self._vision_model(name), image)

    def segment(self, name: str, image: Any) -> tuple[Any, dict[str, float]]:
        with self.lock:
            return segment(self._vision_model(name), image)
