"""Checkpoints: what they hold, when they are taken, and how they are written without stalling the loop.

Two kinds, because at GPU speed an epoch lasts seconds and a ViT-B checkpoint is hundreds of MB:

* **Resume state** (``checkpoint_epoch_NNNN``, registered with Ray Train): the *trained* parameters, the optimizer,
  the LR schedule and the progress (``train_state.pt``), every ``checkpoint.every_epochs`` epochs and after the last;
  Ray keeps the newest. It is slim: frozen weights never change, so they are rebuilt from ``model.pretrained`` on
  restore and checked against the sha256 kept here (a changed source is one sentence, never a silent mix).
* **The model** (``model_epoch_NNNN``, written by ferdist beside Ray's folders): every weight, the backbone's
  architecture and the run config, self-contained for evaluate.py, predict.py and the registry, written whenever
  ``checkpoint.select_by`` improves, so the best epoch is kept even between resume points; the best ``keep`` stay.

Both carry ``summary.json`` (epoch, metrics, val confusion, history), written *last*: a folder without one is an
interrupted write and is ignored. Writing is asynchronous (`CheckpointManager`): the loop only copies the state off
the device; serialising and persisting happen while the next epoch trains. Checkpoints are taken at epoch ends, and
data order and augmentation are functions of (seed, epoch, rank), so resuming from epoch k is exact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ferdist.config import CheckpointConfig, RunConfig, load_config, to_yaml
from ferdist.constants import FER_CLASSES
from ferdist.errors import FerdistError
from ferdist.train import runs
from ferdist.train.runs import MODEL_PREFIX, RESUME_PREFIX, SUMMARY_FILE

if TYPE_CHECKING:
    import pyarrow.fs

    from ferdist.train.model import FerClassifier

log = logging.getLogger(__name__)

MODEL_FILE, STATE_FILE, BACKBONE_FILE, CONFIG_FILE = "model.pt", "train_state.pt", "backbone.json", "config.yaml"
TRAINED_FILE = "trained.pt"
SAFE_MODEL_FILE = "model.safetensors"
"""Every weight of a bundled model (`ferdist.serve.bundled`): safetensors, which loading cannot run code from."""


@dataclass
class TrainState:
    """Progress that a resumed run continues from."""

    epochs_done: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    """The metrics reported after each epoch, in order."""
    resumed_at: list[int] = field(default_factory=list)
    """Epochs at which the run restarted from a checkpoint (after a failure or a re-submission)."""


# --------------------------------------------------------------------------- what is in a checkpoint


def frozen_sha256(model: FerClassifier) -> str:
    """sha256 over the names and bytes of every parameter and buffer that is not trained (sorted by name)."""
    digest = hashlib.sha256()
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    for name, tensor in sorted(model.state_dict().items()):
        if name not in trained:
            digest.update(name.encode() + b"\0" + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """One epoch's checkpoint contents, copied off the device: training goes on while this is written."""

    epoch: int
    weights: dict[str, torch.Tensor]
    """Every weight (a model checkpoint) or only the trained ones (resume state)."""
    summary: dict[str, Any]
    backbone: dict[str, Any]
    config_yaml: str
    train_state: dict[str, Any] | None = None
    """Optimizer, scheduler, progress and the frozen weights' sha256: resume state only."""


