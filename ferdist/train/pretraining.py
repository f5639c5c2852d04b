"""The per-worker MAE pretraining loop: Ray Train runs `pretrain_fn_per_worker` on every worker.

The fine-tuning loop's shape and pieces (`ferdist.train.loop`): the same `Session` (Ray or local), shard loader,
on-device
crop and flip, AdamW with warmup and cosine, resume state and tracker. Order: build → restore → for each epoch:
train steps (mask, forward, backward, clip, step, schedule) → picture → resume state + report. There is no
evaluation split: pretraining never reads val or test (`ferdist.config.PretrainDataConfig`), so the loss reported
is the training loss over the epoch's masks.

Determinism: initialisation, data order, augmentation and masks are seeded from (seed, epoch, rank), and resume
states are taken at epoch ends, so a run resumed from epoch k continues exactly as if it had never stopped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import ViTMAEForPreTraining

from ferdist.config import PretrainConfig, from_flat_dict, to_yaml
from ferdist.data.loader import Selection, build_loader, open_pretraining_data, steps_per_epoch
from ferdist.data.transforms import to_model_input, train_transform
from ferdist.train import checkpoint as ckpt
from ferdist.train.dist import all_reduce_sum
from ferdist.train.loop import RaySession, Session, check_finite, mixed_seed, on_device, optimizer_step, tracked
from ferdist.train.mae import build_pretraining_model, interpolates, mask_noise, num_patches, reconstruction_picture
from ferdist.train.optim import build_optimizer, make_schedule
from ferdist.train.tracker import Tracker, TrackerFactory, untracked

log = logging.getLogger(__name__)

PICTURE_FACES = 8
"""Faces in each reconstruction picture: the first of the split, the same ones every time."""


def pretrain_fn_per_worker(config: dict[str, Any], *, make_tracker: TrackerFactory) -> None:
    """Ray Train's entry point: ``config`` is `ferdist.config.to_flat_dict` of the run's `PretrainConfig`."""
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ferdist").setLevel(logging.INFO)
    run_pretraining(from_flat_dict(config, origin="train_loop_config", root=PretrainConfig), RaySession(),
                    make_tracker=make_tracker)


def run_pretraining(
    cfg: PretrainConfig, session: Session, *, make_tracker: TrackerFactory = untracked
) -> ckpt.TrainState:
    """Pretrains ``cfg.loop.epochs`` epochs (continuing from the session's latest checkpoint); returns the progress.
    The run is tracked (rank 0 only) and marked FINISHED or FAILED when it ends."""
    return tracked(pretrain, cfg, session, make_tracker=make_tracker)


def pretrain(cfg: PretrainConfig, session: Session, *, tracker: Tracker) -> ckpt.TrainState:
    """The pretraining loop: build → restore → per epoch: train steps, picture, resume state, report."""
    rank, world_size, device = session.rank, session.world_size, session.device
    data = open_pretraining_data(cfg.data.manifest, cfg.data.extra, endpoint_url=cfg.data.endpoint_url,
                                 outage_s=cfg.checkpoint.outage_s)  # fmt: skip
    tracker.log_datasets(data.datasets, context="pretraining")
    size = cfg.model.image_size
    batch_size = cfg.loop.batch_per_worker(world_size)
    steps = steps_per_epoch(data.samples, batch_size=batch_size, world_size=world_size)
    schedule = make_schedule(cfg.optim, steps_per_epoch=steps, epochs=cfg.loop.epochs)
    bf16 = cfg.loop.autocast_bf16(device.type)

    raw_model = build_pretraining_model(cfg.model, seed=cfg.seed, endpoint_url=cfg.data.endpoint_url).to(device)
    optimizer, scheduler = build_optimizer(raw_model, cfg.optim, schedule=schedule)
    state = ckpt.TrainState()
    if (restore_dir := session.latest_checkpoint()) is not None:
        state = restore(restore_dir, raw_model=raw_model, optimizer=optimizer, scheduler=scheduler)
        state.resumed_at.append(state.epochs_done)
        log.info("resumed from the checkpoint after epoch %d", state.epochs_done)
    model = session.prepare_model(raw_model)
    if cfg.loop.compile != "off":
        model = torch.compile(model, mode=cfg.loop.compile)
    interpolate, patches = interpolates(raw_model, size), num_patches(raw_model, size)
    trainable = [p for p in raw_model.parameters() if p.requires_grad]
    faces = picture_faces(data, cfg) if rank == 0 and cfg.model.pictures_every else None
    if rank == 0:
        encoder = sum(p.numel() for p in raw_model.vit.parameters()) / 1e6
        log.info(
            "%d workers x %d = global batch %d, %d steps/epoch, peak lr %g, mask %.2f of %d patches, %s, "
            "encoder %.2fM + decoder %.2fM parameters", world_size, batch_size, batch_size * world_size, steps,
            cfg.optim.lr, cfg.model.mask_ratio, patches, "bf16" if bf16 else "fp32", encoder,
            sum(p.numel() for p in raw_model.decoder.parameters()) / 1e6,
        )  # fmt: skip

    for epoch in range(state.epochs_done, cfg.loop.epochs):
        torch.manual_seed(mixed_seed(cfg.seed, epoch, rank))  # dropout, if a checkpoint's config has any
        augment_rng = torch.Generator().manual_seed(mixed_seed(cfg.seed, epoch, rank, 1))
        mask_rng = torch.Generator().manual_seed(mixed_seed(cfg.seed, epoch, rank, 2))
        loader = build_loader(
            data, None, cfg.data, batch_size=batch_size, rank=rank, world_size=world_size, epoch=epoch,
            seed=cfg.seed, training=True, pin_memory=device.type == "cuda",
        )  # fmt: skip  # [ray] each rank reads its own shards
        model.train()
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, seen
        started = time.perf_counter()
        for step, (images, _labels) in enumerate(on_device(loader, device)):  # labels unused: MAE is self-supervised
            inputs = train_transform(images, cfg.augment, image_size=size, generator=augment_rng)
            noise = mask_noise(len(images), patches, generator=mask_rng).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(pixel_values=inputs, noise=noise, interpolate_pos_encoding=interpolate).loss.float()
            lr = optimizer_step(loss, optimizer=optimizer, scheduler=scheduler, trainable=trainable,
                                grad_clip=cfg.optim.grad_clip)  # fmt: skip
            totals += torch.stack([loss.detach().double() * len(images), totals.new_tensor(len(images))])
            if (step + 1) % cfg.loop.log_every == 0 or step + 1 == steps:
                check_finite(loss, epoch=epoch, step=step)
                if rank == 0:
                    log.info("epoch %d step %d/%d loss %.4f lr %.3g", epoch + 1, step + 1, steps, loss.item(), lr)
        loss_sum, seen = all_reduce_sum(totals, world_size=world_size).tolist()
        epoch_seconds = time.perf_counter() - started
        metrics = {
            "epoch": epoch + 1,
            "step": (epoch + 1) * steps,
            "train/loss": loss_sum / seen,
            "train/lr": lr,
            "perf/samples_per_s": seen / epoch_seconds,
            "perf/epoch_s": epoch_seconds,
        }
        state.history.append(metrics)
        state.epochs_done = epoch + 1
        last = epoch + 1 == cfg.loop.epochs
        if rank == 0:
            log.info("epoch %d: reconstruction loss %.4f | %.0f img/s", epoch + 1, metrics["train/loss"],
                     metrics["perf/samples_per_s"])  # fmt: skip
            every = cfg.model.pictures_every
            if faces is not None and ((epoch + 1) % every == 0 or last):
                picture = reconstruction_picture(raw_model, faces.to(device), noise=picture_noise(faces, patches),
                                                 interpolate=interpolate)  # fmt: skip
                tracker.log_image(picture, f"reconstructions/epoch_{epoch + 1:04d}.png")
        resume = None
        if rank == 0 and ((epoch + 1) % cfg.checkpoint.every_epochs == 0 or last):
            resume = take_resume(raw_model, cfg=cfg, state=state, optimizer=optimizer, scheduler=scheduler)
        tracker.log_metrics(metrics, step=epoch + 1)
        tracker.flush()  # the epoch is in MLflow before the report, after which Tune may stop the trial
        session.report(dict(metrics), resume, mode=cfg.checkpoint.write)  # [ray] report (+ resume state)
    session.finish()
    return state


def picture_faces(data: Selection, cfg: PretrainConfig) -> torch.Tensor:
    """The first `PICTURE_FACES` faces of the pretraining data as model input (no augmentation): the same faces in
    every picture of the run, so the pictures show the model learning, not new faces."""
    loader = build_loader(data, None, cfg.data, batch_size=PICTURE_FACES, training=False)
    first = next(iter(loader))["image"][:PICTURE_FACES]
    return to_model_input(first, image_size=cfg.model.image_size)


def picture_noise(faces: torch.Tensor, patches: int) -> torch.Tensor:
    """The same masks in every picture of a run."""
    return mask_noise(len(faces), patches, generator=torch.Generator().manual_seed(0)).to(faces.device)


# --------------------------------------------------------------------------- resume state


def take_resume(
    raw_model: ViTMAEForPreTraining,
    *,
    cfg: PretrainConfig,
    state: ckpt.TrainState,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> ckpt.Snapshot:
    """Every weight (encoder and decoder), optimizer, scheduler and progress after the epoch just finished, copied
    to the CPU; written by the session while the next epoch trains."""
    summary = ckpt.epoch_summary(state)
    return ckpt.Snapshot(
        epoch=state.epochs_done, weights=ckpt.to_cpu(raw_model.state_dict()), summary=summary,
        backbone=raw_model.config.to_dict(), config_yaml=to_yaml(cfg),
        train_state=ckpt.optimizer_state(state, optimizer, scheduler, summary=summary, pretrained=cfg.model.pretrained),
    )  # fmt: skip


def restore(
    directory: Path,
    *,
    raw_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> ckpt.TrainState:
    """Loads the weights, optimizer and scheduler of resume state ``directory``; returns the progress."""
    saved = torch.load(directory / ckpt.STATE_FILE, map_location="cpu", weights_only=True)
    raw_model.load_state_dict(torch.load(directory / ckpt.TRAINED_FILE, map_location="cpu", weights_only=True))
    return ckpt.restore_progress(saved, optimizer, scheduler)
