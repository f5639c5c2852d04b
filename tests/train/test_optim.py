"""LR schedule values at known steps, parameter groups, and a scheduler that resumes where it stopped."""

from __future__ import annotations

import math

import pytest
import torch

from ferdist.config import ModelConfig, OptimConfig
from ferdist.train.model import build_model
from ferdist.train.optim import build_optimizer, lr_factor, make_schedule, parameter_groups


def test_schedule_counts_steps_from_epochs() -> None:
    s = make_schedule(OptimConfig(warmup_epochs=2), steps_per_epoch=10, epochs=12)
    assert (s.steps_per_epoch, s.total_steps, s.warmup_steps) == (10, 120, 20)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 1 / 20),  # first step already moves: warmup is (step + 1) / warmup_steps
        (9, 10 / 20),
        (19, 1.0),  # end of warmup = peak
        (20, 1.0),  # cosine starts at the peak
        (70, 0.1 + 0.9 * 0.5),  # halfway through the 100 decay steps
        (120, 0.1),  # the end and beyond stay at min_lr_ratio
        (500, 0.1),
    ],
)
def test_warmup_then_cosine(step: int, expected: float) -> None:
    s = make_schedule(OptimConfig(warmup_epochs=2), steps_per_epoch=10, epochs=12)
    assert lr_factor(step, schedule=s, min_ratio=0.1) == pytest.approx(expected, abs=1e-12)


def test_cosine_is_monotone_after_warmup() -> None:
    s = make_schedule(OptimConfig(warmup_epochs=0), steps_per_epoch=7, epochs=5)
    values = [lr_factor(i, schedule=s, min_ratio=0.0) for i in range(s.total_steps + 1)]
    assert values[0] == 1.0 and values[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert values[len(values) // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * (len(values) // 2) / 35)))


def tiny(freeze: int = 2):
    return build_model(ModelConfig(pretrained="random:tiny", image_size=32, freeze_blocks=freeze), seed=0)


def test_parameter_groups_skip_frozen_and_exempt_norms_and_biases() -> None:
    model = tiny(freeze=2)
    decay, no_decay = parameter_groups(model)
    names = set(decay) | set(no_decay)
    assert not any(n.startswith(("backbone.embeddings", "backbone.layers.0.", "backbone.layers.1.")) for n in names)
    assert all(n.endswith(".weight") and "layernorm" not in n for n in decay)
    assert {"head.bias", "backbone.layernorm.weight", "backbone.layers.2.layernorm_before.bias"} <= set(no_decay)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == trainable and not set(decay) & set(no_decay) and "head.weight" in decay
    model_all = tiny(freeze=0)
    decay_all, no_decay_all = parameter_groups(model_all)
    assert "backbone.embeddings.cls_token" in no_decay_all  # a token, not a weight matrix: no decay
    assert "backbone.embeddings.patch_embeddings.projection.weight" in decay_all


def test_scheduler_state_resumes_the_same_lr_sequence() -> None:
    cfg = OptimConfig(lr=1e-3, warmup_epochs=1)
    s = make_schedule(cfg, steps_per_epoch=4, epochs=3)
    model = tiny()
    opt, sched = build_optimizer(model, cfg, schedule=s)
    lrs = []
    for _ in range(s.total_steps):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    opt2, sched2 = build_optimizer(model, cfg, schedule=s)
    for _ in range(5):
        opt2.step()
        sched2.step()
    state = sched2.state_dict()
    opt3, sched3 = build_optimizer(model, cfg, schedule=s)
    sched3.load_state_dict(state)
    resumed = []
    for _ in range(s.total_steps - 5):
        opt3.step()
        sched3.step()
        resumed.append(sched3.get_last_lr()[0])
    assert resumed == lrs[5:]
    assert isinstance(opt3, torch.optim.AdamW) and opt3.param_groups[1]["weight_decay"] == 0.0


def test_layer_decay_scales_each_block_by_its_depth() -> None:
    model = tiny(freeze=0)  # 6 blocks: embeddings are depth 0, block i depth i + 1, head and final norm depth 7
    cfg = OptimConfig(lr=1e-3, layer_decay=0.5)
    opt, sched = build_optimizer(model, cfg, schedule=make_schedule(cfg, steps_per_epoch=1, epochs=1))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["head.weight"])] == lr_of[id(named["backbone.layernorm.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["backbone.layers.5.attention.q_proj.weight"])] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(named["backbone.layers.0.attention.q_proj.weight"])] == pytest.approx(1e-3 * 0.5**6)
    assert lr_of[id(named["backbone.embeddings.cls_token"])] == pytest.approx(1e-3 * 0.5**7)
    assert wd_of[id(named["backbone.embeddings.cls_token"])] == 0.0
    assert wd_of[id(named["backbone.layers.0.attention.q_proj.weight"])] == cfg.weight_decay
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())  # every trainable parameter, once
    assert sched.get_last_lr()[0] == pytest.approx(1e-3 * sched.lr_lambdas[0](0))  # group 0 is the head's peak LR


def test_layer_decay_one_keeps_two_groups() -> None:
    opt, _ = build_optimizer(tiny(), OptimConfig(), schedule=make_schedule(OptimConfig(), steps_per_epoch=1, epochs=1))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
