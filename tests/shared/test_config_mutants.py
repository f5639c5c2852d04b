"""The validation bounds of the settings that become behaviour, at their edges: the last accepted value and the first
refused one with its exact sentence (written for mutation testing, see MUTATION_RESULTS.md)."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from ferdist.config import AugmentConfig, CheckpointConfig, DataConfig, ModelConfig, OptimConfig

# (config class, the one setting, its value, the sentence it is refused with; "{}" stands for words a newer sentence
# may add, "a probability "); kills the comparison mutants
# (`<` ↔ `<=`, a bound moved by one, `and` ↔ `or`) and the message mutants ("XX…XX", a lower-cased sentence)
# of DataConfig, ModelConfig, AugmentConfig, OptimConfig and CheckpointConfig.__post_init__.
REFUSED: list[tuple[type, str, Any, str]] = [
    (DataConfig, "manifest", "", "data.manifest must name a dataset folder or manifest.json"),
    (DataConfig, "loader_workers", -1, "data.loader_workers must be >= 0, got -1"),
    (DataConfig, "shuffle_buffer", 0, "data.shuffle_buffer must be >= 1, got 0"),
    (DataConfig, "max_bad_samples", -1, "data.max_bad_samples must be >= 0, got -1"),
    (ModelConfig, "pretrained", "", "model.pretrained must name a checkpoint or random:tiny / random:base"),
    (ModelConfig, "image_size", 15, "model.image_size must be >= 16, got 15"),
    (ModelConfig, "freeze_blocks", -1, "model.freeze_blocks must be >= 0, got -1"),
    (ModelConfig, "head_dropout", -0.01, "model.head_dropout must be in [0, 1), got -0.01"),
    (ModelConfig, "head_dropout", 1.0, "model.head_dropout must be in [0, 1), got 1.0"),
    (AugmentConfig, "crop_scale", 0.04, "augment.crop_scale must be in [0.05, 1], got 0.04"),
    (AugmentConfig, "crop_scale", 1.01, "augment.crop_scale must be in [0.05, 1], got 1.01"),
    (AugmentConfig, "crop_ratio", 0.99, "augment.crop_ratio must be >= 1, got 0.99"),
    (AugmentConfig, "hflip", -0.01, "augment.hflip must be {}in [0, 1], got -0.01"),
    (AugmentConfig, "hflip", 1.01, "augment.hflip must be {}in [0, 1], got 1.01"),
    (OptimConfig, "lr", 0.0, "optim.lr must be > 0, got 0.0"),
    (OptimConfig, "weight_decay", -0.01, "optim.weight_decay must be >= 0, got -0.01"),
    (OptimConfig, "beta1", -0.01, "optim.beta1 must be in [0, 1), got -0.01"),
    (OptimConfig, "beta1", 1.0, "optim.beta1 must be in [0, 1), got 1.0"),
    (OptimConfig, "beta2", -0.01, "optim.beta2 must be in [0, 1), got -0.01"),
    (OptimConfig, "beta2", 1.0, "optim.beta2 must be in [0, 1), got 1.0"),
    (OptimConfig, "warmup_epochs", -0.01, "optim.warmup_epochs must be >= 0, got -0.01"),
    (OptimConfig, "min_lr_ratio", -0.01, "optim.min_lr_ratio must be in [0, 1], got -0.01"),
    (OptimConfig, "min_lr_ratio", 1.01, "optim.min_lr_ratio must be in [0, 1], got 1.01"),
    (OptimConfig, "grad_clip", -0.01, "optim.grad_clip must be >= 0, got -0.01"),
    (OptimConfig, "label_smoothing", -0.01, "optim.label_smoothing must be in [0, 1), got -0.01"),
    (OptimConfig, "label_smoothing", 1.0, "optim.label_smoothing must be in [0, 1), got 1.0"),
    (OptimConfig, "layer_decay", 0.0, "optim.layer_decay must be in (0, 1], got 0.0"),
    (OptimConfig, "layer_decay", 1.01, "optim.layer_decay must be in (0, 1], got 1.01"),
    (CheckpointConfig, "storage_path", "", "checkpoint.storage_path must name a folder or s3:// prefix"),
    (CheckpointConfig, "outage_s", -0.01, "checkpoint.outage_s must be >= 0 seconds, got -0.01"),
    (CheckpointConfig, "outage_s", math.nan, "checkpoint.outage_s must be >= 0 seconds, got nan"),
    (CheckpointConfig, "keep", 0, "checkpoint.keep must be >= 1, got 0"),
    (CheckpointConfig, "keep_resume", 0, "checkpoint.keep_resume must be >= 1, got 0"),
    (CheckpointConfig, "every_epochs", 0, "checkpoint.every_epochs must be >= 1, got 0"),
    (CheckpointConfig, "max_failures", -2, "checkpoint.max_failures must be >= -1, got -2"),
]

# The edge values that are accepted: kill the mutants that move a bound inwards (`>= 0` → `>= 1`, `<= 1` → `< 1`).
ACCEPTED: list[tuple[type, str, Any]] = [
    (DataConfig, "loader_workers", 0),
    (DataConfig, "shuffle_buffer", 1),
    (DataConfig, "max_bad_samples", 0),
    (ModelConfig, "image_size", 16),
    (ModelConfig, "freeze_blocks", 0),
    (ModelConfig, "head_dropout", 0.0),
    (ModelConfig, "head_dropout", 0.99),
    (AugmentConfig, "crop_scale", 0.05),
    (AugmentConfig, "crop_scale", 1.0),
    (AugmentConfig, "crop_ratio", 1.0),
    (AugmentConfig, "hflip", 0.0),
    (AugmentConfig, "hflip", 1.0),
    (OptimConfig, "lr", 1e-12),
    (OptimConfig, "weight_decay", 0.0),
    (OptimConfig, "beta1", 0.0),
    (OptimConfig, "beta1", 0.99),
    (OptimConfig, "beta2", 0.0),
    (OptimConfig, "beta2", 0.99),
    (OptimConfig, "warmup_epochs", 0.0),
    (OptimConfig, "min_lr_ratio", 0.0),
    (OptimConfig, "min_lr_ratio", 1.0),
    (OptimConfig, "grad_clip", 0.0),
    (OptimConfig, "label_smoothing", 0.0),
    (OptimConfig, "label_smoothing", 0.99),
    (OptimConfig, "layer_decay", 1e-6),
    (OptimConfig, "layer_decay", 1.0),
    (CheckpointConfig, "outage_s", 0.0),
    (CheckpointConfig, "keep", 1),
    (CheckpointConfig, "keep_resume", 1),
    (CheckpointConfig, "every_epochs", 1),
    (CheckpointConfig, "max_failures", -1),
]


@pytest.mark.parametrize(
    ("cls", "key", "value", "message"), REFUSED, ids=[f"{c.__name__}.{k}={v}" for c, k, v, _ in REFUSED]
)
def test_a_value_past_the_bound_is_refused_with_its_sentence(cls: type, key: str, value: Any, message: str) -> None:
    # Kills <Config>.__post_init__ mutants that drop, invert or move this check, or change its sentence.
    with pytest.raises(ValueError, match="^" + re.escape(message).replace(r"\{\}", "(?:a probability )?") + "$"):
        cls(**{key: value})


@pytest.mark.parametrize(("cls", "key", "value"), ACCEPTED, ids=[f"{c.__name__}.{k}={v}" for c, k, v in ACCEPTED])
def test_the_value_at_the_bound_is_accepted(cls: type, key: str, value: Any) -> None:
    # Kills <Config>.__post_init__ mutants that turn `<` into `<=` (or the reverse) at this bound.
    assert getattr(cls(**{key: value}), key) == value
