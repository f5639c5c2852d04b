"""What a checkpoint folder holds, and reading it back.

A checkpoint is self-contained: the weights (``model.pt``), the backbone's architecture (``backbone.json``) and the
run's config (``config.yaml``) are enough to rebuild the classifier without the pretrained source; ``train_state.pt``
adds the optimizer, scheduler and metric history needed to resume; ``summary.json`` is the small part a driver reads
without loading torch: the epoch's metrics, the val confusion matrix and the history (for reports and curves).
Checkpoints are written at epoch boundaries, so
"where the data was" is just the epoch: data order and augmentation are functions of (seed, epoch, rank).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ferdist.config import RunConfig, load_config, to_yaml

if TYPE_CHECKING:
    from ferdist.model import FerClassifier

MODEL_FILE, STATE_FILE, BACKBONE_FILE, CONFIG_FILE = "model.pt", "train_state.pt", "backbone.json", "config.yaml"
SUMMARY_FILE = "summary.json"


@dataclass
class TrainState:
    """Progress that a resumed run continues from."""

    epochs_done: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    """The metrics reported after each epoch, in order."""
    resumed_at: list[int] = field(default_factory=list)
    """Epochs at which the run restarted from a checkpoint (after a failure or a re-submission)."""


def save_checkpoint(
    directory: Path,
    *,
    raw_model: FerClassifier,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    cfg: RunConfig,
    confusion: list[list[int]],
) -> None:
    """Writes the checkpoint files into ``directory`` (which Ray then persists to storage).

    ``confusion`` is the val confusion matrix (rows: true class) of the epoch just finished.
    """
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(raw_model.state_dict(), directory / MODEL_FILE)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epochs_done": state.epochs_done,
            "history": state.history,
            "resumed_at": state.resumed_at,
        },
        directory / STATE_FILE,
    )
    (directory / BACKBONE_FILE).write_text(json.dumps(raw_model.backbone.config.to_dict(), indent=1, sort_keys=True))
    (directory / CONFIG_FILE).write_text(to_yaml(cfg))
    summary = {"epoch": state.epochs_done, "metrics": state.history[-1], "confusion": confusion,
               "history": state.history}  # fmt: skip
    (directory / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))


def restore(
    directory: Path,
    *,
    raw_model: FerClassifier,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainState:
    """Loads weights, optimizer and scheduler from ``directory`` in place; returns the progress to continue from."""
    raw_model.load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True))
    saved = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return _progress(saved)


def read_history(directory: Path) -> TrainState:
    """The progress recorded in a checkpoint, without loading any weights into a model."""
    return _progress(torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True))


def _progress(saved: dict[str, Any]) -> TrainState:
    return TrainState(epochs_done=saved["epochs_done"], history=saved["history"], resumed_at=saved["resumed_at"])


def load_classifier(directory: Path, *, map_location: str | torch.device = "cpu") -> tuple[FerClassifier, RunConfig]:
    """The trained classifier (in eval mode) and its run config, from the checkpoint alone."""
    from ferdist.model import build_model_from_config  # here: drivers that only read summaries skip transformers

    cfg = load_config(directory / CONFIG_FILE)
    model = build_model_from_config(json.loads((directory / BACKBONE_FILE).read_text()), cfg.model)
    model.load_state_dict(torch.load(directory / MODEL_FILE, map_location=map_location, weights_only=True))
    return model.eval(), cfg
