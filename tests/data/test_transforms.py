"""On-device transforms: exact at identity, exact flips, seeded, and the normalisation the backbone expects."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ferdist.config import AugmentConfig
from ferdist.constants import IMAGENET_MEAN, IMAGENET_STD
from ferdist.data.transforms import eval_transform, train_transform


def faces(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 48, 48), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean) * 255


def test_eval_at_native_size_keeps_every_pixel_and_normalises_per_channel() -> None:
    images = faces()
    out = eval_transform(images, image_size=48)
    assert out.shape == (4, 3, 48, 48) and out.dtype == torch.float32
    for c in range(3):  # grey replicated into RGB, each channel with ImageNet's statistics
        assert torch.allclose(unnormalise(out)[:, c], images[:, 0].float(), atol=1e-3)


def test_resize_to_224() -> None:
    """Catches a resize that flips, shifts, transposes or interpolates otherwise (a flat grey image hid all of them):
    an asymmetric face goes through as torch's own bilinear interpolate resizes it."""
    rows, cols = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")
    gradient = (rows * 4 + cols).clamp(max=255)  # brighter down than right: a transpose or flip shows
    pattern = torch.where((rows < 12) & (cols < 20), 255, (cols * 5) % 256)  # a bright block in the top-left corner
    images = torch.stack([gradient, pattern]).to(torch.uint8)[:, None]
    out = eval_transform(images, image_size=224)
    assert out.shape == (2, 3, 224, 224)
    expected = F.interpolate(images.float() / 255, size=(224, 224), mode="bilinear", align_corners=False)
    for c in range(3):
        torch.testing.assert_close(unnormalise(out)[:, c] / 255, expected[:, 0], rtol=0, atol=1e-4)
    assert not torch.allclose(expected, expected.flip(-1), atol=0.05)  # the image is asymmetric enough to tell


def test_flip_only_mirrors_exactly() -> None:
    images = faces()
    cfg = AugmentConfig(crop_scale=1.0, crop_ratio=1.0, hflip=1.0)
    out = train_transform(images, cfg, image_size=48, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(unnormalise(out)[:, 0], images[:, 0].flip(-1).float(), atol=1e-3)


def test_augmentation_is_seeded_and_varies() -> None:
    images = faces()
    cfg = AugmentConfig()
    a = train_transform(images, cfg, image_size=32, generator=torch.Generator().manual_seed(5))
    b = train_transform(images, cfg, image_size=32, generator=torch.Generator().manual_seed(5))
    c = train_transform(images, cfg, image_size=32, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # A crop keeps most of the face: output stays close to the resized original.
    plain = eval_transform(images, image_size=32)
    assert (a - plain).abs().mean() < (plain - plain.roll(1, 0)).abs().mean()
