"""The per-worker training loop: Ray Train runs `train_fn_per_worker` on every worker.

Order: build → restore → for each epoch: train steps (forward, backward, clip, step, schedule) → evaluate →
checkpoint + report. The framework surface is a `Session` (rank, device, DDP wrapping, checkpoint in/out):
`RaySession` inside Ray Train, `LocalSession` for one process without Ray (tests, the no-Ray benchmark baseline).

Determinism: model init, data order, augmentation (mixing included), dropout and drop path are seeded from (seed,
epoch, rank), and checkpoints are taken at epoch ends (with the EMA of the weights, and the frozen prefix a function of
the epoch), so a run resumed from epoch k's checkpoint continues exactly as if it was never stopped.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ferdist.config import RunConfig, from_flat_dict, redacted, to_flat_dict
from ferdist.constants import FER_CLASSES
from ferdist.data.loader import ShardedDataset, build_loader, dataset_record, open_dataset, steps_per_epoch
from ferdist.data.mixing import augment_batch
from ferdist.data.transforms import eval_transform
from ferdist.errors import FerdistError
from ferdist.metrics import report_from_confusion
from ferdist.train import checkpoint as ckpt
from ferdist.train.dist import all_reduce_sum
from ferdist.train.distill import Teacher, TeacherFactory, combined_loss, distillation_loss, no_teacher
from ferdist.train.ema import averaged, ema_copy, update_ema
from ferdist.train.model import FerClassifier, build_model
from ferdist.train.optim import Schedule, build_optimizer, make_schedule
from ferdist.train.tracker import Tracker, TrackerFactory, untracked

log = logging.getLogger(__name__)


class Session(Protocol):
    """What the loop needs from the framework that runs it."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module: ...
    def latest_checkpoint(self) -> Path | None: ...
    def model_store(self) -> ckpt.ModelStore: ...
    def report(self, metrics: dict[str, float], resume: ckpt.Snapshot | None, *, mode: str) -> None: ...
    def finish(self) -> None: ...


