"""What the loops log to, handed in from outside: the train stage knows no MLflow.

`ferdist.launch.trainer` hands each worker's loop `ferdist.track.tracking.make_tracker`; a loop run without one
(tests, benchmarks, a library user calling `run_training` directly) tracks nothing, and says so at once if the config
asks for tracking rather than training a run nobody can find afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ferdist.config import TrackingConfig
from ferdist.data.loader import DatasetRecord
from ferdist.errors import FerdistError


class Tracker(Protocol):
    def log_datasets(self, records: Sequence[DatasetRecord], *, context: str) -> None: ...
    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None: ...
    def log_image(self, image: Any, path: str) -> None: ...
    def flush(self) -> None: ...
    def close(self, *, status: str) -> None: ...


class TrackerFactory(Protocol):
    def __call__(self, cfg: TrackingConfig, *, rank: int, run_name: str, params: dict[str, Any]) -> Tracker: ...


class NullTracker:
    """Tracks nothing (other ranks, or tracking.backend=none)."""

    def log_datasets(self, records: Sequence[DatasetRecord], *, context: str) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        pass

    def log_image(self, image: Any, path: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self, *, status: str) -> None:
        pass


def untracked(cfg: TrackingConfig, *, rank: int, run_name: str, params: dict[str, Any]) -> Tracker:
    """The factory of a loop that was handed none: a `NullTracker`, refusing a config that asks for tracking."""
    if cfg.backend != "none":
        raise FerdistError(f"run {run_name} asks for tracking.backend={cfg.backend} but its loop was given no "
                           "tracker; start it with jobs/train.py (or pass make_tracker=ferdist.track.tracking."
                           "make_tracker), or set tracking.backend=none")  # fmt: skip
    return NullTracker()
