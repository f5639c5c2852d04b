"""Experiment tracking: per-epoch metrics from rank 0 during training, reports and status from the driver after.

During training, `MlflowTracker` exists on rank 0 only (other ranks get a `NullTracker`), so a run of N workers is
one MLflow run. The run is found again by its ferdist run name (tag ``ferdist.run``), so a run resumed after a lost
worker or a re-submission keeps logging into the same MLflow run instead of starting a second one.

When a run ends, the driver (jobs/train.py, or the Tune callback for a trial) calls `finalize_run`: it reads the
run's checkpoint summaries from storage, logs the reports and the config as artefacts and sets the final status,
including "early-stopped", which no worker can record because Tune stops a trial by killing it.
Uses ``MlflowClient`` rather than the fluent API: no process-global "active run" that a Ray worker or Tune trial could
inherit by accident.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs

from ferdist.config import RunConfig, TrackingConfig, redact_uri
from ferdist.data.loader import DatasetRecord
from ferdist.errors import FerdistError
from ferdist.track.store import absolute_uri, caller, check_server, explained_refusal, server_problem, tracking_uri
from ferdist.train.tracker import NullTracker, Tracker

log = logging.getLogger(__name__)

RUN_TAG, SWEEP_TAG, STATUS_TAG, PARENT_TAG = "ferdist.run", "ferdist.sweep", "ferdist.status", "mlflow.parentRunId"
COMPLETED, EARLY_STOPPED, FAILED = "completed", "early-stopped", "failed"


def prepare_tracking(cfg: TrackingConfig) -> TrackingConfig:
    """On the driver, before Ray starts: the server answers, the URI is absolute, and the experiment exists.

    Creating the experiment here (not on a worker) puts the embedded store's artefacts in the driver's working
    directory (./mlruns), beside mlflow.db.
    """
    if cfg.backend == "none":
        return cfg
    check_tracking(cfg)
    uri = absolute_uri(tracking_uri(cfg))
    with explained_refusal(uri, action=f"use experiment '{cfg.experiment}'",
                           permission=f"READ (EDIT to log runs) on experiment '{cfg.experiment}'"):  # fmt: skip
        _experiment_id(_client(uri), cfg.experiment)
    return dataclasses.replace(cfg, tracking_uri=uri)


def open_run(cfg: TrackingConfig, *, run_name: str, params: dict[str, Any]) -> tuple[str, bool]:
    """The MLflow run of ferdist run ``run_name`` (found by tag, else created with ``params``); returns its id and
    whether it existed. The driver opens it before Ray starts, so a login that may not log runs is one sentence then
    rather than a failure in a worker; the worker's tracker finds the same run."""
    client = _client(tracking_uri(cfg))
    with explained_refusal(tracking_uri(cfg), action=f"log runs in experiment '{cfg.experiment}'",
                           permission=f"EDIT on experiment '{cfg.experiment}'"):  # fmt: skip
        if found := find_run(client, cfg.experiment, RUN_TAG, run_name):
            return found.info.run_id, True
        tags = {RUN_TAG: run_name} | ({PARENT_TAG: cfg.parent_run_id} if cfg.parent_run_id else {})
        run = client.create_run(_experiment_id(client, cfg.experiment), run_name=run_name, tags=tags)
        from mlflow.entities import Param

        # MLflow keeps params immutable, so they are logged once, when the run is created.
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run.info.run_id, False