class RaySession:
    """Ray Train's view of this worker: DDP via prepare_model, resume state persisted by Ray to the run's
    storage_path, model checkpoints beside it."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()  # [ray] rank and world size, read here only
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()  # [ray] this worker's GPU, or the CPU
        self._checkpoint = ray.train.get_checkpoint()  # [ray] the latest checkpoint after a restart, else None
        self._storage = ctx.get_storage()  # [ray] the run folder: local, or s3:// through pyarrow
        self._checkpoint_dir: Path | None = None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # [ray] move to device, wrap in DDP when world_size > 1

    def latest_checkpoint(self) -> Path | None:
        if self._checkpoint is None:
            return None
        self._checkpoint_dir = Path(tempfile.mkdtemp(prefix="ferdist-restore-"))
        return Path(self._checkpoint.to_directory(str(self._checkpoint_dir)))  # [ray] fetched from storage_path

    def model_store(self) -> ckpt.ModelStore:
        return ckpt.ModelStore(self._storage.storage_filesystem, self._storage.experiment_fs_path)

    def report(self, metrics: dict[str, float], resume: ckpt.Snapshot | None, *, mode: str) -> None:
        """Reports ``metrics`` (every rank: it is a barrier); rank 0 hands Ray the resume state to persist.

        In async mode the snapshot is serialised inside Ray's upload thread (``checkpoint_upload_fn``), so the
        loop goes on at once; Ray registers the checkpoint only once it is whole in storage, and waits for the last
        upload before the run ends.
        """
        import ray.train
        from ray.train import CheckpointUploadMode

        if self._checkpoint_dir is not None:  # the restored copy is loaded by now
            shutil.rmtree(self._checkpoint_dir, ignore_errors=True)
            self._checkpoint_dir = None
        upload_mode = CheckpointUploadMode.ASYNC if mode == "async" else CheckpointUploadMode.SYNC
        if resume is None:
            # Async even without a checkpoint: Ray reports in order, so a sync report would wait for the upload.
            ray.train.report(metrics, checkpoint_upload_mode=upload_mode)  # [ray] report
            return
        stage = Path(tempfile.mkdtemp(prefix="ferdist-resume-"))
        storage = self._storage

        def upload(checkpoint: Any, name: str) -> Any:
            from ferdist.outage import budget_of, retried

            try:
                ckpt.write_snapshot(resume, stage)
                # The whole folder again if the copy is cut by an outage (within checkpoint.outage_s).
                return retried(lambda: storage.persist_current_checkpoint(checkpoint, name),
                               budget_s=budget_of(storage.storage_filesystem),
                               what=f"uploading the resume checkpoint of epoch {resume.epoch}")  # fmt: skip
            except OSError as exn:
                raise FerdistError(
                    f"could not write the resume checkpoint of epoch {resume.epoch} to {storage.experiment_fs_path} "
                    f"({exn}); the checkpoints committed before it are intact: fix the storage and re-submit"
                ) from None

        ray.train.report(  # [ray] report + persist the resume state (in Ray's upload thread when async)
            metrics, checkpoint=ray.train.Checkpoint.from_directory(str(stage)),
            checkpoint_dir_name=f"{ckpt.RESUME_PREFIX}{resume.epoch:04d}", checkpoint_upload_mode=upload_mode,
            delete_local_checkpoint_after_upload=True, checkpoint_upload_fn=upload,
        )  # fmt: skip

    def finish(self) -> None:
        """Nothing to wait for here: Ray flushes its upload thread before the run counts as finished."""


@dataclass
class LocalSession:
    """One process, no Ray: resume state in ``root/checkpoint_epoch_NNNN`` (the newest kept), models beside it."""

    root: Path
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    _writer: ckpt.LocalResumeWriter | None = None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.root.glob(f"{ckpt.RESUME_PREFIX}*[0-9]"))
        return found[-1] if found else None

    def model_store(self) -> ckpt.ModelStore:
        import pyarrow.fs

        self.root.mkdir(parents=True, exist_ok=True)
        return ckpt.ModelStore(pyarrow.fs.LocalFileSystem(), str(self.root.resolve()))

    def report(self, metrics: dict[str, float], resume: ckpt.Snapshot | None, *, mode: str) -> None:
        if resume is not None:
            self._writer = self._writer or ckpt.LocalResumeWriter(self.root, mode=mode)
            self._writer.submit(resume)

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.wait()


def train_fn_per_worker(
    config: dict[str, Any], *, make_tracker: TrackerFactory, make_teacher: TeacherFactory = no_teacher
) -> None:
    """Ray Train's entry point (``make_tracker`` and ``make_teacher`` bound by `ferdist.launch.trainer`): ``config``
    is `ferdist.config.to_flat_dict` of the run's `RunConfig`."""
    # Ray Train logs every report at INFO with all its metrics; keep the worker's own one-line epoch summaries.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ferdist").setLevel(logging.INFO)
    run_training(from_flat_dict(config, origin="train_loop_config"), RaySession(), make_tracker=make_tracker,
                 make_teacher=make_teacher)  # fmt: skip


def run_training(
    cfg: RunConfig, session: Session, *, make_tracker: TrackerFactory = untracked,
    make_teacher: TeacherFactory = no_teacher,
) -> ckpt.TrainState:  # fmt: skip
    """Trains ``cfg.loop.epochs`` epochs (continuing from the session's latest checkpoint); returns the progress.

    The run is tracked (rank 0 only) and marked FINISHED or FAILED in the tracker when it ends.
    """
    return tracked(functools.partial(train, make_teacher=make_teacher), cfg, session, make_tracker=make_tracker)


