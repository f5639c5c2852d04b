"""Mixup (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization") and CutMix (Yun et al. 2019, "CutMix:
Regularization Strategy to Train Strong Classifiers with Localizable Features") on a batch already on the device.

As timm's ``Mixup`` in batch mode: one λ per batch from Beta(α, α), each face mixed with the face at the mirrored
position of the batch (``x.flip(0)``), CutMix's box of side √(1 − λ) centred anywhere and clipped at the borders, λ
then corrected to the area actually kept. The targets are the same mix of one-hot labels; label smoothing is applied
by the loss, which gives the same target as smoothing each one-hot label first (the mix is linear and its weights sum
to 1). Random numbers come from the explicit CPU generator the crop draws from, so a batch mixes the same on any
device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ferdist.config import AugmentConfig
from ferdist.data.transforms import train_transform


@dataclass(frozen=True)
class Mix:
    """How one batch is mixed."""

    kind: Literal["none", "mixup", "cutmix"]
    lam: float
    """The weight of each face's own image and label (1 when not mixed)."""
    box: tuple[int, int, int, int] | None = None
    """CutMix's pasted rectangle: top, left, height, width in pixels."""


def draw_mix(cfg: AugmentConfig, *, size: int, generator: torch.Generator) -> Mix:
    """The mix of the next batch of ``size`` square images: none (probability 1 - ``cfg.mix_prob``), mixup or cutmix
    (``cfg.mix_switch`` picks between them when both are on)."""
    u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
    if not cfg.mixes or u[0] >= cfg.mix_prob:
        return Mix("none", 1.0)
    cutmix = cfg.cutmix > 0 and (cfg.mixup == 0 or u[1] < cfg.mix_switch)
    alpha = cfg.cutmix if cutmix else cfg.mixup
    # torch has no seeded Beta sampler: numpy's, seeded from the run's generator.
    seed = int(torch.randint(2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    if not cutmix:
        return Mix("mixup", lam)
    side = int(size * math.sqrt(1.0 - lam))
    cy, cx = (int(v * size) for v in torch.rand(2, generator=generator, dtype=torch.float64).tolist())
    top, bottom = max(cy - side // 2, 0), min(cy + side // 2, size)
    left, right = max(cx - side // 2, 0), min(cx + side // 2, size)
    height, width = bottom - top, right - left
    return Mix("cutmix", 1.0 - height * width / (size * size), (top, left, height, width))


def mix_batch(inputs: torch.Tensor, labels: torch.Tensor, mix: Mix, *, num_classes: int) -> tuple[torch.Tensor, ...]:
    """``(inputs, targets)``: the images ``[B, C, S, S]`` mixed with ``inputs.flip(0)`` as ``mix`` says, and the class
    probabilities ``[B, num_classes]`` ``λ · one_hot(labels) + (1 − λ) · one_hot(labels.flip(0))``."""
    one_hot = F.one_hot(labels, num_classes).to(inputs.dtype)
    targets = one_hot * mix.lam + one_hot.flip(0) * (1.0 - mix.lam)
    if mix.kind == "mixup":
        return inputs * mix.lam + inputs.flip(0) * (1.0 - mix.lam), targets
    if mix.kind == "cutmix":
        assert mix.box is not None
        top, left, height, width = mix.box
        mixed = inputs.clone()
        mixed[:, :, top : top + height, left : left + width] = inputs.flip(0)[:, :, top : top + height,
                                                                              left : left + width]  # fmt: skip
        return mixed, targets
    return inputs, targets


def augment_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: AugmentConfig,
    *,
    image_size: int,
    num_classes: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch as the model and loss take it: `train_transform` of the uint8 ``images``, then mixed when
    mixup or cutmix is on; the targets are ``labels`` themselves, or class probabilities when mixed."""
    inputs = train_transform(images, cfg, image_size=image_size, generator=generator)
    if not cfg.mixes:
        return inputs, labels
    mix = draw_mix(cfg, size=image_size, generator=generator)
    mixed, targets = mix_batch(inputs, labels, mix, num_classes=num_classes)
    return mixed, targets
