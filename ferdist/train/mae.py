"""MAE pretraining's model (He et al., 2022): Hugging Face ``ViTMAEForPreTraining`` (the encoder `ferdist.train.model`
fine-tunes plus a light decoder) from ``random:<geometry>`` or a ViT-MAE checkpoint, its seeded masking, the picture
of faces / masked inputs / reconstructions, and the ``save_pretrained`` folder a fine-tuning run loads.

Masking is on here (``mask_ratio`` of the patches hidden, a new draw every step) and off in fine-tuning, where
`ferdist.train.model` loads the same folder with ``mask_ratio=0``. The mask noise comes from an explicit generator, so a
resumed run draws the same masks as one never stopped. Pure torch and transformers: no Ray, MLflow or S3 clients.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining
from transformers.utils import logging as transformers_logging

from ferdist.config import MaeConfig
from ferdist.constants import IMAGENET_MEAN, IMAGENET_STD
from ferdist.errors import FerdistError
from ferdist.train.model import (
    cached_s3_folder,
    config_folder,
    load_backbone_config,
    load_weights,
    raise_missing_encoder,
    random_backbone_config,
    with_position_embeddings,
)

log = logging.getLogger(__name__)

# MAE's decoder is light next to its encoder (512 wide, 8 blocks for ViT-B/16); the small geometries get decoders
# in proportion, or a 48 px face's 64 patches would cost more to decode than to encode.
DECODERS: dict[str, dict[str, int]] = {
    "tiny": dict(decoder_hidden_size=64, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
                 decoder_intermediate_size=256),
    "small": dict(decoder_hidden_size=128, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                  decoder_intermediate_size=512),
    "base": dict(decoder_hidden_size=512, decoder_num_hidden_layers=8, decoder_num_attention_heads=16,
                 decoder_intermediate_size=2048),
}  # fmt: skip

MARKER_FILE = "ferdist_pretrain.json"
"""Written beside config.json in a pretraining output: which run wrote it, so a re-run may replace only its own."""


def pretraining_config(cfg: MaeConfig, *, display: str | None = None) -> ViTMAEConfig:
    """The ViTMAEConfig pretraining builds (random start) or loads (checkpoint start, config only), with
    ``cfg``'s masking and loss; ``display`` names the source in messages (an s3:// URI, not its local copy).

    Raises:
        FerdistError: an unknown geometry, an image size the patch size does not divide, a mask ratio that hides every
            patch, an unreadable checkpoint.
    """
    source = cfg.pretrained
    if source.startswith("random:"):
        name = source.removeprefix("random:")
        config = random_backbone_config(name, image_size=cfg.image_size)
        config.update(DECODERS[name])
    else:
        name = display or source
        config = load_backbone_config(source, display=name, image_size=cfg.image_size)
    patches = (cfg.image_size // config.patch_size) ** 2
    if int(patches * (1 - cfg.mask_ratio)) < 1:  # ViTMAE's own count of visible patches
        raise FerdistError(
            f"model.mask_ratio={cfg.mask_ratio:g} hides all {patches} patches of a {cfg.image_size} px face with "
            f"{display or source}'s {config.patch_size} px patches, so the encoder would see none; use at most "
            f"{math.floor((1 - 1 / patches) * 1e4) / 1e4:g}"
        )
    config.update({"mask_ratio": cfg.mask_ratio, "norm_pix_loss": cfg.norm_pix_loss})
    config._attn_implementation = cfg.attention
    return config


def check_start(cfg: MaeConfig, *, endpoint_url: str | None = None) -> None:
    """Fails fast (on the driver) when pretraining cannot start from ``cfg.pretrained``; reads configs only (see
    `config_folder`)."""
    with config_folder(cfg.pretrained, endpoint_url=endpoint_url) as local:
        pretraining_config(dataclasses.replace(cfg, pretrained=local), display=cfg.pretrained)


def build_pretraining_model(cfg: MaeConfig, *, seed: int, endpoint_url: str | None = None) -> ViTMAEForPreTraining:
    """Encoder + decoder from ``cfg.pretrained``: initialised from ``seed`` (random), or loaded, a decoder missing
    from the checkpoint (an encoder-only ViTMAEModel) initialised from ``seed``."""
    torch.manual_seed(seed)
    if cfg.pretrained.startswith("random:"):
        return with_position_embeddings(ViTMAEForPreTraining(pretraining_config(cfg)))
    source = cfg
    if cfg.pretrained.startswith("s3://"):
        folder = cached_s3_folder(cfg.pretrained, endpoint_url=endpoint_url)
        source = _local(cfg, folder)
    config = pretraining_config(source, display=cfg.pretrained)
    model, absent = load_weights(ViTMAEForPreTraining, source.pretrained, config=config, display=cfg.pretrained,
                                 attention=cfg.attention)  # fmt: skip
    if missing := [k for k in absent if not k.startswith("decoder.")]:
        raise_missing_encoder(cfg.pretrained, missing)
    if absent:
        log.info("%s has no decoder: pretraining starts with a new one", cfg.pretrained)
        with_position_embeddings(model.decoder)
    return model


def _local(cfg: MaeConfig, folder: Path) -> MaeConfig:
    return dataclasses.replace(cfg, pretrained=str(folder))


def interpolates(model: ViTMAEForPreTraining, image_size: int) -> bool:
    """Whether inputs of ``image_size`` need the checkpoint's position embeddings interpolated."""
    return model.config.image_size != image_size