def tracked(loop: Any, cfg: Any, session: Session, *, make_tracker: TrackerFactory) -> ckpt.TrainState:
    """``loop(cfg, session, tracker=…)`` with the run's tracker (rank 0 only), marked FINISHED or FAILED at the end."""
    tracker = make_tracker(cfg.tracking, rank=session.rank, run_name=cfg.name, params=redacted(to_flat_dict(cfg)))
    try:
        state = loop(cfg, session, tracker=tracker)
    except BaseException:
        tracker.close(status="FAILED")
        raise
    tracker.close(status="FINISHED")
    return state


def train(
    cfg: RunConfig, session: Session, *, tracker: Tracker, make_teacher: TeacherFactory = no_teacher
) -> ckpt.TrainState:
    """The training loop: build → restore → per epoch: train steps, evaluate, checkpoint, report."""
    rank, world_size, device = session.rank, session.world_size, session.device
    # First: a teacher that cannot be loaded stops the run before any data is read.
    teacher = make_teacher(cfg, device) if cfg.distill.on else None
    dataset = open_dataset(cfg.data.manifest, endpoint_url=cfg.data.endpoint_url, outage_s=cfg.checkpoint.outage_s)
    tracker.log_datasets([dataset_record(dataset)], context="training")
    batch_size = cfg.loop.batch_per_worker(world_size)
    train_info = dataset.manifest.split("train")
    steps = steps_per_epoch(train_info.samples, batch_size=batch_size, world_size=world_size)
    schedule = make_schedule(cfg.optim, steps_per_epoch=steps, epochs=cfg.loop.epochs)
    bf16 = cfg.loop.autocast_bf16(device.type)

    raw_model = build_model(cfg.model, seed=cfg.seed, endpoint_url=cfg.data.endpoint_url).to(device)
    optimizer, scheduler, trainable = optimizer_for_run(raw_model, cfg, schedule=schedule)
    ema = ema_copy(raw_model) if cfg.optim.ema_decay is not None else None
    ema_params = averaged(ema, raw_model, trainable) if ema is not None else None
    frozen = ckpt.frozen_sha256(raw_model)  # once: these weights never change, so resume state leaves them out
    state = ckpt.TrainState()
    if (restore_dir := session.latest_checkpoint()) is not None:
        state = ckpt.restore(restore_dir, raw_model=raw_model, optimizer=optimizer, scheduler=scheduler,
                             pretrained=cfg.model.pretrained, ema=ema)  # fmt: skip
        state.resumed_at.append(state.epochs_done)
        log.info("resumed from the checkpoint after epoch %d", state.epochs_done)
    set_frozen(raw_model, ema, cfg.model.frozen_blocks_at(state.epochs_done))
    frozen_weights = ckpt.frozen_state(raw_model) if rank == 0 else {}  # copied off the device once per run
    store = session.model_store() if rank == 0 else None
    if store is not None:
        ckpt.discard_after(store, state.epochs_done)
    manager = ckpt.CheckpointManager(cfg.checkpoint, epochs=cfg.loop.epochs, eval_every=cfg.loop.eval_every,
                                     store=store, history=state.history)  # fmt: skip
    model = wrap(raw_model, session, compile_mode=cfg.loop.compile)
    weights = class_weights(train_info.class_counts, cfg.optim.class_weights, device=device)
    if rank == 0:
        log.info(
            "%d workers x %d = global batch %d, %d steps/epoch, peak lr %g, %d warmup steps, %s, %.1fM of %.1fM "
            "parameters trained", world_size, batch_size, batch_size * world_size, steps, cfg.optim.lr,
            schedule.warmup_steps, "bf16" if bf16 else "fp32",
            sum(p.numel() for p in raw_model.parameters() if p.requires_grad) / 1e6,
            sum(p.numel() for p in raw_model.parameters()) / 1e6,
        )  # fmt: skip

    for epoch in range(state.epochs_done, cfg.loop.epochs):
        cycle_started = time.perf_counter()
        if (blocks := cfg.model.frozen_blocks_at(epoch)) != raw_model.freeze_blocks:
            # [ray] Gradual unfreezing: DDP syncs only the parameters that needed gradients when it wrapped the
            # model, so every rank releases blocks at this same epoch boundary and wraps the model anew.
            set_frozen(raw_model, ema, blocks)
            model = wrap(raw_model, session, compile_mode=cfg.loop.compile, replacing=model)
            if rank == 0:
                log.info("epoch %d: blocks %d and up train (model.unfreeze)", epoch + 1, blocks)
        torch.manual_seed(mixed_seed(cfg.seed, epoch, rank))  # dropout
        augment_rng = torch.Generator().manual_seed(mixed_seed(cfg.seed, epoch, rank, 1))
        loader = build_loader(
            dataset, "train", cfg.data, batch_size=batch_size, rank=rank, world_size=world_size,
            epoch=epoch, seed=cfg.seed, training=True, pin_memory=device.type == "cuda",
        )  # fmt: skip  # [ray] each rank reads its own shards: Ray does not shard IterableDatasets
        model.train()
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, seen
        started = time.perf_counter()
        for step, (images, labels) in enumerate(on_device(loader, device)):
            loss, logits, lr = train_step(
                model, images, labels, cfg=cfg, optimizer=optimizer, scheduler=scheduler, weights=weights,
                trainable=trainable, bf16=bf16, generator=augment_rng, ema_params=ema_params, teacher=teacher,
            )  # fmt: skip
            seen = totals.new_tensor(len(labels))
            totals += torch.stack([loss.detach().double() * seen, (logits.argmax(1) == labels).sum().double(), seen])
            if (step + 1) % cfg.loop.log_every == 0 or step + 1 == steps:
                # Checking here rather than every step keeps the GPU from syncing on each batch.
                check_finite(loss, epoch=epoch, step=step)
                if rank == 0:
                    log.info("epoch %d step %d/%d loss %.4f lr %.3g", epoch + 1, step + 1, steps, loss.item(), lr)
        train_loss, train_correct, train_seen = all_reduce_sum(totals, world_size=world_size).tolist()
        epoch_seconds = time.perf_counter() - started

        metrics = {
            "epoch": epoch + 1,
            "step": (epoch + 1) * steps,
            "train/loss": train_loss / train_seen,
            "train/acc": train_correct / train_seen,
            "train/lr": lr,
            "perf/samples_per_s": train_seen / epoch_seconds,
            "perf/epoch_s": epoch_seconds,
        }
        confusions: dict[str, list[list[int]]] = {}
        if manager.evaluates(epoch):
            scores, confusions = validate(raw_model, ema, dataset, cfg, rank=rank, world_size=world_size,
                                          device=device)  # fmt: skip
            metrics |= scores
        if device.type == "cuda":  # the epoch's peak (training and evaluation), for sizing batches and GPUs
            metrics["perf/gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        improved = manager.improves(metrics)
        best = metrics if improved else manager.best
        if best is not None:
            scored = cfg.checkpoint.scored  # val/, or val_ema/ when the EMA is the model kept
            metrics |= {"best/score": best[cfg.checkpoint.score_key], "best/val_acc": best[f"{scored}acc"],
                        "best/epoch": best["epoch"]}  # fmt: skip
        state.history.append(metrics)
        state.epochs_done = epoch + 1
        if rank == 0:
            log_epoch(metrics)
        # [checkpoint] rank 0 copies state off the device; files are written while the next epoch trains.
        blocked = manager.blocked_s
        manager.raise_if_failed(wait=False)
        model_snapshot = resume = None
        # The EMA's model is saved with its own scores as val/*: what evaluate.py, the registry and pruning read.
        kept, kept_scores = (ema, as_saved(metrics)) if cfg.checkpoint.best_weights == "ema" else (raw_model, None)
        if improved and rank == 0:
            model_snapshot = manager.save_model(functools.partial(
                ckpt.take_snapshot, kept, cfg=cfg, state=state, confusion=confusions[cfg.checkpoint.scored],
                frozen=frozen_weights, metrics=kept_scores))  # fmt: skip
        elif improved:
            manager.best = kept_scores or metrics
        if manager.resumes(epoch) and rank == 0:
            snap_started = time.perf_counter()
            resume = ckpt.take_snapshot(raw_model, cfg=cfg, state=state, confusion=confusions.get("val/", []),
                                        resume=(optimizer, scheduler, frozen), ema=ema,
                                        reuse=model_snapshot if kept is raw_model else None)  # fmt: skip
            manager.blocked_s += time.perf_counter() - snap_started
        if epoch + 1 == cfg.loop.epochs:
            manager.finish()  # the last model is committed before the last report: the run is done after it
        report_started = time.perf_counter()
        tracker.log_metrics(metrics, step=epoch + 1)
        tracker.flush()  # the epoch is in MLflow before the report, after which Tune may stop the trial
        session.report(dict(metrics), resume, mode=cfg.checkpoint.write)  # [ray] report (+ resume state)
        metrics["perf/checkpoint_s"] = manager.blocked_s - blocked
        metrics["perf/report_s"] = time.perf_counter() - report_started
        # The whole epoch as the job experiences it (train, eval, checkpoint, report); known only after the report,
        # so it reaches the history saved with the next checkpoint.
        metrics["perf/cycle_s"] = time.perf_counter() - cycle_started
    manager.finish()
    session.finish()
    if restore_dir is not None and state.resumed_at[-1] == cfg.loop.epochs and state.history:
        # Restored after its last epoch (e.g. a sweep resumed after its driver died): nothing left to train, but
        # the caller (Tune) still needs the run's final metrics.
        session.report(dict(state.history[-1]), None, mode=cfg.checkpoint.write)
    return state


def on_device(loader: Iterable[dict[str, torch.Tensor]], device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """(images, labels) on ``device``, the next batch's copy issued before this one is used: from pinned host memory
    with ``non_blocking`` the transfer overlaps the step on a GPU (on the CPU both are no-ops)."""

    def move(batch: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, ...] | None:
        if batch is None:
            return None
        return batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)

    batches = iter(loader)
    upcoming = move(next(batches, None))
    while upcoming is not None:
        current, upcoming = upcoming, move(next(batches, None))
        yield current


def optimizer_for_run(
    raw_model: FerClassifier, cfg: RunConfig, *, schedule: Schedule
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR, list[nn.Parameter]]:
    """AdamW and its schedule over every parameter the run will train, and those parameters in model order.

    With model.unfreeze that includes the blocks released later, in their layer-wise LR group from the start: a
    parameter still frozen gets no gradient, and AdamW skips it (no moments, no weight decay) until it is released,
    so the optimizer and its checkpoints keep one shape all run.
    """
    raw_model.set_frozen(cfg.model.fewest_frozen())
    optimizer, scheduler = build_optimizer(raw_model, cfg.optim, schedule=schedule)
    trainable = [p for p in raw_model.parameters() if p.requires_grad]
    raw_model.set_frozen(cfg.model.freeze_blocks)
    return optimizer, scheduler, trainable


def set_frozen(raw_model: FerClassifier, ema: FerClassifier | None, blocks: int) -> None:
    """Freezes the first ``blocks`` blocks of the model and of its EMA (whose snapshots then hold the same set)."""
    for model in (raw_model, ema):
        if model is not None and model.freeze_blocks != blocks:
            model.set_frozen(blocks)


def wrap(raw_model: nn.Module, session: Session, *, compile_mode: str, replacing: nn.Module | None = None) -> nn.Module:
    """``raw_model`` as the steps call it: prepared by the session (DDP over the parameters that train now) and
    compiled around DDP, as PyTorch recommends (evaluation keeps the eager raw_model). ``replacing``: the previous
    wrapper, whose DDP gradient hooks are removed first, so that only the new one syncs."""
    inner = getattr(replacing, "_orig_mod", replacing)  # under torch.compile's wrapper
    if hasattr(inner, "_remove_autograd_hooks"):  # DistributedDataParallel
        inner._remove_autograd_hooks()
    model = session.prepare_model(raw_model)
    return model if compile_mode == "off" else torch.compile(model, mode=compile_mode)


def log_epoch(metrics: dict[str, float]) -> None:
    """The epoch's one-line summary."""
    val_text = (f"val loss {metrics['val/loss']:.4f} acc {metrics['val/acc']:.4f} macro-F1 "
                f"{metrics['val/macro_f1']:.4f}" if "val/acc" in metrics else "val not evaluated")  # fmt: skip
    if "val_ema/acc" in metrics:
        val_text += f" (EMA acc {metrics['val_ema/acc']:.4f})"
    log.info("epoch %d: train loss %.4f acc %.4f | %s | %.0f img/s", metrics["epoch"], metrics["train/loss"],
             metrics["train/acc"], val_text, metrics["perf/samples_per_s"])  # fmt: skip


def as_saved(metrics: dict[str, float]) -> dict[str, float]:
    """The epoch's metrics with the EMA's val_ema/* scores as val/*: the summary of a model saved as the EMA."""
    return metrics | {f"val/{k.removeprefix('val_ema/')}": v for k, v in metrics.items() if k.startswith("val_ema/")}


class StepOutput(NamedTuple):
    loss: torch.Tensor
    logits: torch.Tensor
    lr: float
    """The learning rate this step used."""


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    cfg: RunConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    weights: torch.Tensor | None,
    trainable: list[nn.Parameter],
    bf16: bool,
    generator: torch.Generator,
    ema_params: list[nn.Parameter] | None = None,
    teacher: Teacher | None = None,
) -> StepOutput:
    """One optimizer step on a uint8 batch already on the device: augment (and mix), forward, loss (with the
    ``teacher``'s term on the same input when distilling), backward, clip, step, then the EMA of the weights
    (``ema_params``, averaging ``trainable``)."""
    inputs, targets = augment_batch(images, labels, cfg.augment, image_size=cfg.model.image_size,
                                    num_classes=len(FER_CLASSES), generator=generator)  # fmt: skip
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(inputs)
        teacher_logits = teacher(inputs) if teacher is not None else None
    loss = classification_loss(logits.float(), targets, weights=weights, label_smoothing=cfg.optim.label_smoothing)
    if teacher_logits is not None:
        loss = combined_loss(loss, distillation_loss(logits, teacher_logits, cfg.distill), weight=cfg.distill.weight)
    lr = optimizer_step(loss, optimizer=optimizer, scheduler=scheduler, trainable=trainable,
                        grad_clip=cfg.optim.grad_clip)  # fmt: skip
    if ema_params is not None:
        update_ema(ema_params, trainable, decay=cfg.optim.ema_decay or 0.0)
    return StepOutput(loss, logits, lr)