def check_registration(cfg: TrackingConfig) -> None:
    """Before Ray starts: the caller may add versions to ``cfg.registered_model``. A model the caller can read is
    probed by setting and removing a tag (the same EDIT permission as a new version); one it cannot see is created
    now (any login may create a model, and owns it), which tells a model that exists but is not the caller's."""
    if cfg.backend == "none" or not cfg.registered_model:
        return
    from mlflow.exceptions import MlflowException

    client, name = _client(tracking_uri(cfg)), cfg.registered_model
    with explained_refusal(tracking_uri(cfg), action=f"register versions of model '{name}'",
                           permission=f"EDIT on registered model '{name}'"):  # fmt: skip
        # A search lists only the models the caller may read; a get would answer 403 for one that does not exist.
        if client.search_registered_models(filter_string=f"name = '{name}'"):
            client.set_registered_model_tag(name, "ferdist.preflight", "may register")
            client.delete_registered_model_tag(name, "ferdist.preflight")
            return
        try:
            client.create_registered_model(name)
        except MlflowException as exn:
            if exn.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            raise FerdistError(f"{caller()} may not register versions of model '{name}' on the MLflow server at "
                               f"{redact_uri(tracking_uri(cfg))} (it exists, and is not readable to this login); ask "
                               f"its admin for EDIT on registered model '{name}'") from None  # fmt: skip


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _experiment_id(client: Any, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def find_run(client: Any, experiment: str, tag: str, value: str) -> Any | None:
    """The newest run in ``experiment`` whose ``tag`` equals ``value``, or None."""
    found = client.search_runs(
        [_experiment_id(client, experiment)], filter_string=f"tags.`{tag}` = '{value}'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )  # fmt: skip
    return found[0] if found else None


class MlflowTracker:
    """One MLflow run per ferdist run: params once, metrics with ``step=epoch``, final status as run status + tag.

    Training never waits on MLflow's retries. The run is opened when the tracker is made (the driver opened it
    moments before); after that every call goes, in order, through one background thread, which asks the server's
    /health first (one request, no retries), and `flush` waits a bounded time for an epoch's calls. While the server
    does not answer, calls are dropped, with one warning per outage, where MLflow's client would have held each
    epoch for minutes of retries and then failed the run. The driver records the epochs a run missed from its
    checkpoints when the run ends (`finalize_run`, `record_finished`).
    """

    CLOSE_WAIT_S = 60.0
    """How long `close` waits for calls still queued (a server that accepts connections and never answers)."""
    FLUSH_WAIT_S = 10.0
    """How long `flush` (each epoch, before the report) waits for the epoch's calls to be sent."""

    def __init__(self, cfg: TrackingConfig, *, run_name: str, params: dict[str, Any]) -> None:
        self.uri = tracking_uri(cfg)
        self.client = _client(self.uri)
        self.run_id, found = open_run(cfg, run_name=run_name, params=params)
        self.logged_through = 0
        """The last epoch already in the run: a resumed run re-trains the epochs after its last resume state, with
        bit-identical results, so they are not logged twice."""
        if found:
            self.client.update_run(self.run_id, status="RUNNING")
            self.logged_through = max((m.step for m in self.client.get_metric_history(self.run_id, "epoch")),
                                      default=0)  # fmt: skip
        self.system_metrics = None
        if cfg.system_metrics_s:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # MLflow's own monitor (CPU, GPU, memory, disk, network as system/*), in a thread of rank 0's process; a
            # resumed run continues its steps.
            self.system_metrics = SystemMetricsMonitor(self.run_id, sampling_interval=cfg.system_metrics_s,
                                                       resume_logging=found,
                                                       tracking_uri=tracking_uri(cfg))  # fmt: skip
            self.system_metrics.start()
        self.down: str | None = None
        """Why the server stopped answering (one warning per outage), or None."""
        self.behind = False
        """A `flush` gave up waiting (a server that takes calls and never answers): the next ones do not wait."""
        self.calls: queue.Queue[tuple[Callable[[], Any], bool] | None] = queue.Queue()
        """(call, whether it needs the server): markers that only tell `flush` its calls were sent need none."""
        # A daemon: a worker process that ends never waits for a server that does not answer.
        self.sender = threading.Thread(target=self._send, name="ferdist-tracker", daemon=True)
        self.sender.start()

    def _send(self) -> None:
        while (item := self.calls.get()) is not None:
            call, needs_server = item
            if not needs_server:
                call()
                continue
            if problem := server_problem(self.uri):
                if self.down is None:
                    log.warning("the MLflow tracking server at %s does not answer (%s); training goes on, and the "
                                "epochs it misses are recorded from the run's checkpoints when the run ends",
                                redact_uri(self.uri), problem)  # fmt: skip
                self.down = problem
                continue
            if self.down is not None:
                log.warning("the MLflow tracking server at %s answers again", redact_uri(self.uri))
                self.down = None
            try:
                call()
            except Exception as exn:  # noqa: BLE001 (a log that fails must not stop training; the checkpoints keep it)
                log.warning("an MLflow call for run %s failed and was skipped (%s)", self.run_id,
                            str(exn).splitlines()[0] if str(exn) else type(exn).__name__)  # fmt: skip

    def log_datasets(self, records: Sequence[DatasetRecord], *, context: str) -> None:
        """Each record as an MLflow dataset input of the run (the UI's Dataset column), tagged with ``context``."""
        inputs = [dataset_input(r, context=context) for r in records]
        self.calls.put((lambda: self.client.log_inputs(self.run_id, datasets=inputs), True))

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        from mlflow.entities import Metric

        if step <= self.logged_through:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self.calls.put((lambda: self.client.log_batch(self.run_id, metrics=batch), True))

    def log_image(self, image: Any, path: str) -> None:
        """``image`` (a uint8 array) as the PNG artefact ``path`` of the run."""
        self.calls.put((lambda: self.client.log_image(self.run_id, image, artifact_file=path), True))

    def flush(self) -> None:
        """Waits (at most `FLUSH_WAIT_S`) until the calls made so far were sent or dropped: an epoch's metrics reach
        the server before its report, after which Tune may stop the trial and its driver record it. No wait while
        the server is down (calls are dropped at once) or after a flush gave up."""
        if self.down is not None or self.behind:
            return
        sent = threading.Event()

        def mark() -> None:
            self.behind = False  # the sender caught up
            sent.set()

        self.calls.put((mark, False))
        self.behind = not sent.wait(self.FLUSH_WAIT_S)

    def close(self, *, status: str) -> None:
        """Queues the end of the run after every call before it, and waits for them (at most `CLOSE_WAIT_S`)."""
        self.calls.put((lambda: self._finish(status), True))
        self.calls.put(None)
        self.sender.join(timeout=self.CLOSE_WAIT_S)
        if self.sender.is_alive() or self.down is not None:
            log.warning("run %s ended without the MLflow tracking server at %s; the job records it from its "
                        "checkpoints", self.run_id, redact_uri(self.uri))  # fmt: skip

    def _finish(self, status: str) -> None:
        if (monitor := self.system_metrics) is not None:
            monitor.finish()  # joins its thread
            # One last sample, so a run shorter than the sampling interval still says what machine it ran on.
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        self.client.set_tag(self.run_id, STATUS_TAG, COMPLETED if status == "FINISHED" else FAILED)
        self.client.set_terminated(self.run_id, status=status)


def dataset_input(record: DatasetRecord, *, context: str) -> Any:
    """``record`` as MLflow's `DatasetInput` entity: name, digest, source and a profile of split and class counts."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=record.name, digest=record.digest, source_type=record.source_type,
                      source=json.dumps({"uri": record.source}), profile=json.dumps(record.profile))  # fmt: skip
    return DatasetInput(dataset=dataset, tags=[InputTag(key="mlflow.data.context", value=context)])


def make_tracker(cfg: TrackingConfig, *, rank: int, run_name: str, params: dict[str, Any]) -> Tracker:
    """An `MlflowTracker` on rank 0 when tracking is on, a `NullTracker` everywhere else."""
    if rank != 0 or cfg.backend == "none":
        return NullTracker()
    if problem := server_problem(tracking_uri(cfg)):
        # A worker group restarted during an outage: opening the run would cost minutes of MLflow's retries, then
        # the attempt. It trains untracked; the job records its epochs from the checkpoints when the run ends.
        log.warning("the MLflow tracking server at %s does not answer (%s); run %s trains untracked, and the job "
                    "records its epochs from the checkpoints when it ends", redact_uri(tracking_uri(cfg)), problem,
                    run_name)  # fmt: skip
        return NullTracker()
    return MlflowTracker(cfg, run_name=run_name, params=params)


def check_tracking(cfg: TrackingConfig) -> None:
    """Fails in seconds, with one sentence, when the tracking server cannot be reached (instead of retrying)."""
    if cfg.backend == "none":
        return
    uri = tracking_uri(cfg)
    if not uri.startswith(("http://", "https://")):
        return
    parts = urlsplit(uri)
    local = parts.hostname in ("127.0.0.1", "localhost", "::1")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    start = f"start it (mlflow server --host {parts.hostname} --port {port})" if local else "start it"
    check_server(uri, fix=f"{start}, fix tracking.tracking_uri / MLFLOW_TRACKING_URI, or set tracking.backend=none")
    # /health answers anyone; a search is the cheapest request a server with authentication checks the login of.
    with explained_refusal(uri, action="search experiments", permission="an account"):
        _client(uri).search_experiments(max_results=1)



def run_id_of(cfg: TrackingConfig, run_name: str) -> str | None:
    """The MLflow run id of ferdist run ``run_name`` in the configured experiment, or None."""
    found = find_run(_client(tracking_uri(cfg)), cfg.experiment, RUN_TAG, run_name)
    return found.info.run_id if found else None


def still_there(
    cfg: TrackingConfig,
    *,
    what: str,
    kept: str | None = None,
    again: str = "run the same command again, which records the finished run without training it again",
) -> None:
    """After a run, before recording it: a server that went down while it trained is one sentence at once (MLflow's
    client would retry each call for minutes), saying what is kept and how to record it later (``again``)."""
    where = f"the checkpoints are kept in {kept}" if kept else "nothing is lost"
    check_server(tracking_uri(cfg), fix=f"{what} was not recorded ({where}); start the server and {again}")


def tag_run(cfg: TrackingConfig, run_name: str, tags: dict[str, str]) -> None:
    """Sets ``tags`` on ferdist run ``run_name``'s MLflow run (nothing when tracking is off or the run is absent)."""
    if cfg.backend == "none":
        return
    still_there(cfg, what=f"run {run_name}")
    if (run_id := run_id_of(cfg, run_name)) is None:
        return
    client = _client(tracking_uri(cfg))
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


# --- the driver's side: the sweep's parent run, reports and status at the end, the published model -----------------


def open_sweep_run(cfg: TrackingConfig, *, sweep_name: str, params: dict[str, Any]) -> str:
    """The sweep's parent run (found again by tag ``ferdist.sweep`` when a sweep is resumed); returns its id."""
    client = _client(tracking_uri(cfg))
    with explained_refusal(tracking_uri(cfg), action=f"log runs in experiment '{cfg.experiment}'",
                           permission=f"EDIT on experiment '{cfg.experiment}'"):  # fmt: skip
        found = find_run(client, cfg.experiment, SWEEP_TAG, sweep_name)
        if found:
            client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        from mlflow.entities import Param

        run = client.create_run(_experiment_id(client, cfg.experiment), run_name=sweep_name,
                                tags={SWEEP_TAG: sweep_name})  # fmt: skip
        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        return run.info.run_id


def close_sweep_run(cfg: TrackingConfig, run_id: str, *, metrics: dict[str, float], tags: dict[str, str]) -> None:
    from mlflow.entities import Metric, RunTag

    client = _client(tracking_uri(cfg))
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])  # fmt: skip
    client.set_tag(run_id, STATUS_TAG, COMPLETED)
    client.set_terminated(run_id, status="FINISHED")


