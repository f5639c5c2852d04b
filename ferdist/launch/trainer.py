"""Ray Train at the edge: the `TorchTrainer` for a `RunConfig` (fine-tuning) or a `PretrainConfig` (MAE
pretraining), the loops it runs on the workers (each handed its MLflow tracker), and the result.

``jobs/train.py`` calls this for a single run, ``jobs/tune.py`` calls `build_trainer` once per trial, and
``jobs/pretrain.py`` for a pretraining run.
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass
from typing import Any

import ray.train
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api import data_parallel_trainer

from ferdist import storage
from ferdist.config import PretrainConfig, to_flat_dict
from ferdist.errors import FerdistError
from ferdist.launch.preflight import AnyConfig
from ferdist.train import runs


def storage_target(cfg: AnyConfig) -> tuple[str, Any]:
    """Ray's ``storage_path`` and filesystem for ``cfg.checkpoint``: an absolute local folder (Ray's own filesystem),
    or an s3:// prefix on ferdist's S3 filesystem, through the run's endpoint and riding out outages of up to
    ``checkpoint.outage_s``. Ray's controller, its workers and the driver all use this one filesystem, so every S3
    client of the run goes to the same endpoint (Ray would otherwise pick AWS itself)."""
    from ferdist.outage import resilient

    loc = storage.parse_uri(cfg.checkpoint.storage_path)
    if not loc.is_s3:
        assert loc.path is not None
        return str(loc.path.expanduser().resolve()), None
    filesystem = runs.s3_filesystem(cfg.checkpoint_endpoint, bucket=loc.bucket)
    return f"{loc.bucket}/{loc.key}".rstrip("/"), resilient(filesystem, budget_s=cfg.checkpoint.outage_s)


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: `ferdist.train.loop.train_fn_per_worker`, imported there.

    Importing the loop (torch models, transformers) takes seconds; a sweep's trial drivers only launch trainers,
    so they never pay for it.
    """
    from ferdist.launch.teachers import make_teacher
    from ferdist.track.tracking import make_tracker
    from ferdist.train.loop import train_fn_per_worker as train

    _without_traceback(functools.partial(train, make_tracker=make_tracker, make_teacher=make_teacher), config)


def pretrain_fn_per_worker(config: dict[str, Any]) -> None:
    """What each Ray Train worker of a pretraining run runs: `ferdist.train.pretraining.pretrain_fn_per_worker`."""
    from ferdist.track.tracking import make_tracker
    from ferdist.train.pretraining import pretrain_fn_per_worker as pretrain

    _without_traceback(functools.partial(pretrain, make_tracker=make_tracker), config)


def _without_traceback(fn: Any, config: dict[str, Any]) -> None:
    # Ray Train logs "Error in training function" with the traceback of what a worker raised; for ferdist's own
    # one-sentence errors (a lost shard, an outage past the budget) the frames say nothing the sentence does not,
    # and the driver prints the sentence with the worker's rank as its last line.
    ray_train_log = logging.getLogger("ray.train.v2._internal.util")
    if _not_a_ferdist_error not in ray_train_log.filters:
        ray_train_log.addFilter(_not_a_ferdist_error)
    try:
        fn(config)
    except FerdistError as exn:
        raise exn.with_traceback(None) from None


def _not_a_ferdist_error(record: logging.LogRecord) -> bool:
    """Keeps a log record unless it is written while a `FerdistError` is being handled (Ray logs the worker's error
    inside its except block)."""
    return not isinstance(sys.exc_info()[1], FerdistError)


