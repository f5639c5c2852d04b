"""The per-worker training loop: Ray Train runs `train_fn_per_worker` on every worker.

Order: build → restore → for each epoch: train steps (forward, backward, clip, step, schedule) → evaluate →
checkpoint + report. The framework surface is a `Session` (rank, device, DDP wrapping, checkpoint in/out):
`RaySession` inside Ray Train, `LocalSession` for one process without Ray (tests, the no-Ray benchmark baseline).

Determinism: model init, data order, augmentation and dropout are seeded from (seed, epoch, rank), and checkpoints
are taken at epoch ends, so a run resumed from epoch k's checkpoint continues exactly as if it was never stopped.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ferdist import checkpoint as ckpt
from ferdist.config import RunConfig, from_flat_dict, redacted, to_flat_dict
from ferdist.constants import FER_CLASSES
from ferdist.data import ShardedDataset, build_loader, open_dataset, steps_per_epoch
from ferdist.dist import all_reduce_sum
from ferdist.errors import FerdistError
from ferdist.metrics import report_from_confusion
from ferdist.model import FerClassifier, build_model
from ferdist.optim import build_optimizer, make_schedule
from ferdist.tracking import Tracker, make_tracker
from ferdist.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)


class Session(Protocol):
    """What the loop needs from the framework that runs it."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module: ...
    def latest_checkpoint(self) -> Path | None: ...
    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None: ...


class RaySession:
    """Ray Train's view of this worker: DDP via prepare_model, checkpoints persisted to the run's storage_path."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()  # [ray] rank and world size, read here only
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()  # [ray] this worker's GPU, or the CPU
        self._checkpoint = ray.train.get_checkpoint()  # [ray] the latest checkpoint after a restart, else None
        self._checkpoint_dir: Path | None = None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # [ray] move to device, wrap in DDP when world_size > 1

    def latest_checkpoint(self) -> Path | None:
        if self._checkpoint is None:
            return None
        self._checkpoint_dir = Path(tempfile.mkdtemp(prefix="ferdist-restore-"))
        return Path(self._checkpoint.to_directory(str(self._checkpoint_dir)))  # [ray] fetched from storage_path

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        import ray.train

        if self._checkpoint_dir is not None:  # the restored copy is loaded by now
            shutil.rmtree(self._checkpoint_dir, ignore_errors=True)
            self._checkpoint_dir = None
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)  # [ray] every rank calls it: it is a barrier


@dataclass
class LocalSession:
    """One process, no Ray: checkpoints are copied to ``root/epoch_NNNN``, the newest ``keep`` kept."""

    root: Path
    device: torch.device = torch.device("cpu")
    keep: int = 2
    rank: int = 0
    world_size: int = 1

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.root.glob("epoch_*"))
        return found[-1] if found else None

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None:
            target = self.root / f"epoch_{int(metrics['epoch']):04d}"
            shutil.copytree(checkpoint_dir, target.with_suffix(".part"), dirs_exist_ok=True)
            target.with_suffix(".part").rename(target)
            for old in sorted(self.root.glob("epoch_*"))[: -self.keep]:
                shutil.rmtree(old)


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point: ``config`` is `ferdist.config.to_flat_dict` of the run's `RunConfig`."""
    # Ray Train logs every report at INFO with all its metrics; keep the worker's own one-line epoch summaries.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ferdist").setLevel(logging.INFO)
    run_training(from_flat_dict(config, origin="train_loop_config"), RaySession())


def run_training(cfg: RunConfig, session: Session) -> ckpt.TrainState:
    """Trains ``cfg.loop.epochs`` epochs (continuing from the session's latest checkpoint); returns the progress.

    The run is tracked (rank 0 only) and marked FINISHED or FAILED in the tracker when it ends.
    """
    tracker = make_tracker(cfg.tracking, rank=session.rank, run_name=cfg.name, params=redacted(to_flat_dict(cfg)))
    try:
        state = train(cfg, session, tracker=tracker)
    except BaseException:
        tracker.close(status="FAILED")
        raise
    tracker.close(status="FINISHED")
    return state


