"""Checks on the driver before Ray starts: what would otherwise fail on every worker, after Ray's start-up and
retries, fails here in seconds with one sentence. ``jobs/train.py``, ``jobs/tune.py`` and ``jobs/pretrain.py`` call
`prepare` first.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ferdist import storage
from ferdist.config import PretrainConfig, PretrainDataConfig, RunConfig, redacted, to_flat_dict
from ferdist.errors import FerdistError
from ferdist.track.store import absolute_uri, tracking_uri
from ferdist.track.tracking import check_registration, open_run, prepare_tracking

AnyConfig = RunConfig | PretrainConfig


def prepare(cfg: AnyConfig, *, sweep: bool = False) -> tuple[AnyConfig, int]:
    """On the driver, before Ray starts: ``cfg`` with absolute local paths and a prepared tracking store (see
    `ferdist.track.tracking.prepare_tracking`), checked by `preflight`; and the training steps per epoch.

    With tracking on, the run's MLflow run is opened here (``sweep``: not for a sweep's base config, whose trials open
    their own), and a fine-tuning run's right to register its model is probed: a login that may not do either is one
    sentence now, not a worker's failure after Ray's start-up."""
    cfg = with_absolute_paths(cfg)
    steps = preflight(cfg)
    return with_tracking(cfg, sweep=sweep), steps


def with_tracking(cfg: AnyConfig, *, sweep: bool = False) -> AnyConfig:
    """The second half of `prepare`, for a checked ``cfg``: the tracking store prepared (and, ``sweep`` aside, the
    run opened). It writes to the store, so a job with checks of its own (tune.py: the sweep to resume exists) runs
    them between the halves."""
    cfg = dataclasses.replace(cfg, tracking=prepare_tracking(cfg.tracking))
    if cfg.tracking.backend != "none":
        if isinstance(cfg, RunConfig):
            check_registration(cfg.tracking)
        if not sweep:
            open_run(cfg.tracking, run_name=cfg.name, params=redacted(to_flat_dict(cfg)))
    return cfg


def preflight(cfg: AnyConfig) -> int:
    """Checks on the driver what would otherwise fail on every worker, or in Ray's controller tens of seconds in;
    returns the training steps per epoch.

    Raises:
        FerdistError: the data or checkpoint store is unreachable, refuses the credentials, lacks its bucket or (the
            checkpoint store) cannot be written; the dataset is missing or too small for the batch; the pretrained
            source or a distillation teacher is unavailable (or answers other classes).
    """
    from ferdist.data.loader import build_loader, open_dataset, open_pretraining_data, steps_per_epoch

    # Short timeouts first, so an endpoint that accepts connections but never answers is named in seconds.
    storage.check_reachable(cfg.data.manifest, endpoint_url=cfg.data.endpoint_url)
    world = cfg.workers.num_workers
    if isinstance(cfg, PretrainConfig):
        for uri in cfg.data.extra:
            storage.check_reachable(uri, endpoint_url=cfg.data.endpoint_url)
        data = open_pretraining_data(cfg.data.manifest, cfg.data.extra, endpoint_url=cfg.data.endpoint_url)
    else:
        dataset = open_dataset(cfg.data.manifest, endpoint_url=cfg.data.endpoint_url)
        if "val" not in dataset.manifest.splits:  # the loop picks the best epoch on it: a worker would fail there
            raise FerdistError(f"{cfg.data.manifest} has no val split, which fine-tuning scores every epoch on to keep "
                               "the best; re-shard it with --val-fraction (e.g. 0.1) or a val/ folder")  # fmt: skip
        data = dataset.select("train")
    # Building (not iterating) the loader runs its checks: enough samples and shards for every worker.
    build_loader(data, None, cfg.data, batch_size=cfg.loop.batch_per_worker(world), rank=0, world_size=world,
                 training=True)  # fmt: skip
    if isinstance(cfg, PretrainConfig):
        from ferdist.train.mae import check_start

        check_start(cfg.model, endpoint_url=cfg.data.endpoint_url)
    else:
        from ferdist.launch.teachers import check_teachers
        from ferdist.train.model import check_pretrained

        check_pretrained(cfg.model, endpoint_url=cfg.data.endpoint_url)
        check_teachers(cfg)  # loads each teacher once here: a wrong URI or class list stops before Ray starts
    check_checkpoint_storage(cfg)
    return steps_per_epoch(data.samples, batch_size=cfg.loop.batch_per_worker(world), world_size=world)


def check_checkpoint_storage(cfg: AnyConfig) -> None:
    """checkpoint.storage_path is reachable, accepts the credentials, has its bucket and can be written."""
    try:
        storage.check_writable(cfg.checkpoint.storage_path, endpoint_url=cfg.checkpoint_endpoint)
    except FerdistError as exn:
        raise type(exn)(f"checkpoint.storage_path: {exn}") from None


def with_absolute_paths(cfg: AnyConfig) -> AnyConfig:
    """``cfg`` with local relative paths made absolute: Ray workers do not run in the driver's working directory.

    Raises:
        FerdistError: two spellings of one path (``shards/a`` and ``/abs/shards/a``, ``m`` and ``m/``) meet only
            once resolved: the config's own check (a teacher or dataset named twice) then refuses them here.
    """
    try:
        return _absolute_paths(cfg)
    except ValueError as exn:
        raise FerdistError(str(exn)) from None


def _absolute_paths(cfg: AnyConfig) -> AnyConfig:
    def absolute(path: str) -> str:
        if not storage.names_local_path(path):  # s3://, file://, random:tiny
            return path
        return str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else path

    storage_path = cfg.checkpoint.storage_path
    if (loc := storage.parse_uri(storage_path)).path is not None:  # Ray creates it: resolve it even if absent
        storage_path = str(loc.path.expanduser().resolve())
    data = dataclasses.replace(cfg.data, manifest=absolute(cfg.data.manifest))
    if isinstance(cfg.data, PretrainDataConfig):
        data = dataclasses.replace(data, extra=tuple(absolute(uri) for uri in cfg.data.extra))
    extra = {}
    if isinstance(cfg, RunConfig):  # a teacher given as a local checkpoint folder
        extra["distill"] = dataclasses.replace(cfg.distill, teacher=tuple(absolute(t) for t in cfg.distill.teacher))
        if any(t.startswith(("models:/", "runs:/")) for t in cfg.distill.teacher):
            # A worker runs in another directory (and on a cluster without the driver's environment): it reads a
            # registry teacher from the store the driver resolved, even where the run itself tracks nothing.
            extra["tracking"] = dataclasses.replace(cfg.tracking, tracking_uri=absolute_uri(tracking_uri(cfg.tracking)))
    return dataclasses.replace(
        cfg,
        data=data,
        model=dataclasses.replace(cfg.model, pretrained=absolute(cfg.model.pretrained)),
        checkpoint=dataclasses.replace(cfg.checkpoint, storage_path=storage_path),
        **extra,
    )
