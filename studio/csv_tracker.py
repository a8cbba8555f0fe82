"""A dependency-free accelerate tracker: ``metrics.csv`` with one ``step,key,value`` row per value.

accelerate ships no CSV tracker; the long format keeps the file valid when later steps log
keys the first step did not (evaluation metrics).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker

from studio.checkpoints import CSV_FILE


class CsvTracker(GeneralTracker):
    name = "csv"
    requires_logging_directory = False

    def __init__(self, output_dir: str | Path) -> None:
        super().__init__()
        self.path = Path(output_dir) / CSV_FILE

    @property
    def tracker(self) -> Path:
        return self.path

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.is_file():
            self.path.write_text("step,key,value\n")

    def store_init_configuration(self, values: dict) -> None:
        """Hyper-parameters are in config.json already."""

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        with open(self.path, "a") as f:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    f.write(f"{step},{key},{value}\n")
