"""Ray Tune at the edge: a sweep of training runs, each trial one `TorchTrainer` run, ASHA stopping the laggards.

Ray 2.60 (Train V2) pattern: the Tune trainable `run_trial` is only a driver; it builds the trial's `RunConfig`,
launches a `TorchTrainer` and relays each epoch's report to Tune (``TuneReportCallback``), where ASHA reads
``checkpoint.select_by`` (val/acc by default) at rungs of ``epoch``. A trial's Train run is named
``<sweep>-<trial id>`` under ``<storage_path>/<sweep>/trials``, so a restored sweep resumes its unfinished trials
from their checkpoints.

MLflow: the sweep is a parent run; each trial's rank 0 logs its child run; `TrialTracking` (a Tune callback, on the
driver) closes each trial's run with its reports and status. After the sweep the best trial's best checkpoint is
published as the registered model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from dataclasses import dataclass
from typing import Any

import ray
import ray.tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from ferdist.config import RunConfig, from_flat_dict, redacted, to_flat_dict, to_yaml
from ferdist.launch.trainer import build_trainer, fit, storage_target
from ferdist.track import tracking
from ferdist.tune.sweep import Dimension, Sweep, combinations, described, trial_epochs_budget

log = logging.getLogger(__name__)


def domain(dim: Dimension) -> Any:
    """The Ray Tune domain for one dimension (``randint`` bounds are inclusive, as written in the YAML)."""
    low, high = (dim.values + (None, None))[:2]
    return {
        "choice": lambda: ray.tune.choice(list(dim.values)),
        "grid": lambda: ray.tune.grid_search(list(dim.values)),
        "uniform": lambda: ray.tune.uniform(low, high),
        "loguniform": lambda: ray.tune.loguniform(low, high),
        "randint": lambda: ray.tune.randint(low, high + 1),
    }[dim.kind]()


def param_space(sweep: Sweep) -> dict[str, Any]:
    """The base run config, flattened, with each searched key replaced by its Tune domain."""
    return to_flat_dict(sweep.base) | {dim.key: domain(dim) for dim in sweep.search}


SOURCE_KEYS = ("model.pretrained", "data.manifest", "distill.teacher")
"""Settings that name something to load: a searched value of one is checked as the base config is."""


def check_searched_sources(base: RunConfig, search: tuple[Dimension, ...]) -> tuple[Dimension, ...]:
    """Before Ray starts: every choice of a searched `SOURCE_KEYS` setting passes the checks the base config passed
    (`ferdist.launch.preflight.preflight`), so a mistyped backbone among the choices is one sentence now, not a
    failed trial an hour in. Returns the search with those choices as the trials must get them: local paths made
    absolute, as the base config's are (a trial does not run in this directory)."""
    from ferdist.errors import FerdistError
    from ferdist.launch import preflight

    checked = []
    for dim in search:
        if dim.key not in SOURCE_KEYS or dim.kind not in ("choice", "grid"):
            checked.append(dim)
            continue
        values = []
        for value in dim.values:
            cfg = preflight.with_absolute_paths(
                from_flat_dict({**to_flat_dict(base), dim.key: value}, origin=f"search.{dim.key}"))  # fmt: skip
            try:
                preflight.preflight(cfg)
            except FerdistError as exn:
                raise FerdistError(f"search.{dim.key} = {value!r}: {exn}") from None
            values.append(to_flat_dict(cfg)[dim.key])
        checked.append(dataclasses.replace(dim, values=tuple(values)))
    check_searched_shapes(base, tuple(checked))
    return tuple(checked)


SHAPE_KEYS = ("model.freeze_blocks", "model.image_size")
"""Settings the backbone itself bounds (its depth; its patch size): checked against every searched backbone."""


def check_searched_shapes(base: RunConfig, search: tuple[Dimension, ...]) -> None:
    """Before Ray starts: every searched depth or size fits every searched backbone (``model.freeze_blocks: {choice:
    [0, 99]}`` on a 12-block ViT-B), as `ferdist.train.model.check_pretrained` checks the base config. A randint
    over one of them is checked at every value it can draw (up to 256 of them, else at its ends); past
    `ferdist.tune.sweep.MAX_COMBINATIONS` combinations, every pair of dimensions (a backbone refuses one setting at a
    time).

    Raises:
        FerdistError: the first combination the backbone refuses, naming its values.
    """
    from ferdist.errors import FerdistError
    from ferdist.train.model import check_pretrained

    dims = [d for d in search if d.key in (*SHAPE_KEYS, "model.pretrained")]
    if not any(d.key in SHAPE_KEYS for d in dims):
        return
    for combo in combinations(tuple(dims), every_int=256):
        where = described(combo)
        cfg = from_flat_dict({**to_flat_dict(base), **dict(combo)}, origin=where)
        try:
            check_pretrained(cfg.model, endpoint_url=cfg.data.endpoint_url)
        except FerdistError as exn:
            raise FerdistError(f"{where}: {exn}") from None