def finalize_run(
    cfg: TrackingConfig,
    *,
    run_name: str,
    run_path: str,
    filesystem: pyarrow.fs.FileSystem | None,
    status: str,
    config_yaml: str,
    select_by: str = "val/acc",
) -> tuple[str | None, Any]:
    """Logs a finished run's reports (best epoch's confusion matrix and class report, learning curves) and config as
    artefacts, and its final status (`COMPLETED`, `EARLY_STOPPED` or `FAILED`) as tag and run status.

    Returns:
        (MLflow run id, the best `ferdist.train.runs.StoredCheckpoint`); either is None where there is none.
    """
    from ferdist.track.reports import write_reports
    from ferdist.train import runs

    if cfg.backend == "none":
        return None, None
    still_there(cfg, what=f"run {run_name}", kept=run_path)
    client = _client(tracking_uri(cfg))
    run_id = run_id_of(cfg, run_name)
    if run_id is None:  # the run died before its first epoch was tracked
        return None, None
    best = last = None
    try:
        best, last = runs.best_and_last(run_path, filesystem, select_by=select_by)
    except FerdistError as exn:
        log.warning("%s: no reports (%s)", run_name, exn)
    if last is not None:
        record_missed_epochs(client, run_id, last.summary["history"])
    with tempfile.TemporaryDirectory(prefix="ferdist-reports-") as tmp:
        folder = Path(tmp)
        (folder / "config.yaml").write_text(config_yaml)
        client.log_artifact(run_id, str(folder / "config.yaml"))
        if best is not None:
            write_reports(folder / "reports", best=best.summary, history=last.summary["history"], run_name=run_name)
            client.log_artifacts(run_id, str(folder / "reports"), artifact_path="reports")
    client.set_tag(run_id, STATUS_TAG, status)
    client.set_terminated(run_id, status="FAILED" if status == FAILED else "FINISHED")
    return run_id, best


