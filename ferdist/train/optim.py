"""AdamW over the trainable parameters, with linear warmup then cosine decay stepped every batch.

Weight decay skips norms, biases and the CLS token, and ``layer_decay`` scales each block's LR by its depth, as in
MAE's fine-tuning recipe (after BEiT/timm's ``param_groups_lrd``); the cosine follows SGDR (Loshchilov & Hutter,
2017) without restarts.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from ferdist.config import OptimConfig


@dataclass(frozen=True)
class Schedule:
    """Step counts of one run: the cosine spans ``total_steps``, after ``warmup_steps`` of linear warmup."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def make_schedule(cfg: OptimConfig, *, steps_per_epoch: int, epochs: int) -> Schedule:
    """Converts the epoch-denominated config into step counts."""
    total = steps_per_epoch * epochs
    return Schedule(steps_per_epoch, total, min(total, round(cfg.warmup_epochs * steps_per_epoch)))


def lr_factor(step: int, *, schedule: Schedule, min_ratio: float) -> float:
    """Multiplier on the peak LR for optimizer step ``step`` (0-based): (step+1)/warmup, then cosine to min_ratio."""
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    decay_steps = max(1, schedule.total_steps - schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters as (decayed, not decayed); frozen parameters are in neither."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(("cls_token", "position_embeddings")) else decay).append(name)
    return decay, no_decay


def layer_id(name: str, *, depth: int) -> int:
    """Depth of a parameter for layer-wise LR decay: embeddings 0, block i → i + 1, final norm and head depth + 1."""
    if name.startswith("backbone.embeddings."):
        return 0
    if name.startswith("backbone.layers."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def lr_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """The LR multiplier of every trainable parameter: ``layer_decay ** (depth + 1 - layer_id)`` (1 for all when
    ``layer_decay`` is 1, for models without a ``backbone``: MAE pretraining's)."""
    if layer_decay == 1.0:
        return {name: 1.0 for name, p in model.named_parameters() if p.requires_grad}
    depth = model.backbone.config.num_hidden_layers
    return {
        name: layer_decay ** (depth + 1 - layer_id(name, depth=depth))
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, *, schedule: Schedule
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``model``'s trainable parameters and its per-step LambdaLR (call ``scheduler.step()`` per batch)."""
    params = dict(model.named_parameters())
    decay, no_decay = parameter_groups(model)
    scales = lr_scales(model, cfg.layer_decay)
    # One group per (LR scale, decayed or not), the head's first: get_last_lr()[0] is the peak LR the loop logs.
    groups = []
    for scale in sorted(set(scales.values()), reverse=True):
        for names, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)):
            chosen = [params[n] for n in names if scales[n] == scale]
            if chosen:
                groups.append({"params": chosen, "weight_decay": wd, "lr": cfg.lr * scale})
    optimizer = torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        # fused needs every parameter on one CUDA device; foreach is the fast path elsewhere.
        fused=bool(decay) and params[decay[0]].is_cuda,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, schedule=schedule, min_ratio=cfg.min_lr_ratio)
    )
    return optimizer, scheduler