def trials_root(base: RunConfig) -> str:
    """Where the trials' Train runs (checkpoints) live: ``<storage_path>/<sweep>/trials``."""
    return f"{base.checkpoint.storage_path.rstrip('/')}/{base.name}/trials"


def trial_config(config: dict[str, Any], trial_id: str) -> RunConfig:
    """The `RunConfig` of one trial from its Tune config (the sweep's base with this trial's draws)."""
    cfg = from_flat_dict(config, origin=f"trial {trial_id}")
    return dataclasses.replace(
        cfg,
        name=f"{cfg.name}-{trial_id}",
        checkpoint=dataclasses.replace(cfg.checkpoint, storage_path=trials_root(cfg)),
    )


def run_trial(config: dict[str, Any]) -> None:
    """The Tune function trainable: drive one TorchTrainer run and relay its reports to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(config, ray.tune.get_context().get_trial_id())
    if (final := finished_metrics(cfg)) is not None:
        # Restored after it had finished: Tune saves its state every few seconds, so a driver that dies right after
        # a trial ends restores it as unfinished. Report where it ended instead of training again.
        ray.tune.report(final)
        return
    fit(build_trainer(cfg, callbacks=[TuneReportCallback()]))  # [ray] raises if the run fails for good


def finished_metrics(cfg: RunConfig) -> dict[str, Any] | None:
    """The last epoch's metrics if the run's stored checkpoints already reach ``loop.epochs``, else None."""
    from ferdist.train import runs

    storage_path, filesystem = storage_target(cfg)
    found = runs.checkpoints(f"{storage_path}/{cfg.name}", filesystem)
    if found and found[-1].summary["epoch"] >= cfg.loop.epochs:
        return dict(found[-1].summary["metrics"])
    return None


def trial_dirname(trial: Any) -> str:
    return trial.trial_id


class TrialTracking(ray.tune.Callback):
    """Closes each trial's MLflow run on the driver: reports, config and completed / early-stopped / failed."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        done = int((trial.last_result or {}).get("epoch", 0))
        self._close(trial, tracking.COMPLETED if done >= self.epochs else tracking.EARLY_STOPPED)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._close(trial, tracking.FAILED)

    def _close(self, trial: Any, status: str) -> None:
        cfg = trial_config(trial.config, trial.trial_id)
        storage_path, filesystem = storage_target(cfg)
        try:
            tracking.finalize_run(cfg.tracking, run_name=cfg.name, run_path=f"{storage_path}/{cfg.name}",
                                  filesystem=filesystem, status=status, config_yaml=to_yaml(cfg),
                                  select_by=cfg.checkpoint.select_by)  # fmt: skip
        except Exception as exn:  # a tracking hiccup must not stop the other trials
            log.warning("could not close the MLflow run of trial %s: %s", trial.trial_id, exn)


def concurrent_trials(cfg: RunConfig, *, driver_cpus: float, resources: dict[str, float]) -> int:
    """How many trials fit on the cluster at once: its GPUs over each trial's, or CPUs on a CPU-only cluster."""
    workers = cfg.workers
    if workers.use_gpu:
        return max(1, math.floor(resources.get("GPU", 0) / (workers.num_workers * workers.gpus_per_worker)))
    per_trial = workers.num_workers * workers.cpus_per_worker + driver_cpus
    return max(1, math.floor(resources.get("CPU", 1) / per_trial))


def experiment_path(base: RunConfig) -> tuple[str, Any]:
    """The sweep's Tune experiment folder (``<storage_path>/<sweep>``) and its pyarrow filesystem, if custom."""
    storage_path, filesystem = storage_target(base)
    return f"{storage_path}/{base.name}", filesystem


def build_tuner(sweep: Sweep, *, max_concurrent: int, resume: bool) -> ray.tune.Tuner:
    """A new `Tuner` for ``sweep``, or (``resume``) the one saved in its experiment folder, unfinished trials
    continuing from their checkpoints and errored ones retried."""
    base = sweep.base
    trainable = ray.tune.with_resources(run_trial, {"cpu": sweep.sweep.driver_cpus})
    path, filesystem = experiment_path(base)
    if resume:
        return ray.tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=filesystem)
    if sweep.sweep.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=base.loop.epochs, grace_period=sweep.sweep.grace_period,
                                  reduction_factor=sweep.sweep.reduction_factor)  # fmt: skip
    else:
        scheduler = FIFOScheduler()
    storage_path, _ = storage_target(base)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return ray.tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=ray.tune.TuneConfig(
            metric=base.checkpoint.select_by, mode="max", scheduler=scheduler, num_samples=sweep.sweep.samples,
            trial_dirname_creator=trial_dirname,
            # The generator limits concurrency itself (Tune ignores max_concurrent_trials next to a custom one).
            search_alg=BasicVariantGenerator(random_state=sweep.sweep.seed, max_concurrent=max_concurrent),
        ),  # fmt: skip
        run_config=ray.tune.RunConfig(
            name=base.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            callbacks=[TrialTracking(base.loop.epochs)],
            verbose=1,
        ),
    )