def optimizer_step(
    loss: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainable: list[nn.Parameter],
    grad_clip: float,
) -> float:
    """Backward, clip, step, schedule; returns the learning rate this step used."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    optimizer.step()
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return lr


def validate(
    raw_model: FerClassifier,
    ema: FerClassifier | None,
    dataset: ShardedDataset,
    cfg: RunConfig,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
) -> tuple[dict[str, float], dict[str, list[list[int]]]]:
    """The epoch's val/* metrics (and val_ema/* of the weights' EMA), and each one's confusion matrix by prefix."""
    metrics: dict[str, float] = {}
    confusions: dict[str, list[list[int]]] = {}
    for prefix, weights in (("val/", raw_model), ("val_ema/", ema)):
        if weights is not None:
            val = evaluate(weights, dataset, cfg, split="val", rank=rank, world_size=world_size, device=device)
            confusions[prefix] = val.pop("confusion")
            metrics |= {f"{prefix}{k}": v for k, v in val.items()}
    return metrics, confusions


@torch.no_grad()
def evaluate(
    raw_model: FerClassifier,
    dataset: ShardedDataset,
    cfg: RunConfig,
    *,
    split: str,
    rank: int,
    world_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """Loss, accuracy, macro-F1, sample count and confusion matrix (``confusion``, rows = true class) on ``split``,
    each sample counted once across all ranks (confusions summed)."""
    loader = build_loader(
        dataset, split, cfg.data, batch_size=cfg.loop.batch_per_worker(world_size), rank=rank,
        world_size=world_size, training=False,
    )  # fmt: skip
    bf16 = cfg.loop.autocast_bf16(device.type)
    was_training = raw_model.training
    raw_model.eval()
    classes = len(FER_CLASSES)
    confusion = torch.zeros(classes * classes, dtype=torch.float64, device=device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    for batch in loader:
        labels = batch["label"].to(device)
        inputs = eval_transform(batch["image"].to(device), image_size=cfg.model.image_size, crop=cfg.model.eval_crop)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = raw_model(inputs).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        confusion.index_add_(0, labels * classes + logits.argmax(1), torch.ones_like(labels, dtype=torch.float64))
    raw_model.train(was_training)
    summed = all_reduce_sum(torch.cat([confusion, loss_sum]), world_size=world_size).cpu().numpy()
    matrix = summed[:-1].reshape(classes, classes).round().astype(np.int64)
    seen = int(matrix.sum())
    expected = dataset.manifest.split(split).samples
    if seen != expected:
        raise FerdistError(f"evaluation on '{split}' saw {seen} samples, the manifest lists {expected}")
    report = report_from_confusion(matrix)
    return {"loss": float(summed[-1]) / seen, "acc": report.accuracy, "macro_f1": report.macro_f1, "samples": seen,
            "confusion": matrix.tolist()}  # fmt: skip


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, weights: torch.Tensor | None, label_smoothing: float
) -> torch.Tensor:
    """Label-smoothed cross-entropy, each sample weighted by its true class's weight (weighted mean). ``labels``:
    class indices ``[B]``, or class probabilities ``[B, K]`` (a mixed batch: `ferdist.data.mixing`), smoothed as
    ``(1 − s) · p + s / K``, the same as mixing smoothed one-hot labels; a mixed sample's weight is the same mix of
    its classes' weights (``p · weights``).

    Not ``F.cross_entropy(weight=..., label_smoothing=...)``: PyTorch also weights every class's term of the smoothing
    part, which pulls an unsure model toward the rarest class. With inverse-frequency weights on FER2013 an untrained
    model then answers Disgust (1.5 % of faces) for everything: 5-11 % accuracy in a real sweep, below chance. Here
    the weight multiplies the whole smoothed loss of a sample, so the uninformed optimum stays the uniform guess.
    Without smoothing the two agree exactly.
    """
    if weights is None:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    per_sample = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    w = weights[labels] if labels.ndim == 1 else labels @ weights
    return (per_sample * w).sum() / w.sum()


def class_weights(counts: list[int], mode: str, *, device: torch.device) -> torch.Tensor | None:
    """Cross-entropy class weights: None, or N / (K · n_c) (1 for a balanced split; 0 for an absent class)."""
    if mode == "none":
        return None
    n = torch.tensor(counts, dtype=torch.float32)
    weights = torch.where(n > 0, n.sum() / (len(counts) * n.clamp(min=1)), torch.zeros_like(n))
    return weights.to(device)


def check_finite(loss: torch.Tensor, *, epoch: int, step: int) -> None:
    if not math.isfinite(loss.item()):
        raise FerdistError(
            f"the training loss became {loss.item()} at epoch {epoch + 1} step {step + 1}; lower optim.lr, keep "
            "optim.grad_clip on, or use loop.precision=fp32"
        )


def mixed_seed(*parts: int) -> int:
    """A 63-bit seed mixed from ``parts`` (so epochs and ranks get unrelated streams)."""
    # Shifted as a Python int: numpy 1.26 has no uint64 >> int.
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0]) >> 1