def record_missed_epochs(client: Any, run_id: str, history: Sequence[dict[str, Any]]) -> int:
    """Logs the epochs of ``history`` (a checkpoint's, one dict of metrics per epoch) that the run's tracker could
    not (the server was down while they trained); returns how many. The epochs it logged are found by their
    ``epoch`` metric, which every epoch logs first."""
    from mlflow.entities import Metric

    logged = {m.step for m in client.get_metric_history(run_id, "epoch")}
    now = int(time.time() * 1000)
    missed = [h for h in history if int(h["epoch"]) not in logged]
    batch = [Metric(k, float(v), now, int(h["epoch"])) for h in missed for k, v in h.items()
             if isinstance(v, (int, float))]  # fmt: skip
    for start in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics a request
        client.log_batch(run_id, metrics=batch[start : start + 1000])
    if missed:
        log.info("run %s: recorded %d epochs the tracking server missed while they trained", run_id, len(missed))
    return len(missed)


def record_finished(cfg: TrackingConfig, run_name: str, history: Sequence[dict[str, Any]], *, kept: str) -> None:
    """After a run that finished (pretraining, whose job has no reports to log): the epochs its tracker missed, and
    its end, if the tracker could not record that either (``kept``: where its checkpoints are)."""
    if cfg.backend == "none":
        return
    still_there(cfg, what=f"run {run_name}", kept=kept)
    if (run_id := run_id_of(cfg, run_name)) is None:
        return
    client = _client(tracking_uri(cfg))
    record_missed_epochs(client, run_id, history)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_tag(run_id, STATUS_TAG, COMPLETED)
        client.set_terminated(run_id, status="FINISHED")


