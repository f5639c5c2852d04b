"""Batched image transforms that run on the training device: uint8 ``[B, 1, 48, 48]`` in, normalised
``[B, 3, S, S]`` float out.

Crop, flip and resize are one affine ``grid_sample`` per batch (the batched form of torchvision's
``RandomResizedCrop`` + ``RandomHorizontalFlip``), so the loader only moves 2.3 kB per face and the GPU does the
resampling. Evaluation uses the same sampler with the identity transform, so train and eval see the same pixels
when augmentation is off. Random draws come from an explicit CPU generator: the same seed gives the same
augmentation on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ferdist.config import AugmentConfig
from ferdist.constants import IMAGENET_MEAN, IMAGENET_STD


def crop_params(batch: int, cfg: AugmentConfig, *, generator: torch.Generator) -> torch.Tensor:
    """Affine matrices ``[B, 2, 3]`` mapping output to input coordinates in [-1, 1]: a random crop, maybe flipped."""
    u = torch.rand(batch, 5, generator=generator, dtype=torch.float64)
    area = cfg.crop_scale + (1.0 - cfg.crop_scale) * u[:, 0]
    log_r = math.log(cfg.crop_ratio)
    ratio = torch.exp((2 * u[:, 1] - 1) * log_r)
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    # Centre the crop anywhere it fits inside the face.
    cx = (2 * u[:, 2] - 1) * (1 - width)
    cy = (2 * u[:, 3] - 1) * (1 - height)
    flip = torch.where(u[:, 4] < cfg.hflip, -1.0, 1.0).to(torch.float64)
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    return theta.float()


def to_model_input(images: torch.Tensor, *, image_size: int, theta: torch.Tensor | None = None) -> torch.Tensor:
    """Resamples uint8 ``images`` through ``theta`` (identity if None) to ``image_size``, 3 channels, normalised."""
    batch = images.shape[0]
    x = images.float() / 255.0  # not in place: torch 2.6's export (ONNX) refuses to mutate its input's copy
    if theta is None:
        theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(batch, 2, 3)
    grid = F.affine_grid(theta.to(x.device), [batch, 1, image_size, image_size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    # Grey to RGB by broadcasting one channel against the three channels' statistics.
    return (x - mean) / std


def train_transform(
    images: torch.Tensor, cfg: AugmentConfig, *, image_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Random resized crop + horizontal flip + resize + normalise, batched on ``images``' device."""
    return to_model_input(images, image_size=image_size, theta=crop_params(images.shape[0], cfg, generator=generator))


def eval_transform(images: torch.Tensor, *, image_size: int) -> torch.Tensor:
    """Resize + normalise only."""
    return to_model_input(images, image_size=image_size)