def to_cpu(value: Any) -> Any:
    """A deep copy of tensors (in dicts and lists) on the CPU, so later in-place updates cannot reach it."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def frozen_state(raw_model: FerClassifier) -> dict[str, torch.Tensor]:
    """CPU copies of the weights that are not trained: taken once, shared by every model snapshot of the run."""
    trained = {name for name, p in raw_model.named_parameters() if p.requires_grad}
    return {k: v.detach().to("cpu", copy=True) for k, v in raw_model.state_dict().items() if k not in trained}


def take_snapshot(
    raw_model: FerClassifier,
    *,
    cfg: RunConfig,
    state: TrainState,
    confusion: list[list[int]],
    resume: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, str] | None = None,
    frozen: dict[str, torch.Tensor] | None = None,
    reuse: Snapshot | None = None,
    ema: FerClassifier | None = None,
    metrics: dict[str, float] | None = None,
) -> Snapshot:
    """The model checkpoint (``resume=None``: every weight) or the resume state (``resume=(optimizer, scheduler,
    frozen sha256)``: trained weights only, and ``ema``'s average of them) of the epoch just finished, on the CPU.

    Only what changes is copied off the device: ``frozen`` (from `frozen_state`) supplies the frozen weights, and
    ``reuse``, a snapshot of the same epoch, its copies of the trained ones. ``metrics`` replaces the epoch's in the
    summary (the scores of the weights saved, when they are the EMA's).
    """
    trained = {name for name, p in raw_model.named_parameters() if p.requires_grad}
    if reuse is not None and reuse.epoch == state.epochs_done and trained <= set(reuse.weights):
        trained_now = {k: reuse.weights[k] for k in trained}
    else:
        trained_now = to_cpu({k: v for k, v in raw_model.state_dict().items() if k in trained})
    # The class order travels with the model: a teacher or a bundle is checked against it (FER_CLASSES if absent).
    summary = epoch_summary(state, classes=list(FER_CLASSES), confusion=confusion)
    if metrics is not None:
        summary["metrics"] = dict(metrics)
    common = dict(epoch=state.epochs_done, summary=summary, backbone=raw_model.backbone.config.to_dict(),
                  config_yaml=to_yaml(cfg))  # fmt: skip
    if resume is None:
        everything = raw_model.state_dict()
        kept = frozen if frozen is not None and set(frozen) | trained == set(everything) else None
        weights = {k: trained_now[k] if k in trained else (kept[k] if kept else v.detach().to("cpu", copy=True))
                   for k, v in everything.items()}  # fmt: skip
        return Snapshot(weights=weights, **common)
    optimizer, scheduler, frozen_digest = resume
    # The EMA differs from the pretrained weights only where training happened: the same slim set.
    extra = {} if ema is None else {"ema": to_cpu({k: v for k, v in ema.state_dict().items() if k in trained})}
    train_state = optimizer_state(state, optimizer, scheduler, summary=summary, pretrained=cfg.model.pretrained,
                                  frozen_sha256=frozen_digest, **extra)  # fmt: skip
    return Snapshot(weights=trained_now, train_state=train_state, **common)


def epoch_summary(state: TrainState, **extra: Any) -> dict[str, Any]:
    """``summary.json`` of the epoch just finished: its metrics, ``extra`` and the history so far.

    Copies: the loop adds timings to the latest metrics while the writer thread serialises these.
    """
    return {"epoch": state.epochs_done, "metrics": dict(state.history[-1]), **extra,
            "history": [dict(h) for h in state.history]}  # fmt: skip


def optimizer_state(
    state: TrainState,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    summary: dict[str, Any],
    pretrained: str,
    **extra: Any,
) -> dict[str, Any]:
    """What resume state holds beside the weights: optimizer and scheduler (on the CPU), progress (the history of
    ``summary``, from `epoch_summary`), the start ``pretrained`` and ``extra``. `restore_progress` reads it back."""
    return {"optimizer": to_cpu(optimizer.state_dict()), "scheduler": scheduler.state_dict(),
            "epochs_done": state.epochs_done, "history": summary["history"], "resumed_at": list(state.resumed_at),
            "pretrained": pretrained, **extra}  # fmt: skip


def restore_progress(
    saved: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> TrainState:
    """Loads the optimizer and scheduler of `optimizer_state`'s ``saved`` dict; returns the progress."""
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return _progress(saved)


def write_snapshot(snapshot: Snapshot, directory: Path) -> None:
    """Writes a snapshot's files into the local folder ``directory``, ``summary.json`` last."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(snapshot.weights, directory / (MODEL_FILE if snapshot.train_state is None else TRAINED_FILE))
    if snapshot.train_state is not None:
        torch.save(snapshot.train_state, directory / STATE_FILE)
    (directory / BACKBONE_FILE).write_text(json.dumps(snapshot.backbone, indent=1, sort_keys=True))
    (directory / CONFIG_FILE).write_text(snapshot.config_yaml)
    (directory / SUMMARY_FILE).write_text(json.dumps(snapshot.summary, indent=1))


def restore(
    directory: Path,
    *,
    raw_model: FerClassifier,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    pretrained: str,
    ema: FerClassifier | None = None,
) -> TrainState:
    """Loads trained weights, optimizer and scheduler (and the weights' average into ``ema``, a copy of the freshly
    built model) from resume state ``directory`` into a model freshly built from ``pretrained``; returns the progress
    to continue from.

    Raises:
        FerdistError: the frozen weights ``pretrained`` gives differ from the ones the run trained with, or ``ema`` is
            given and the run kept none.
    """
    saved = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    if ema is not None:
        if "ema" not in saved:
            raise FerdistError(f"the checkpoint in {directory} holds no EMA of the weights (the run had no "
                               "optim.ema_decay); resume without it, or start a new run with --set name=…")  # fmt: skip
        ema.load_state_dict(saved["ema"], strict=False)
    if (directory / MODEL_FILE).exists():  # a checkpoint from before slim resume states: every weight is there
        raw_model.load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True))
    else:
        _load_trained(raw_model, directory, expected=saved["frozen_sha256"], source=pretrained)
    return restore_progress(saved, optimizer, scheduler)


def _load_trained(raw_model: FerClassifier, directory: Path, *, expected: str, source: str) -> None:
    if frozen_sha256(raw_model) != expected:
        raise FerdistError(
            f"the frozen weights of model.pretrained={source} differ from the ones the checkpoint in {directory} was "
            "trained with (the source changed, or another one is given); resume with the same weights, or start a "
            "new run with --set name=…"
        )
    trained = torch.load(directory / TRAINED_FILE, map_location="cpu", weights_only=True)
    missing = {n for n, p in raw_model.named_parameters() if p.requires_grad} - set(trained)
    if missing:
        raise FerdistError(f"{directory} lacks {len(missing)} trained weights (e.g. {sorted(missing)[0]}); "
                           "model.freeze_blocks differs from the run's")  # fmt: skip
    raw_model.load_state_dict(trained, strict=False)


def read_history(directory: Path) -> TrainState:
    """The progress recorded in a resume checkpoint, without loading any weights into a model."""
    return _progress(torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True))


def _progress(saved: dict[str, Any]) -> TrainState:
    return TrainState(epochs_done=saved["epochs_done"], history=saved["history"], resumed_at=saved["resumed_at"])


def load_classifier(directory: Path, *, map_location: str | torch.device = "cpu") -> tuple[FerClassifier, RunConfig]:
    """The trained classifier (in eval mode) and its run config, from a model checkpoint alone (``model.pt``, or a
    bundle's ``model.safetensors``), or from resume state and the pretrained source it names."""
    from ferdist.train.model import build_model, build_model_from_config  # here: drivers reading summaries skip this

    cfg = load_config(directory / CONFIG_FILE)
    if (directory / MODEL_FILE).exists():
        model = build_model_from_config(json.loads((directory / BACKBONE_FILE).read_text()), cfg.model)
        model.load_state_dict(torch.load(directory / MODEL_FILE, map_location=map_location, weights_only=True))
    elif (directory / SAFE_MODEL_FILE).exists():
        from safetensors.torch import load_file

        model = build_model_from_config(json.loads((directory / BACKBONE_FILE).read_text()), cfg.model)
        model.load_state_dict(load_file(str(directory / SAFE_MODEL_FILE), device=str(torch.device(map_location))))
    else:
        saved = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        model = build_model(cfg.model, seed=cfg.seed, endpoint_url=cfg.data.endpoint_url)
        _load_trained(model, directory, expected=saved["frozen_sha256"], source=cfg.model.pretrained)
    return model.eval(), cfg


# --------------------------------------------------------------------------- when, and where


@dataclass(frozen=True)
class ModelStore:
    """Where model checkpoints go: a folder on a pyarrow filesystem (the run folder, local or S3)."""

    filesystem: pyarrow.fs.FileSystem
    root: str


def better(a: dict[str, float], b: dict[str, float] | None, select_by: str) -> bool:
    """Whether epoch metrics ``a`` beat ``b`` on ``select_by`` (strictly: the earlier epoch wins a tie)."""
    return b is None or a[select_by] > b[select_by]


class CheckpointManager:
    """The checkpoint policy, called once per epoch from the loop: what to take, and writing it in the background.

    Model checkpoints are persisted here (one writer thread on rank 0); resume state is handed to the session, which
    persists it through Ray (asynchronously, see `ferdist.train.loop.RaySession`). A write that failed is raised, as one
    sentence, at the next epoch end or at `finish`; the latest committed checkpoint is never touched by it.
    """

    def __init__(self, cfg: CheckpointConfig, *, epochs: int, eval_every: int, store: ModelStore | None,
                 history: list[dict[str, float]]) -> None:  # fmt: skip
        self.cfg, self.epochs, self.eval_every, self.store = cfg, epochs, eval_every, store
        key = cfg.score_key  # select_by, or its val_ema/ twin when the EMA is what is kept
        self.best = max((h for h in history if key in h), key=lambda h: h[key], default=None)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ferdist-ckpt") if store else None
        self._pending: Future[None] | None = None
        """The newest model write."""
        self._queued: Future[None] | None = None
        """A model write waiting behind a running one (cancelled if a newer best arrives first)."""
        self._errors: list[BaseException] = []
        self.blocked_s = 0.0
        """Seconds the loop spent in this manager (copies off the device, waits for a writer behind)."""

    def evaluates(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) ends with a val evaluation."""
        return (epoch + 1) % self.eval_every == 0 or epoch + 1 == self.epochs

    def resumes(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) ends with a resume checkpoint."""
        return (epoch + 1) % self.cfg.every_epochs == 0 or epoch + 1 == self.epochs

    def improves(self, metrics: dict[str, float]) -> bool:
        return self.cfg.score_key in metrics and better(metrics, self.best, self.cfg.score_key)

    def save_model(self, take: Callable[[], Snapshot]) -> Snapshot:
        """Records the new best and writes its model checkpoint (``take()`` copies it off the device).

        The loop never waits for a writer that is behind (slow storage, a new best every epoch): a newer best
        replaces a write that has not started yet, since it supersedes that model anyway.
        """
        started = time.perf_counter()
        if self._queued is not None and self._queued.cancel():
            self._queued = None  # superseded before it started
        self.raise_if_failed(wait=self.cfg.write == "sync")
        snapshot = take()
        self.best = snapshot.summary["metrics"]
        if self.store is not None and self._pool is not None:
            future = self._pool.submit(self._persist_model, snapshot)
            self._queued = future if self._pending is not None and not self._pending.done() else None
            self._pending = future
            if self.cfg.write == "sync":
                self.raise_if_failed(wait=True)
        self.blocked_s += time.perf_counter() - started
        return snapshot

    def raise_if_failed(self, *, wait: bool) -> None:
        """Raises a model write's failure; with ``wait``, first waits for the newest write (all before it end first)."""
        if wait and self._pending is not None:
            started = time.perf_counter()
            with contextlib.suppress(BaseException):
                self._pending.result()
            self.blocked_s += time.perf_counter() - started
        if self._pending is not None and self._pending.done():
            self._pending = self._queued = None
        if self._errors:
            raise self._errors.pop(0)

    def finish(self) -> None:
        """Waits for the last model write (a run never reports done before it is committed) and stops the writer."""
        try:
            self.raise_if_failed(wait=True)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _persist_model(self, snapshot: Snapshot) -> None:
        assert self.store is not None
        name = f"{MODEL_PREFIX}{snapshot.epoch:04d}"
        from ferdist.outage import budget_of, retried

        store = self.store
        try:
            # The whole folder again if a write is cut (see ferdist.outage: only opening a file is retried below).
            retried(lambda: persist(snapshot, store.filesystem, f"{store.root}/{name}"),
                    budget_s=budget_of(store.filesystem), what=f"writing the best model of epoch {snapshot.epoch}")
            prune_models(store, keep=self.cfg.keep, select_by=self.cfg.select_by)
        except FerdistError as exn:  # the store stayed away past checkpoint.outage_s
            self._errors.append(exn)
        except OSError as exn:
            # Kept for the loop's thread: raised there, at the next epoch end, as one sentence.
            self._errors.append(FerdistError(
                f"could not write the best model (epoch {snapshot.epoch}) to {self.store.root}/{name} ({exn}); "
                "the checkpoints written before it are intact: fix the storage and re-submit to resume"
            ))  # fmt: skip


def persist(snapshot: Snapshot, filesystem: pyarrow.fs.FileSystem, path: str) -> None:
    """Writes ``snapshot`` to folder ``path`` on ``filesystem``; ``summary.json`` goes last, so a folder without one
    is an interrupted write (readers skip it)."""
    import pyarrow.fs

    with tempfile.TemporaryDirectory(prefix="ferdist-ckpt-") as tmp:
        local = Path(tmp) / "c"
        write_snapshot(snapshot, local)
        summary = (local / SUMMARY_FILE).read_bytes()
        (local / SUMMARY_FILE).unlink()
        filesystem.create_dir(path, recursive=True)
        pyarrow.fs.copy_files(str(local), path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=filesystem)  # fmt: skip
        with filesystem.open_output_stream(f"{path}/{SUMMARY_FILE}") as out:
            out.write(summary)


def prune_models(store: ModelStore, *, keep: int, select_by: str) -> None:
    """Deletes model checkpoints beyond the ``keep`` best by ``select_by`` (the earlier epoch wins a tie)."""
    found = runs.models(store.root, store.filesystem)
    ranked = sorted(found, key=lambda c: (-c.summary["metrics"][select_by], c.summary["epoch"]))
    for stale in ranked[keep:]:
        with contextlib.suppress(FileNotFoundError):
            store.filesystem.delete_dir(stale.path)


def discard_after(store: ModelStore, epoch: int) -> list[str]:
    """Deletes the run's checkpoint folders (model and resume) from after ``epoch``, the epoch this attempt resumes
    from; returns their names.

    Such folders were left by an attempt that failed after writing them but before Ray registered them (e.g. its
    controller lost the storage mid-write). They belong to a timeline this attempt re-trains, would otherwise be
    taken for the run's best or latest state, and Ray never deletes what it never registered.
    """
    import pyarrow.fs

    try:
        entries = store.filesystem.get_file_info(pyarrow.fs.FileSelector(store.root, allow_not_found=True))
    except OSError as exn:
        raise FerdistError(f"cannot list the run folder {store.root} ({exn})") from None
    stale = [e for e in entries if e.type == pyarrow.fs.FileType.Directory
             and (m := re.fullmatch(rf"(?:{MODEL_PREFIX}|{RESUME_PREFIX})(\d+)", e.base_name)) and int(m[1]) > epoch]
    for entry in stale:
        with contextlib.suppress(FileNotFoundError):
            store.filesystem.delete_dir(entry.path)
    if stale:
        log.warning("removed %s: written after epoch %d by an attempt that failed before Ray registered them",
                    ", ".join(sorted(e.base_name for e in stale)), epoch)  # fmt: skip
    return sorted(e.base_name for e in stale)


class LocalResumeWriter:
    """Resume state without Ray (LocalSession): written to ``root/checkpoint_epoch_NNNN`` on a writer thread, the
    newest kept; the loop waits only if the previous write is still going."""

    def __init__(self, root: Path, *, mode: str) -> None:
        self.root, self.mode = root, mode
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, snapshot: Snapshot) -> None:
        self.wait()

        def write() -> None:
            try:
                target = self.root / f"{RESUME_PREFIX}{snapshot.epoch:04d}"
                part = target.with_name(target.name + ".part")
                write_snapshot(snapshot, part)
                part.rename(target)
                for old in sorted(self.root.glob(f"{RESUME_PREFIX}*[0-9]"))[:-1]:
                    shutil.rmtree(old)
            except BaseException as exn:  # surfaced on the loop's thread by wait()
                self._error = exn

        self._thread = threading.Thread(target=write, name="ferdist-resume", daemon=True)
        self._thread.start()
        if self.mode == "sync":
            self.wait()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise FerdistError(f"could not write the resume checkpoint to {self.root} ({error})") from None
