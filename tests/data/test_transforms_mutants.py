"""The augmentation's numbers, not only its shapes: the crop each draw makes, the resampling against PyTorch's own
bilinear resize, and the border the resampling repeats (written for mutation testing, see MUTATION_RESULTS.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ferdist.config import AugmentConfig
from ferdist.constants import IMAGENET_MEAN, IMAGENET_STD
from ferdist.data.transforms import crop_params, eval_transform, to_model_input, train_transform


def faces(n: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 48, 48), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def normalised(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def expected_theta(cfg: AugmentConfig, batch: int, seed: int) -> np.ndarray:
    """The documented crop, computed apart: area uniform in [crop_scale, 1], aspect log-uniform in [1/r, r], sides
    at most the face, centre uniform where the crop fits, mirrored with probability hflip."""
    u = torch.rand(batch, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    theta = np.zeros((batch, 2, 3))
    for i, (a, r, x, y, f) in enumerate(u):
        area = cfg.crop_scale + (1 - cfg.crop_scale) * a
        ratio = math.exp((2 * r - 1) * math.log(cfg.crop_ratio))
        width, height = min(math.sqrt(area * ratio), 1.0), min(math.sqrt(area / ratio), 1.0)
        theta[i] = [
            [width * (-1 if f < cfg.hflip else 1), 0, (2 * x - 1) * (1 - width)],
            [0, height, (2 * y - 1) * (1 - height)],
        ]
    return theta


@pytest.mark.parametrize(
    "cfg",
    [
        AugmentConfig(crop_scale=0.5, crop_ratio=1.6, hflip=0.3),
        AugmentConfig(crop_scale=0.08, crop_ratio=3.0, hflip=0.8),
    ],
)
def test_crop_params_draws_the_documented_crop(cfg: AugmentConfig) -> None:
    # Kills crop_params mutants in every term (area, ratio, clamp, centre, flip, the draw's dtype and columns).
    theta = crop_params(256, cfg, generator=torch.Generator().manual_seed(7))
    assert theta.dtype == torch.float32 and theta.shape == (256, 2, 3)
    expected = expected_theta(cfg, 256, 7)
    np.testing.assert_allclose(theta.numpy(), expected, atol=1e-6)
    sides = np.abs(expected[:, [0, 1], [0, 1]])
    assert (sides == 1.0).any() and (sides < 1.0).any()  # the clamp to the face's side is exercised both ways
    assert 0.2 < (expected[:, 0, 0] < 0).mean() / cfg.hflip < 1.8  # flips happen at about the configured rate


def test_crop_params_off_is_the_identity() -> None:
    # Kills crop_params mutants that move the crop when crop_scale = crop_ratio = 1 and hflip = 0 (1 - scale, 2u - 1).
    theta = crop_params(16, AugmentConfig(crop_scale=1.0, crop_ratio=1.0, hflip=0.0), generator=torch.Generator())
    assert torch.equal(theta, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(16, 2, 3))


@pytest.mark.parametrize("size", [32, 48, 96, 224])
def test_to_model_input_is_pytorchs_bilinear_resize(size: int) -> None:
    # Kills to_model_input mutants of align_corners, padding_mode, mode, the /255 and the identity theta.
    images = faces()
    reference = F.interpolate(images.float() / 255.0, size=(size, size), mode="bilinear", align_corners=False)
    out = eval_transform(images, image_size=size)
    assert out.shape == (3, 3, size, size) and out.dtype == torch.float32
    torch.testing.assert_close(out, normalised(reference), atol=1e-4, rtol=0)


def test_a_shifted_crop_repeats_the_border_pixels() -> None:
    # Kills to_model_input's padding_mode="border" mutants: a shift past the edge repeats the edge, never black.
    images = torch.arange(48, dtype=torch.uint8).repeat(48, 1).view(1, 1, 48, 48) * 5  # columns 0, 5, ..., 235
    theta = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]])  # look half a face to the right
    out = to_model_input(images, image_size=48, theta=theta)
    pixels = out * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    right = pixels[0, :, :, 36:] * 255  # columns sampled at or past the last input column
    torch.testing.assert_close(right, torch.full_like(right, 235.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(pixels[0, 0, :, 0] * 255, torch.full((48,), 60.0), atol=1e-3, rtol=0)  # column 12


def test_train_transform_resamples_through_the_drawn_crop() -> None:
    # Kills train_transform mutants that drop or change the crop, the size or the generator it is drawn from.
    images, cfg = faces(4), AugmentConfig(crop_scale=0.3, crop_ratio=2.0, hflip=0.5)
    out = train_transform(images, cfg, image_size=40, generator=torch.Generator().manual_seed(11))
    theta = crop_params(4, cfg, generator=torch.Generator().manual_seed(11))
    assert out.shape == (4, 3, 40, 40)
    torch.testing.assert_close(out, to_model_input(images, image_size=40, theta=theta), atol=0, rtol=0)
