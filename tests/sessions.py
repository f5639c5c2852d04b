"""A test double for a worker that dies: the real LocalSession, crashing right after reporting an epoch."""

from __future__ import annotations

from dataclasses import dataclass

from ferdist.train.checkpoint import Snapshot
from ferdist.train.loop import LocalSession


@dataclass
class CrashingSession(LocalSession):
    """A LocalSession whose process 'dies' right after reporting epoch ``crash_after`` (its writes finished)."""

    crash_after: int = 0

    def report(self, metrics: dict[str, float], resume: Snapshot | None, *, mode: str) -> None:
        super().report(metrics, resume, mode=mode)
        if metrics["epoch"] == self.crash_after:
            self.finish()
            raise RuntimeError("worker lost")
