"""Experiment tracking behind one seam: `Tracker.log_metrics(metrics, step)` / `close(status)`.

`MlflowTracker` exists on rank 0 only (other ranks get a `NullTracker`), so a run of N workers is one MLflow run.
The run is found again by its ferdist run name (tag ``ferdist.run``), so a run resumed after a lost worker or a
re-submission keeps logging into the same MLflow run instead of starting a second one. Uses ``MlflowClient`` rather
than the fluent API: no process-global "active run" that a Ray worker or Tune trial could inherit by accident.
"""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

from ferdist.config import TrackingConfig, redact_uri
from ferdist.errors import FerdistError

RUN_TAG = "ferdist.run"
DEFAULT_URI = "sqlite:///mlflow.db"


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None: ...
    def close(self, *, status: str) -> None: ...


class NullTracker:
    """Tracks nothing (other ranks, or tracking.backend=none)."""

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        pass

    def close(self, *, status: str) -> None:
        pass


def tracking_uri(cfg: TrackingConfig) -> str:
    """The configured URI, else MLFLOW_TRACKING_URI, else a SQLite store in the working directory."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


class MlflowTracker:
    """One MLflow run per ferdist run: params once, metrics with ``step=epoch``, final status as run status + tag."""

    def __init__(self, cfg: TrackingConfig, *, run_name: str, params: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri(cfg))
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.experiment)
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_name}'", max_results=1,
            order_by=["attributes.start_time DESC"],
        )  # fmt: skip
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=run_name, tags={RUN_TAG: run_name})
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            # MLflow keeps params immutable, so they are logged once, when the run is created.
            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self, *, status: str) -> None:
        self.client.set_tag(self.run_id, "ferdist.status", status.lower())
        self.client.set_terminated(self.run_id, status=status)


def make_tracker(cfg: TrackingConfig, *, rank: int, run_name: str, params: dict[str, Any]) -> Tracker:
    """An `MlflowTracker` on rank 0 when tracking is on, a `NullTracker` everywhere else."""
    if rank != 0 or cfg.backend == "none":
        return NullTracker()
    return MlflowTracker(cfg, run_name=run_name, params=params)


def check_tracking(cfg: TrackingConfig) -> None:
    """Fails in seconds, with one sentence, when the tracking server cannot be reached (instead of retrying)."""
    if cfg.backend == "none":
        return
    uri = tracking_uri(cfg)
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as exn:
        raise FerdistError(
            f"cannot reach the MLflow tracking server at {redact_uri(uri)} ({type(exn).__name__}); start it "
            "(mlflow server --host 127.0.0.1 --port 5000), fix tracking.tracking_uri / MLFLOW_TRACKING_URI, or set "
            "tracking.backend=none"
        ) from None

