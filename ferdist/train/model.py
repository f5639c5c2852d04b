"""The classifier: a Hugging Face ViT-MAE encoder (He et al., 2022, "Masked Autoencoders Are Scalable Vision
Learners") with a linear head, fine-tuned with its embeddings and first blocks frozen.

Two things differ from calling ``ViTMAEModel`` directly:

* Masking is off. ViT-MAE drops ``mask_ratio`` (0.75 by default) of the patches at random on *every* forward, in eval
  too; we load it with ``mask_ratio=0.0`` and pass an ordered ``noise`` so the patch order is the identity rather than
  a random permutation, which makes outputs bit-deterministic.
* The frozen prefix (embeddings + blocks ``0..freeze_blocks-1``) runs under ``torch.no_grad()``: no activations are
  kept for it, which is what makes freezing four of twelve blocks cheaper than training them. `set_frozen` moves the
  boundary (gradual unfreezing, as in ULMFiT: Howard & Ruder 2018).
* Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth"; DeiT and MAE fine-tune with it) is
  added to each block's residual branches, at a rate rising linearly with depth as timm's ViT does.

This module imports no Ray, torch.distributed or MLflow: distribution is applied from outside.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import nn
from transformers import ViTMAEConfig, ViTMAEModel
from transformers.utils import logging as transformers_logging

from ferdist import storage
from ferdist.config import ModelConfig
from ferdist.constants import FER_CLASSES
from ferdist.errors import FerdistError

log = logging.getLogger(__name__)

# Randomly initialised geometries: `tiny` is for tests and the CPU quick start; `small` is the one a CPU can
# MAE-pretrain on 48 px faces (jobs/pretrain.py; 6 px patches: an 8 x 8 grid, 16 patches visible at mask 0.75);
# `base` is ViT-B/16 as in facebook/vit-mae-base (for benchmarks without the weights).
RANDOM_GEOMETRIES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=96, num_hidden_layers=6, num_attention_heads=4, intermediate_size=192, patch_size=8),
    "small": dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512, patch_size=6),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16),
}


class DropPath(nn.Module):
    """Zeroes a residual branch for a random ``rate`` of the samples and scales the rest by 1 / (1 − rate), in
    training only. The mask comes from the global RNG, which the loop seeds per epoch and rank (as dropout's)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.rate:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def add_drop_path(backbone: ViTMAEModel, rate: float) -> None:
    """Puts `DropPath` after each block's dropout, which transformers applies to the attention and MLP branches just
    before their residual sums: block i of L drops at ``rate × i / (L − 1)``. Adds no weights (checkpoints keep their
    keys)."""
    layers = backbone.layers
    for i, layer in enumerate(layers):
        block_rate = rate * i / max(len(layers) - 1, 1)
        if block_rate:
            layer.dropout = nn.Sequential(layer.dropout, DropPath(block_rate))


class FerClassifier(nn.Module):
    """ViT-MAE encoder → pooled token → dropout → linear layer over the FER classes."""

    def __init__(
        self,
        backbone: ViTMAEModel,
        *,
        num_classes: int,
        freeze_blocks: int,
        pooling: str,
        head_dropout: float,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        check_depth(freeze_blocks, backbone.config.num_hidden_layers)
        self.backbone, self.freeze_blocks, self.pooling = backbone, freeze_blocks, pooling
        self.dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(backbone.config.hidden_size, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)  # as MAE's fine-tuning head (std 2e-5 there; 0.02 is timm)
        nn.init.zeros_(self.head.bias)
        if drop_path:
            add_drop_path(backbone, drop_path)
        # Parameters the backbone never trains (ViT-MAE's fixed sin-cos position embeddings), whatever is frozen.
        self._fixed = {name for name, p in self.named_parameters() if not p.requires_grad}
        self.set_frozen(freeze_blocks)

    def set_frozen(self, freeze_blocks: int) -> None:
        """Freezes the embeddings and the first ``freeze_blocks`` blocks and trains everything else (but the fixed
        position embeddings); the frozen prefix then runs without gradients and in eval mode."""
        check_depth(freeze_blocks, self.backbone.config.num_hidden_layers)
        self.freeze_blocks = freeze_blocks
        frozen = {id(p) for p in self.frozen_modules().parameters()}
        for name, p in self.named_parameters():
            p.requires_grad_(name not in self._fixed and id(p) not in frozen)
        self.train(self.training)

    def frozen_modules(self) -> nn.ModuleList:
        """The embeddings and the leading blocks that are not trained (empty when freeze_blocks is 0)."""
        if not self.freeze_blocks:
            return nn.ModuleList()
        return nn.ModuleList([self.backbone.embeddings, *self.backbone.layers[: self.freeze_blocks]])

    def train(self, mode: bool = True) -> FerClassifier:
        super().train(mode)
        self.frozen_modules().eval()  # frozen blocks behave as at inference (no dropout) whatever the mode
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for normalised images ``[B, 3, S, S]``."""
        embeddings = self.backbone.embeddings
        num_patches = (pixel_values.shape[-2] // embeddings.patch_embeddings.patch_size[0]) * (
            pixel_values.shape[-1] // embeddings.patch_embeddings.patch_size[1]
        )
        # argsort of an increasing "noise" is the identity: every patch kept, in order.
        order = torch.arange(num_patches, device=pixel_values.device).expand(pixel_values.shape[0], -1)
        resize = tuple(pixel_values.shape[-2:]) != tuple(embeddings.patch_embeddings.image_size)
        layers = self.backbone.layers
        with torch.no_grad() if self.freeze_blocks else nullcontext():
            hidden, _, _ = embeddings(pixel_values, noise=order, interpolate_pos_encoding=resize)
            for layer in layers[: self.freeze_blocks]:
                hidden = layer(hidden)
        for layer in layers[self.freeze_blocks :]:
            hidden = layer(hidden)
        hidden = self.backbone.layernorm(hidden)
        pooled = hidden[:, 0] if self.pooling == "cls" else hidden[:, 1:].mean(dim=1)
        return self.head(self.dropout(pooled))


def build_model(cfg: ModelConfig, *, seed: int, endpoint_url: str | None = None) -> FerClassifier:
    """The classifier with its backbone from ``cfg.pretrained``; random parts are initialised from ``seed``."""
    torch.manual_seed(seed)
    return classifier_on(load_backbone(cfg, endpoint_url=endpoint_url), cfg)


def build_model_from_config(backbone_config: dict[str, Any], cfg: ModelConfig) -> FerClassifier:
    """The classifier's architecture (weights uninitialised in meaning) for loading a checkpoint into."""
    config = ViTMAEConfig(**{**backbone_config, "mask_ratio": 0.0})
    config._attn_implementation = cfg.attention
    return classifier_on(ViTMAEModel(config), cfg)


def classifier_on(backbone: ViTMAEModel, cfg: ModelConfig) -> FerClassifier:
    """The FER head, pooling and freezing of ``cfg`` around ``backbone``."""
    return FerClassifier(
        backbone,
        num_classes=len(FER_CLASSES),
        freeze_blocks=cfg.freeze_blocks,
        pooling=cfg.pooling,
        head_dropout=cfg.head_dropout,
        drop_path=cfg.drop_path,
    )


def with_position_embeddings(model: nn.Module) -> nn.Module:
    """``model`` (a randomly initialised ViTMAEModel, ViTMAEForPreTraining or its decoder) with MAE's fixed 2-D
    sin-cos position embeddings, and its CLS and mask tokens drawn as MAE draws them (normal, std 0.02).

    transformers 5 (5.9 to 5.24 at least) leaves all four at zero when it builds a ViT-MAE from a config: the
    encoder's ``initialize_weights`` returns early once the patch projection is marked initialised, and the decoder's
    are zeroed. The position embeddings are frozen, so they stay zero: every patch looks the same wherever it is,
    and the model is a bag of patches. A masked autoencoder then cannot learn which patch to reconstruct (its loss
    stalls at about 0.77 on FER2013), and a classifier loses the face's layout. Checkpoints carry their own values;
    this is for random starts only.
    """
    from transformers.models.vit_mae import modeling_vit_mae as hf

    for module in model.modules():
        if isinstance(module, hf.ViTMAEEmbeddings):
            # The guard is meant for weights about to be loaded; here nothing will be.
            module.patch_embeddings.projection._is_hf_initialized = False
            module.initialize_weights()
        elif isinstance(module, hf.ViTMAEDecoder):
            module.initialize_weights(module.decoder_pos_embed.shape[1] - 1)
    return model


def random_backbone_config(name: str, *, image_size: int) -> ViTMAEConfig:
    """The ViTMAEConfig of ``random:<name>`` at ``image_size``."""
    if name not in RANDOM_GEOMETRIES:
        raise FerdistError(
            f"model.pretrained=random:{name} is unknown; use " + ", ".join(f"random:{g}" for g in RANDOM_GEOMETRIES)
        )
    geometry = RANDOM_GEOMETRIES[name]
    check_patch_divides(image_size, geometry["patch_size"], source=f"random:{name}")
    return ViTMAEConfig(**geometry, image_size=image_size, mask_ratio=0.0)


def check_patch_divides(image_size: int, patch_size: int, *, source: str) -> None:
    """A face of ``image_size`` must be whole patches: a remainder would be cut off by the patch projection."""
    if image_size % patch_size:
        raise FerdistError(
            f"model.image_size={image_size} is not a multiple of {source}'s patch size {patch_size}; "
            f"use a multiple of {patch_size}"
        )


def load_backbone(cfg: ModelConfig, *, endpoint_url: str | None = None) -> ViTMAEModel:
    """The ViT-MAE encoder from a Hugging Face id, a local folder, an s3:// prefix or ``random:<geometry>``.

    Raises:
        FerdistError: the source cannot be found or read, in one sentence naming the alternatives.
    """
    source = cfg.pretrained
    if source.startswith("random:"):
        config = random_backbone_config(source.removeprefix("random:"), image_size=cfg.image_size)
        config._attn_implementation = cfg.attention
        return with_position_embeddings(ViTMAEModel(config))
    if source.startswith("s3://"):
        source = str(cached_s3_folder(source, endpoint_url=endpoint_url))
    config = load_backbone_config(source, display=cfg.pretrained, image_size=cfg.image_size)
    backbone, missing = load_weights(ViTMAEModel, source, config=config, display=cfg.pretrained,
                                     attention=cfg.attention)  # fmt: skip
    if missing:
        raise_missing_encoder(cfg.pretrained, missing)
    # The weights were learnt at this size; other sizes run through interpolated position embeddings.
    if backbone.config.image_size != cfg.image_size:
        log.info(
            "backbone trained at %d px runs at %d px (position embeddings interpolated)",
            backbone.config.image_size,
            cfg.image_size,
        )
    return backbone


def load_weights(
    cls: type, source: str, *, config: ViTMAEConfig, display: str, attention: str
) -> tuple[Any, list[str]]:
    """``cls.from_pretrained`` (ViTMAEModel or ViTMAEForPreTraining) of the local folder or Hugging Face id
    ``source``; returns the model and the names of the weights the checkpoint lacked, sorted.

    Raises:
        FerdistError: the weights cannot be read.
    """
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    # The published checkpoints are ViTMAEForPreTraining: their decoder weights are expected to go unused by an
    # encoder, and the library's table of them would bury real problems, which the callers' checks report instead.
    # Its "Loading weights" bar is a line of noise in every worker's log.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(source, config=config, output_loading_info=True,
                                          attn_implementation=attention,
                                          local_files_only=hub_unreachable(source))  # fmt: skip
    except OSError as exn:
        raise FerdistError(
            f"cannot load the weights of model.pretrained={display!r} ({str(exn).splitlines()[0]}); "
            "re-download or re-save the checkpoint"
        ) from None
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()
    return model, sorted(info["missing_keys"])


def raise_missing_encoder(display: str, missing: list[str]) -> None:
    raise FerdistError(
        f"model.pretrained={display!r} has no weights for {len(missing)} encoder parameters (e.g. "
        f"{missing[0]}); point it at a ViT-MAE checkpoint (ViTMAEModel or ViTMAEForPreTraining)"
    )


def cached_s3_folder(uri: str, *, endpoint_url: str | None = None) -> Path:
    """The s3:// checkpoint prefix ``uri`` downloaded into ferdist's cache ($FERDIST_CACHE or ~/.cache/ferdist)."""
    root = Path(os.environ.get("FERDIST_CACHE", Path.home() / ".cache" / "ferdist"))
    folder = root / "pretrained" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    storage.download_prefix(uri, folder, endpoint_url=endpoint_url)
    return folder


def check_depth(freeze_blocks: int, depth: int) -> None:
    """The frozen prefix must fit in the backbone: the driver checks it from config.json before Ray starts (a worker
    would fail on every attempt), and the classifier again when it is built."""
    if freeze_blocks > depth:
        raise FerdistError(f"model.freeze_blocks={freeze_blocks} exceeds the backbone's {depth} blocks; use at most "
                           f"{depth} (0 trains every block)")  # fmt: skip


def check_pretrained(cfg: ModelConfig, *, endpoint_url: str | None = None) -> None:
    """Fails fast (before any worker starts) when ``cfg.pretrained`` cannot be loaded at ``cfg.image_size`` or has
    fewer blocks than ``cfg.freeze_blocks``; reads configs only."""
    source = cfg.pretrained
    if source.startswith("random:"):
        config = random_backbone_config(source.removeprefix("random:"), image_size=cfg.image_size)
    else:
        with config_folder(source, endpoint_url=endpoint_url) as local:
            config = load_backbone_config(local, display=source, image_size=cfg.image_size)
    check_depth(cfg.freeze_blocks, config.num_hidden_layers)  # model.unfreeze only releases from here: it fits too


@contextmanager
def config_folder(source: str, *, endpoint_url: str | None = None) -> Iterator[str]:
    """``source`` itself, or for an ``s3://`` prefix a temporary folder holding only its config.json: a driver checks
    the config on a node that may run no worker, without pulling ViT-B's 450 MB of weights."""
    if not source.startswith("s3://"):
        yield source
        return
    data = storage.read_bytes(storage.parse_uri(source).join("config.json").uri, endpoint_url=endpoint_url)
    with tempfile.TemporaryDirectory(prefix="ferdist-config-") as tmp:
        (Path(tmp) / "config.json").write_bytes(data)
        yield tmp


def hub_unreachable(source: str) -> bool:
    """Whether ``source`` is a Hugging Face id while the Hub cannot be reached from here (checked once, 5 s): then
    only its cached copy is read. Asked anyway, the Hub client retries for half a minute, printing each retry."""
    if Path(source).exists() or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    return not _hub_answers(hub_endpoint())


def hub_endpoint() -> str:
    """The Hugging Face Hub this process talks to (``HF_ENDPOINT``, as the Hub client reads it)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@functools.cache
def _hub_answers(endpoint: str) -> bool:
    import urllib.request

    parts = urlsplit(endpoint)
    if urllib.request.getproxies():  # reached through a proxy: only the Hub client's own requests can tell
        return True
    try:
        port = parts.port or (80 if parts.scheme == "http" else 443)
        with socket.create_connection((parts.hostname or "", port), timeout=5):
            return True
    except OSError:  # no route, no name resolution, refused, timed out
        return False


def load_backbone_config(source: str, *, display: str, image_size: int | None = None) -> ViTMAEConfig:
    """The ViTMAEConfig at a local folder or Hugging Face id, with masking off.

    Raises:
        FerdistError: no readable config there, a config of another kind of model, or (with ``image_size``) a patch
            size that does not divide ``image_size``.
    """
    if "://" in source:
        raise FerdistError(f"model.pretrained={display!r}: only s3:// URIs, local folders and Hugging Face ids work")
    local = Path(source).exists()
    if local and not Path(source).is_dir():
        raise FerdistError(f"model.pretrained={display!r} is a file; give the folder save_pretrained wrote "
                           "(config.json and the weights), a Hugging Face id, or random:tiny|small|base")  # fmt: skip
    if local and not (Path(source) / "config.json").is_file():
        raise FerdistError(
            f"model.pretrained={display!r} is a folder without config.json; write it with save_pretrained"
        )
    offline = hub_unreachable(source)
    try:
        values, _ = ViTMAEConfig.get_config_dict(source, local_files_only=offline)
    except OSError as exn:
        first = str(exn).splitlines()[0]
        if offline:
            first = f"the Hub at {hub_endpoint()} cannot be reached and no copy is cached"
        if local:
            raise FerdistError(
                f"cannot read model.pretrained={display!r} ({first}); re-save it with save_pretrained"
            ) from None
        # A missing local folder looks like a Hub id (org/name) too: say both, the user knows which was meant.
        first_part = Path(source.split("/", 1)[0]).expanduser()
        path_like = source.startswith((".", "/", "~")) or source.count("/") != 1 or first_part.is_dir()
        folder = f"there is no folder {source} here, and " if path_like else ""
        raise FerdistError(
            f"cannot load pretrained weights {display!r} ({folder}{first}); on a machine without internet download "
            f"them elsewhere (hf download {source} --local-dir DIR) and pass --set model.pretrained=DIR or "
            "s3://BUCKET/PREFIX, or use model.pretrained=random:tiny / random:base for a randomly initialised backbone"
        ) from None
    kind = values.get("model_type", ViTMAEConfig.model_type)  # a config without one cannot be told apart
    if kind != ViTMAEConfig.model_type:
        raise FerdistError(
            f"model.pretrained={display!r} is a {kind!r} model (the model_type in its config.json), not a ViT-MAE; "
            "point it at a ViT-MAE checkpoint such as facebook/vit-mae-base or a jobs/pretrain.py output"
        )
    config = ViTMAEConfig.from_dict(values, mask_ratio=0.0)
    if image_size is not None:
        check_patch_divides(image_size, config.patch_size, source=display)
    return config