def mask_noise(batch: int, num_patches: int, *, generator: torch.Generator) -> torch.Tensor:
    """ViT-MAE's masking noise (the lowest ``1 - mask_ratio`` of each row are kept), drawn on the CPU generator so
    masks are the same on any device."""
    return torch.rand(batch, num_patches, generator=generator)


def num_patches(model: ViTMAEForPreTraining, image_size: int) -> int:
    return (image_size // model.config.patch_size) ** 2


# --------------------------------------------------------------------------- the picture


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Normalised model input ``[B, 3, S, S]`` back to grey in [0, 1] (the three channels hold the same face)."""
    return (x[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]).clamp(0, 1)


@torch.no_grad()
def reconstruction_picture(
    model: ViTMAEForPreTraining, pixels: torch.Tensor, *, noise: torch.Tensor, interpolate: bool = False
) -> np.ndarray:
    """A uint8 grey picture ``[4·S + 3, N·S + N − 1]``: rows of originals, masked inputs, reconstructions, and
    reconstructions with the visible patches pasted back, as the MAE paper shows them (1 px white gaps).

    With the per-patch normalised loss the model predicts each patch's shape, not its brightness; the picture puts
    each patch's own mean and spread back (as MAE's visualisation does), so only the masked patches' shapes are
    the model's.
    """
    was_training = model.training
    model.eval()
    out = model(pixel_values=pixels, noise=noise, interpolate_pos_encoding=interpolate)
    model.train(was_training)
    size = pixels.shape[-1]
    target = model.patchify(pixels, interpolate_pos_encoding=interpolate)
    predicted = out.logits
    if model.config.norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        predicted = predicted * (var + 1.0e-6) ** 0.5 + mean
    mask = out.mask.unsqueeze(-1)  # 1 = hidden from the encoder
    as_image = lambda patches: _grey(model.unpatchify(patches, (size, size)))  # noqa: E731
    visible = as_image_mask(1 - mask, model, size)
    rows = [
        _grey(pixels),
        _grey(pixels) * visible + 0.5 * (1 - visible),  # hidden patches mid-grey, as the encoder's input looks
        as_image(predicted),
        as_image(predicted * mask + target * (1 - mask)),
    ]
    gap = 1
    n = pixels.shape[0]
    canvas = np.full((4 * size + 3 * gap, n * size + (n - 1) * gap), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        images = (row.float().cpu().numpy() * 255).round().astype(np.uint8)
        for i, image in enumerate(images):
            y, x = r * (size + gap), i * (size + gap)
            canvas[y : y + size, x : x + size] = image
    return canvas


def as_image_mask(per_patch: torch.Tensor, model: ViTMAEForPreTraining, size: int) -> torch.Tensor:
    """A ``[B, L, 1]`` per-patch value spread over each patch's pixels: ``[B, S, S]``."""
    channels = model.config.patch_size**2 * model.config.num_channels
    return model.unpatchify(per_patch.expand(-1, -1, channels).contiguous(), (size, size))[:, 0]


# --------------------------------------------------------------------------- the output folder


def write_pretrained(weights: dict[str, torch.Tensor], config: dict[str, Any], folder: Path, *, marker: dict) -> None:
    """``save_pretrained`` of the pretraining model (encoder + decoder, as facebook/vit-mae-base is published) into
    the local ``folder``, with `MARKER_FILE` saying which run wrote it."""
    model = ViTMAEForPreTraining(ViTMAEConfig.from_dict(config))
    model.load_state_dict(weights)
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a bar for one file is noise in a job's log
    try:
        model.save_pretrained(folder)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=1, sort_keys=True))
