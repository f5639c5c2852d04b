"""A test double for a worker that dies: the real LocalSession, crashing right after persisting a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ferdist.loop import LocalSession


@dataclass
class CrashingSession(LocalSession):
    """A LocalSession whose process 'dies' right after persisting the checkpoint of epoch ``crash_after``."""

    crash_after: int = 0

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        super().report(metrics, checkpoint_dir)
        if metrics["epoch"] == self.crash_after:
            raise RuntimeError("worker lost")