def build_trainer(cfg: AnyConfig, *, callbacks: list[Any] | None = None) -> TorchTrainer:
    """The `TorchTrainer` running `train_fn_per_worker` (or `pretrain_fn_per_worker` for a `PretrainConfig`) on
    ``cfg.workers.num_workers`` workers."""
    resources: dict[str, float] = {"CPU": cfg.workers.cpus_per_worker}
    if cfg.workers.use_gpu:
        resources["GPU"] = cfg.workers.gpus_per_worker
    storage_path, filesystem = storage_target(cfg)
    return TorchTrainer(
        pretrain_fn_per_worker if isinstance(cfg, PretrainConfig) else train_fn_per_worker,
        train_loop_config=to_flat_dict(cfg),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers.num_workers, use_gpu=cfg.workers.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            # A fixed name: re-submitting the same run resumes it from its latest checkpoint.
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            # Ray keeps the resume states, newest first (the best models are ferdist's own model_epoch_* folders).
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_resume),
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
            callbacks=callbacks,
            # Ray's per-report INFO lines repeat every metric; the loop logs its own one-line summary per epoch.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def fit(trainer: TorchTrainer) -> ray.train.Result:
    """``trainer.fit()``, with a `FerdistError` raised in a worker (bad data, a missing shard, an outage past
    ``checkpoint.outage_s``) or in Ray's controller (its storage writes) raised as its own one sentence.

    Ray wraps what a worker raised in a `WorkerGroupError` whose message is every rank's traceback, and a controller
    failure in a `ControllerError`; the original exception travels inside, so the user can be shown the sentence
    ferdist wrote for them.
    """
    try:
        return trainer.fit()
    except ray.train.WorkerGroupError as exn:
        for rank, failure in sorted(exn.worker_failures.items()):
            if (cause := _ferdist_cause(failure)) is not None:
                raise type(cause)(f"{cause} (worker rank {rank})") from None
        raise
    except ray.train.ControllerError as exn:
        if (cause := _ferdist_cause(exn.controller_failure)) is not None:
            raise type(cause)(f"{cause} (Ray Train controller)") from None
        raise


class FailFastPolicy(DefaultFailurePolicy):
    """Ray Train's failure policy, except that a deterministic `FerdistError` raised in a worker (a missing shard, a
    damaged manifest, a bad backbone: `FerdistError.transient` is False) ends the run on its first occurrence.

    Ray cannot tell such an error from a lost node: it would restart the worker group ``max_failures`` times, each
    restart costing start-up time and printing every rank's traceback, only to fail the same way. Lost nodes and
    object-store outages keep the retries."""

    def make_decision(self, training_failed_error: Any) -> FailureDecision:
        failures = getattr(training_failed_error, "worker_failures", None) or {}
        if any((cause := _ferdist_cause(f)) is not None and not cause.transient for f in failures.values()):
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


def _fail_fast_policy(failure_config: ray.train.FailureConfig) -> FailFastPolicy:
    return FailFastPolicy(failure_config)


# Ray Train 2.60 takes no failure policy from its public API; the trainer builds it with this module-level factory,
# looked up when fit() runs, so every TorchTrainer of this process (runs, sweep trials, benchmarks) gets ferdist's.
data_parallel_trainer.create_failure_policy = _fail_fast_policy


def _ferdist_cause(failure: BaseException | None) -> FerdistError | None:
    while failure is not None and not isinstance(failure, FerdistError):
        failure = failure.__cause__ or failure.__context__ or getattr(failure, "cause", None)
    return failure


@dataclass(frozen=True)
class RunSummary:
    """What a finished run reports: its best epoch and where that model checkpoint is."""

    best_epoch: int
    best_metrics: dict[str, Any]
    best_checkpoint: str
    last_epoch: int
    last_metrics: dict[str, Any]
    run_path: str

    @property
    def best_val_acc(self) -> float:
        return float(self.best_metrics["val/acc"])


def summarize(result: ray.train.Result, *, select_by: str = "val/acc") -> RunSummary:
    """The best epoch by ``select_by`` among the run's model checkpoints, and the last epoch's metrics."""
    if result.error is not None:
        raise result.error
    best, last = runs.best_and_last(result.path, result.filesystem, select_by=select_by)
    # pyarrow paths carry no scheme: put s3:// back so the printed location can be pasted into aws s3 / ferdist.
    scheme = "s3://" if result.filesystem.type_name.endswith("s3") else ""  # "py::s3" through ferdist.outage
    return RunSummary(
        best_epoch=int(best.summary["epoch"]),
        best_metrics=dict(best.summary["metrics"]),
        best_checkpoint=scheme + best.path,
        last_epoch=int(last.summary["epoch"]),
        last_metrics=dict(last.summary["metrics"]),
        run_path=scheme + result.path,
    )
