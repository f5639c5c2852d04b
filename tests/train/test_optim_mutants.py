"""The optimiser's groups and schedule at the edges the recipe tests do not reach: warmup longer than the run, a run
with no decay steps, the parameter names that skip weight decay, each layer's depth, and AdamW's own settings
(written for mutation testing, see MUTATION_RESULTS.md)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ferdist.config import OptimConfig
from ferdist.train.optim import (
    Schedule,
    build_optimizer,
    layer_id,
    lr_factor,
    lr_scales,
    make_schedule,
    parameter_groups,
)


def test_warmup_is_whole_steps_and_never_longer_than_the_run() -> None:
    # Kills make_schedule mutants of round() (3.5 steps → 4), of min(total, …) → max, and of total = steps * epochs.
    s = make_schedule(OptimConfig(warmup_epochs=0.5), steps_per_epoch=7, epochs=3)
    assert (s.steps_per_epoch, s.total_steps, s.warmup_steps) == (7, 21, 4) and isinstance(s.warmup_steps, int)
    assert make_schedule(OptimConfig(warmup_epochs=9), steps_per_epoch=7, epochs=3).warmup_steps == 21


def test_a_run_that_is_all_warmup_ends_at_the_floor() -> None:
    # Kills lr_factor mutants of max(1, total - warmup) (a bound of 2 leaves the step after the run half-way down).
    s = Schedule(steps_per_epoch=10, total_steps=10, warmup_steps=10)
    assert lr_factor(9, schedule=s, min_ratio=0.25) == 1.0
    assert lr_factor(10, schedule=s, min_ratio=0.25) == 1.0
    assert lr_factor(11, schedule=s, min_ratio=0.25) == 0.25


@pytest.mark.parametrize(("step", "expected"), [(0, 1.0), (1, 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4))), (4, 0.2)])
def test_without_warmup_the_cosine_starts_at_the_first_step(step: int, expected: float) -> None:
    # Kills lr_factor mutants of `step < warmup_steps` (→ <=, which divides by zero) and of the cosine's terms.
    s = Schedule(steps_per_epoch=4, total_steps=4, warmup_steps=0)
    assert lr_factor(step, schedule=s, min_ratio=0.2) == pytest.approx(expected, abs=1e-12)


class Named(nn.Module):
    """Parameters named as the rules read them: a matrix, a vector, a token, position embeddings, a frozen matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3, 3))
        self.bias = nn.Parameter(torch.zeros(3))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 3))
        self.inner = nn.Module()
        self.inner.position_embeddings = nn.Parameter(torch.zeros(1, 4, 3))
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)


def test_tokens_and_position_embeddings_are_not_decayed_and_frozen_weights_are_in_no_group() -> None:
    # Kills parameter_groups mutants of `ndim < 2`, of the ("cls_token", "position_embeddings") names and of the skip.
    assert parameter_groups(Named()) == (["weight"], ["bias", "cls_token", "inner.position_embeddings"])


@pytest.mark.parametrize(
    ("name", "depth", "expected"),
    [
        ("backbone.embeddings.cls_token", 6, 0),
        ("backbone.embeddings.patch_embeddings.projection.weight", 12, 0),
        ("backbone.layers.0.attention.q_proj.weight", 6, 1),
        ("backbone.layers.3.layernorm_before.bias", 6, 4),
        ("backbone.layers.11.mlp.fc1.weight", 12, 12),
        ("backbone.layernorm.weight", 6, 7),
        ("head.weight", 12, 13),
        ("backbone.embeddings_extra.weight", 6, 7),
    ],
)
def test_layer_id_is_the_depth_of_each_parameter(name: str, depth: int, expected: int) -> None:
    # Kills layer_id mutants of its prefixes, of split(".")[2] and of the +1 offsets.
    assert layer_id(name, depth=depth) == expected


def test_layer_decay_one_gives_every_trainable_parameter_the_peak_lr_even_without_a_backbone() -> None:
    # Kills lr_scales mutants of the `layer_decay == 1.0` shortcut (MAE pretraining's model has no backbone).
    assert lr_scales(Named(), 1.0) == {"weight": 1.0, "bias": 1.0, "cls_token": 1.0, "inner.position_embeddings": 1.0}


def test_adamw_gets_the_configured_betas_lr_decay_and_floor() -> None:
    # Kills build_optimizer mutants of betas, weight_decay, the group LR and the scheduler's min_ratio.
    cfg = OptimConfig(lr=2e-3, weight_decay=0.3, beta1=0.8, beta2=0.95, min_lr_ratio=0.25, warmup_epochs=0)
    opt, sched = build_optimizer(Named(), cfg, schedule=Schedule(steps_per_epoch=4, total_steps=4, warmup_steps=0))
    assert [(len(g["params"]), g["weight_decay"], g["lr"], g["betas"]) for g in opt.param_groups] == [
        (1, 0.3, 2e-3, (0.8, 0.95)),
        (3, 0.0, 2e-3, (0.8, 0.95)),
    ]
    assert isinstance(opt, torch.optim.AdamW) and not opt.param_groups[0]["fused"]
    for _ in range(4):
        opt.step()
        sched.step()
    assert sched.get_last_lr() == pytest.approx([2e-3 * 0.25, 2e-3 * 0.25])


class Deep(nn.Module):
    """A backbone of two blocks and a head, as `FerClassifier` names them, with a config that tells the depth."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.config = type("Config", (), {"num_hidden_layers": 2})()
        self.backbone.embeddings = nn.Linear(2, 2)
        self.backbone.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
        self.head = nn.Linear(2, 2)


def test_layer_decay_groups_go_from_the_head_down_each_split_by_decay() -> None:
    # Kills build_optimizer mutants of sorted(reverse=True), of the (decay, no_decay) pairing and of lr * scale.
    cfg = OptimConfig(lr=1.0, weight_decay=0.1, layer_decay=0.5)
    opt, _ = build_optimizer(Deep(), cfg, schedule=Schedule(steps_per_epoch=1, total_steps=1, warmup_steps=0))
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups] == [
        (1.0, 0.1, 1),  # head
        (1.0, 0.0, 1),
        (0.5, 0.1, 1),  # block 1
        (0.5, 0.0, 1),
        (0.25, 0.1, 1),  # block 0
        (0.25, 0.0, 1),
        (0.125, 0.1, 1),  # embeddings
        (0.125, 0.0, 1),
    ]