def train(cfg: RunConfig, session: Session, *, tracker: Tracker) -> ckpt.TrainState:
    """The training loop: build → restore → per epoch: train steps, evaluate, checkpoint, report."""
    rank, world_size, device = session.rank, session.world_size, session.device
    dataset = open_dataset(cfg.data.manifest, endpoint_url=cfg.data.endpoint_url)
    batch_size = cfg.loop.batch_per_worker(world_size)
    train_info = dataset.manifest.split("train")
    steps = steps_per_epoch(train_info.samples, batch_size=batch_size, world_size=world_size)
    schedule = make_schedule(cfg.optim, steps_per_epoch=steps, epochs=cfg.loop.epochs)
    bf16 = cfg.loop.autocast_bf16(device.type)

    raw_model = build_model(cfg.model, seed=cfg.seed, endpoint_url=cfg.data.endpoint_url).to(device)
    optimizer, scheduler = build_optimizer(raw_model, cfg.optim, schedule=schedule)
    state = ckpt.TrainState()
    if (restore_dir := session.latest_checkpoint()) is not None:
        state = ckpt.restore(restore_dir, raw_model=raw_model, optimizer=optimizer, scheduler=scheduler)
        state.resumed_at.append(state.epochs_done)
        log.info("resumed from the checkpoint after epoch %d", state.epochs_done)
    model = session.prepare_model(raw_model)
    weights = class_weights(train_info.class_counts, cfg.optim.class_weights, device=device)
    trainable = [p for p in raw_model.parameters() if p.requires_grad]
    if rank == 0:
        log.info(
            "%d workers x %d = global batch %d, %d steps/epoch, peak lr %g, %d warmup steps, %s, %.1fM of %.1fM "
            "parameters trained", world_size, batch_size, batch_size * world_size, steps, cfg.optim.lr,
            schedule.warmup_steps, "bf16" if bf16 else "fp32", sum(p.numel() for p in trainable) / 1e6,
            sum(p.numel() for p in raw_model.parameters()) / 1e6,
        )  # fmt: skip

    for epoch in range(state.epochs_done, cfg.loop.epochs):
        cycle_started = time.perf_counter()
        torch.manual_seed(_seed(cfg.seed, epoch, rank))  # dropout
        augment_rng = torch.Generator().manual_seed(_seed(cfg.seed, epoch, rank, 1))
        loader = build_loader(
            dataset, "train", cfg.data, batch_size=batch_size, rank=rank, world_size=world_size,
            epoch=epoch, seed=cfg.seed, training=True,
        )  # fmt: skip  # [ray] each rank reads its own shards: Ray does not shard IterableDatasets
        model.train()
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, seen
        started = time.perf_counter()
        for step, batch in enumerate(loader):
            labels = batch["label"].to(device, non_blocking=True)
            loss, logits, lr = train_step(
                model, batch["image"].to(device, non_blocking=True), labels, cfg=cfg, optimizer=optimizer,
                scheduler=scheduler, weights=weights, trainable=trainable, bf16=bf16, generator=augment_rng,
            )  # fmt: skip
            seen = totals.new_tensor(len(labels))
            totals += torch.stack([loss.detach().double() * seen, (logits.argmax(1) == labels).sum().double(), seen])
            if (step + 1) % cfg.loop.log_every == 0 or step + 1 == steps:
                # Checking here rather than every step keeps the GPU from syncing on each batch.
                _check_finite(loss, epoch=epoch, step=step)
                if rank == 0:
                    log.info("epoch %d step %d/%d loss %.4f lr %.3g", epoch + 1, step + 1, steps, loss.item(), lr)
        train_loss, train_correct, train_seen = all_reduce_sum(totals, world_size=world_size).tolist()
        epoch_seconds = time.perf_counter() - started

        val = evaluate(raw_model, dataset, cfg, split="val", rank=rank, world_size=world_size, device=device)
        confusion = val.pop("confusion")
        metrics = {
            "epoch": epoch + 1,
            "step": (epoch + 1) * steps,
            "train/loss": train_loss / train_seen,
            "train/acc": train_correct / train_seen,
            "train/lr": lr,
            "perf/samples_per_s": train_seen / epoch_seconds,
            "perf/epoch_s": epoch_seconds,
            **{f"val/{k}": v for k, v in val.items()},
        }
        if device.type == "cuda":  # the epoch's peak (training and evaluation), for sizing batches and GPUs
            metrics["perf/gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        best = max([*state.history, metrics], key=lambda m: m["val/acc"])
        metrics |= {"best/val_acc": best["val/acc"], "best/epoch": best["epoch"]}
        state.history.append(metrics)
        state.epochs_done = epoch + 1
        if rank == 0:
            log.info("epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f macro-F1 %.4f | %.0f img/s",
                     epoch + 1, metrics["train/loss"], metrics["train/acc"], val["loss"], val["acc"], val["macro_f1"],
                     metrics["perf/samples_per_s"])  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="ferdist-ckpt-") as tmp:
            checkpoint_dir = None
            if rank == 0:  # one writer; the weights are identical on every rank
                checkpoint_dir = Path(tmp)
                ckpt.save_checkpoint(
                    checkpoint_dir, raw_model=raw_model, optimizer=optimizer, scheduler=scheduler, state=state,
                    cfg=cfg, confusion=confusion,
                )  # fmt: skip
            tracker.log_metrics(metrics, step=epoch + 1)
            session.report(metrics, checkpoint_dir)  # [ray] report + persist the checkpoint
        # The whole epoch as the job experiences it (train, eval, checkpoint, report); known only after the report,
        # so it reaches the history saved with the next checkpoint.
        metrics["perf/cycle_s"] = time.perf_counter() - cycle_started
    if restore_dir is not None and state.resumed_at[-1] == cfg.loop.epochs and state.history:
        # Restored after its last epoch (e.g. a sweep resumed after its driver died): nothing left to train, but
        # the caller (Tune) still needs the run's final metrics.
        session.report(dict(state.history[-1]), None)
    return state


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
) -> StepOutput:
    """One optimizer step on a uint8 batch already on the device: augment, forward, loss, backward, clip, step."""
    inputs = train_transform(images, cfg.augment, image_size=cfg.model.image_size, generator=generator)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(inputs)
    loss = classification_loss(logits.float(), labels, weights=weights, label_smoothing=cfg.optim.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
    optimizer.step()
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return StepOutput(loss, logits, lr)


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
        inputs = eval_transform(batch["image"].to(device), image_size=cfg.model.image_size)
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
    """Label-smoothed cross-entropy, each sample weighted by its true class's weight (weighted mean).

    Not ``F.cross_entropy(weight=..., label_smoothing=...)``: PyTorch also weights every class's term of the smoothing
    part, which pulls an unsure model toward the rarest class. With inverse-frequency weights on FER2013 an untrained
    model then answers Disgust (1.5 % of faces) for everything: 5-11 % accuracy in a real sweep, below chance. Here
    the weight multiplies the whole smoothed loss of a sample, so the uninformed optimum stays the uniform guess.
    Without smoothing the two agree exactly.
    """
    if weights is None:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    per_sample = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    w = weights[labels]
    return (per_sample * w).sum() / w.sum()


def class_weights(counts: list[int], mode: str, *, device: torch.device) -> torch.Tensor | None:
    """Cross-entropy class weights: None, or N / (K · n_c) (1 for a balanced split; 0 for an absent class)."""
    if mode == "none":
        return None
    n = torch.tensor(counts, dtype=torch.float32)
    weights = torch.where(n > 0, n.sum() / (len(counts) * n.clamp(min=1)), torch.zeros_like(n))
    return weights.to(device)


def _check_finite(loss: torch.Tensor, *, epoch: int, step: int) -> None:
    if not math.isfinite(loss.item()):
        raise FerdistError(
            f"the training loss became {loss.item()} at epoch {epoch + 1} step {step + 1}; lower optim.lr, keep "
            "optim.grad_clip on, or use loop.precision=fp32"
        )


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from ``parts`` (so epochs and ranks get unrelated streams)."""
    # Shifted as a Python int: numpy 1.26 has no uint64 >> int.
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0]) >> 1
