"""Batched image transforms that run on the training device: uint8 ``[B, 1, 48, 48]`` in, normalised
``[B, 3, S, S]`` float out.

Crop, flip, rotation, shift and resize are one affine ``grid_sample`` per batch (the batched form of torchvision's
``RandomResizedCrop`` + ``RandomHorizontalFlip`` + ``RandomAffine``), so the loader only moves 2.3 kB per face and the
GPU does the resampling. Random erasing (Zhong et al. 2020, "Random Erasing Data Augmentation") follows on the
normalised batch. Evaluation uses the same sampler with the identity transform, so train and eval see the same pixels
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
    """Affine matrices ``[B, 2, 3]`` mapping output to input coordinates in [-1, 1]: a random crop, maybe flipped, of
    the face turned and shifted by `rotation_shift` (when ``cfg.rotate`` / ``cfg.translate`` are on)."""
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
    if cfg.rotate or cfg.translate:
        # Drawn after the crop's numbers, and only when on: a run without them draws exactly what it drew before.
        v = torch.rand(batch, 3, generator=generator, dtype=torch.float64)
        theta = compose(theta, rotation_shift((2 * v[:, 0] - 1) * cfg.rotate, (2 * v[:, 1:] - 1) * cfg.translate))
    return theta.float()


def rotation_shift(degrees: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Affine matrices ``[B, 2, 3]`` (float64, output to input) that turn each picture by ``degrees`` ``[B]`` (90 is
    ``torch.rot90(x, 1, dims=(-2, -1))`` on a square) and then move it by ``shift`` ``[B, 2]`` (x, y) fractions of
    its side."""
    angle = torch.deg2rad(degrees.to(torch.float64))
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(len(angle), 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    # The output pixel at p shows the turned picture's p - shift; a side spans 2 in these coordinates.
    theta[:, :, 2] = -torch.einsum("bij,bj->bi", theta[:, :, :2], 2 * shift.to(torch.float64))
    return theta


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The affine map ``outer(inner(p))`` of two ``[B, 2, 3]`` output-to-input maps: ``inner`` acts on the output
    first, so the picture is first resampled by ``outer`` (the crop), then by ``inner`` (the turn and shift)."""
    matrix = outer[:, :, :2] @ inner[:, :, :2]
    offset = (outer[:, :, :2] @ inner[:, :, 2:]).squeeze(-1) + outer[:, :, 2]
    return torch.cat([matrix, offset.unsqueeze(-1)], dim=2)


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
    """Random resized crop + flip + turn + shift + resize + normalise, then random erasing, batched on ``images``'
    device."""
    x = to_model_input(images, image_size=image_size, theta=crop_params(images.shape[0], cfg, generator=generator))
    if cfg.erase:
        x = erase(x, erase_boxes(x.shape[0], image_size, cfg, generator=generator))
    return x


# timm's RandomErasing draws aspect ratios log-uniformly in [0.3, 1 / 0.3].
ERASE_RATIO = (math.log(0.3), math.log(1 / 0.3))


def erase_boxes(batch: int, size: int, cfg: AugmentConfig, *, generator: torch.Generator) -> torch.Tensor:
    """Rectangles ``[B, 4]`` (top, left, height, width) in pixels of a ``size`` square to erase; height and width 0
    where a face is left whole (probability 1 - ``cfg.erase``). The area is uniform in [erase_area_min,
    erase_area_max] of the image before rounding to whole pixels, its sides clipped to the image."""
    u = torch.rand(batch, 5, generator=generator, dtype=torch.float64)
    area = (cfg.erase_area_min + (cfg.erase_area_max - cfg.erase_area_min) * u[:, 1]) * size * size
    ratio = torch.exp(ERASE_RATIO[0] + (ERASE_RATIO[1] - ERASE_RATIO[0]) * u[:, 2])
    height = torch.sqrt(area * ratio).round().clamp(1, size)
    width = torch.sqrt(area / ratio).round().clamp(1, size)
    top = (u[:, 3] * (size - height + 1)).floor()
    left = (u[:, 4] * (size - width + 1)).floor()
    on = u[:, 0] < cfg.erase
    return torch.stack([top, left, height * on, width * on], dim=1).long()


def erase(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, C, S, S]`` with each face's box (from `erase_boxes`) set to 0: after normalisation, the mean colour
    (timm's "const" mode), so an erased face carries no pixel statistics of its own."""
    boxes = boxes.to(x.device)
    rows = torch.arange(x.shape[-2], device=x.device)
    cols = torch.arange(x.shape[-1], device=x.device)
    top, left, height, width = (boxes[:, i, None] for i in range(4))
    in_rows = (rows >= top) & (rows < top + height)
    in_cols = (cols >= left) & (cols < left + width)
    return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)


def centre_crop(side: float) -> torch.Tensor:
    """The affine view ``[2, 3]`` (output to input) of the face's centre, ``side`` of its side (1.0: the whole face)."""
    return torch.tensor([[side, 0.0, 0.0], [0.0, side, 0.0]])


def eval_transform(images: torch.Tensor, *, image_size: int, crop: float = 1.0) -> torch.Tensor:
    """The centre ``crop`` of each face (`ModelConfig.eval_crop`; 1.0 is the whole face), resized and normalised."""
    theta = centre_crop(crop).expand(images.shape[0], 2, 3)
    return to_model_input(images, image_size=image_size, theta=theta)