def publish_model(run: RunConfig, *, run_id: str, best: Any, tags: dict[str, str]) -> Any:
    """Logs ``best`` (a `ferdist.train.runs.StoredCheckpoint` of ``run``) as the run's pyfunc model, registers it, and
    writes its model card (as the version's description and the run's ``model_card.md``).

    Returns:
        The `ferdist.track.registry.Registration`, or None when ``tracking.registered_model`` is empty.
    """
    from ferdist.data.loader import dataset_record, open_dataset
    from ferdist.track import registry
    from ferdist.track.model_card import model_card
    from ferdist.train import runs

    cfg = run.tracking
    data_tags: dict[str, str] = {}
    try:
        dataset = open_dataset(run.data.manifest, endpoint_url=run.data.endpoint_url)
        manifest = dataset.manifest
        record = dataset_record(dataset)
        # The version says where its data came from, as the run's dataset input does.
        data_tags = {"dataset.name": record.name, "dataset.digest": record.digest, "dataset.source": record.source}
    except FerdistError as exn:  # the shards moved since training: still register, with a card that says so
        log.warning("the model card cannot describe the shards: %s", exn)
        manifest = None
    synthetic = manifest is not None and manifest.source.synthetic
    uri = tracking_uri(cfg)
    if cfg.registered_model and (existing := registry.find_registered(
            cfg.registered_model, run_id=run_id, epoch=int(best.summary["epoch"]),
            select_by=run.checkpoint.select_by, tracking_uri=uri)) is not None:  # fmt: skip
        return existing
    with tempfile.TemporaryDirectory(prefix="ferdist-publish-") as tmp:
        model_uri = registry.log_model(run_id, runs.download(best, Path(tmp) / "checkpoint"), tracking_uri=uri)
        if not cfg.registered_model:
            return None
        val = best.summary["metrics"]
        tags = {"run_id": run_id, "epoch": str(best.summary["epoch"]), **data_tags, **tags}
        registration = registry.register(model_uri, name=cfg.registered_model, val_acc=float(val["val/acc"]),
                                         val_macro_f1=float(val["val/macro_f1"]), tags=tags, tracking_uri=uri,
                                         synthetic=synthetic, select_by=run.checkpoint.select_by)  # fmt: skip
        card = model_card(run, best=best.summary, version=registration.version, manifest=manifest)
        client = _client(uri)
        client.update_model_version(registration.name, registration.version, description=card)
        (Path(tmp) / "model_card.md").write_text(card)
        client.log_artifact(run_id, str(Path(tmp) / "model_card.md"))
    return registration