@dataclass(frozen=True)
class TrialOutcome:
    trial_id: str
    run: RunConfig
    """The trial's run config (its name is the trial's Train run and MLflow run)."""
    status: str
    """completed, early-stopped or failed."""
    epochs: int
    best_score: float
    """The trial's best value of checkpoint.select_by."""
    seconds: float
    """Wall time of the trial's driver, start-up included."""
    config: dict[str, Any]
    """The searched values."""


@dataclass(frozen=True)
class SweepSummary:
    trials: list[TrialOutcome]
    budget_trial_epochs: int
    """Trial-epochs if every trial ran loop.epochs."""
    devices_per_trial: float
    """GPUs (or, on CPUs, workers) one trial holds."""

    @property
    def run_trial_epochs(self) -> int:
        return sum(t.epochs for t in self.trials)

    @property
    def saved_trial_epochs(self) -> int:
        return self.budget_trial_epochs - self.run_trial_epochs

    @property
    def saved_device_hours(self) -> float:
        """Saved trial-epochs × the sweep's median seconds per trial-epoch × devices per trial."""
        per_epoch = [t.seconds / t.epochs for t in self.trials if t.epochs]
        return self.saved_trial_epochs * (statistics.median(per_epoch) if per_epoch else 0.0) * \
            self.devices_per_trial / 3600  # fmt: skip

    @property
    def best(self) -> TrialOutcome | None:
        ranked = [t for t in self.trials if t.epochs]
        return max(ranked, key=lambda t: t.best_score) if ranked else None

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.trials)


def summarize(results: ray.tune.ResultGrid, sweep: Sweep) -> SweepSummary:
    searched = [d.key for d in sweep.search]
    outcomes = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1]
        epochs = int(metrics.get("epoch", 0))
        if result.error is not None:
            status = tracking.FAILED
        else:
            status = tracking.COMPLETED if epochs >= sweep.base.loop.epochs else tracking.EARLY_STOPPED
        outcomes.append(TrialOutcome(
            trial_id=trial_id, run=trial_config(result.config, trial_id), status=status, epochs=epochs,
            best_score=float(metrics.get("best/score", float("nan"))),
            seconds=float(metrics.get("time_total_s", 0)),
            config={k: result.config.get(k) for k in searched},
        ))  # fmt: skip
    workers = sweep.base.workers
    devices = workers.num_workers * (workers.gpus_per_worker if workers.use_gpu else 1)
    return SweepSummary(sorted(outcomes, key=lambda t: t.trial_id), trial_epochs_budget(sweep), devices)


def sweep_params(sweep: Sweep) -> dict[str, Any]:
    """The parent run's params: the sweep settings, each searched dimension, and the base config."""
    params = {f"sweep.{k}": v for k, v in dataclasses.asdict(sweep.sweep).items()}
    params |= {f"search.{d.key}": d.describe() for d in sweep.search}
    return params | redacted({k: v for k, v in to_flat_dict(sweep.base).items() if k not in params})


def publish_best(sweep: Sweep, summary: SweepSummary, *, parent_run_id: str) -> Any:
    """Registers the best trial's best checkpoint (see `ferdist.track.tracking.publish_model`) and closes the sweep's
    parent run with the sweep's counts; returns the `ferdist.track.registry.Registration` or None."""
    from ferdist.train import runs

    cfg = sweep.base.tracking
    storage, _ = storage_target(sweep.base)
    tracking.still_there(cfg, what=f"sweep {sweep.base.name}", kept=f"{storage}/{sweep.base.name}",
                         again="resume the sweep (the same command with --resume)")  # fmt: skip
    tags: dict[str, str] = {}
    registration = None
    if (best := summary.best) is not None:
        tags["best_trial"] = best.trial_id
        storage_path, filesystem = storage_target(best.run)
        checkpoint, _ = runs.best_and_last(f"{storage_path}/{best.run.name}", filesystem,
                                           select_by=best.run.checkpoint.select_by)  # fmt: skip
        if (run_id := tracking.run_id_of(cfg, best.run.name)) is not None:
            tags["best_run_id"] = run_id
            registration = tracking.publish_model(best.run, run_id=run_id, best=checkpoint,
                                                  tags={"sweep": sweep.base.name})  # fmt: skip
            if registration is not None:
                tags["model_version"] = registration.version
    metrics = {
        "trials": len(summary.trials), "early_stopped": summary.count(tracking.EARLY_STOPPED),
        "failed": summary.count(tracking.FAILED), "trial_epochs_run": summary.run_trial_epochs,
        "trial_epochs_saved": summary.saved_trial_epochs, "device_hours_saved": summary.saved_device_hours,
    }  # fmt: skip
    if best is not None:
        metrics["best/score"] = best.best_score
    tracking.close_sweep_run(cfg, parent_run_id, metrics=metrics, tags=tags)
    return registration
