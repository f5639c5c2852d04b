"""The classifier: exact freezing, masking off, loading from folders / S3 / random, interpolated sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import ViTMAEForPreTraining

from ferdist.config import ModelConfig
from ferdist.errors import FerdistError
from ferdist.train.model import build_model, check_pretrained, random_backbone_config


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"pretrained": "random:tiny", "image_size": 32, "freeze_blocks": 2, **kw})


def test_trainable_parameters_are_exactly_the_unfrozen_blocks_norm_and_head() -> None:
    model = build_model(tiny_cfg(freeze_blocks=2), seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        n for n, _ in model.named_parameters() if n.startswith(("backbone.layers.", "backbone.layernorm", "head"))
    }
    expected -= {n for n in expected if n.startswith(("backbone.layers.0.", "backbone.layers.1."))}
    assert trainable == expected
    assert not any(p.requires_grad for p in model.backbone.embeddings.parameters())


def test_a_training_step_leaves_frozen_weights_bit_identical() -> None:
    model = build_model(tiny_cfg(), seed=0).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    opt.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} did not move"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


def test_frozen_prefix_builds_no_autograd_graph() -> None:
    model = build_model(tiny_cfg(freeze_blocks=2), seed=0).train()
    seen = {}
    for i in (1, 2):
        model.backbone.layers[i].register_forward_hook(lambda _m, _i, out, i=i: seen.__setitem__(i, out.requires_grad))
    model(torch.randn(2, 3, 32, 32))
    assert seen == {1: False, 2: True}


def test_masking_is_off_every_patch_kept_and_outputs_deterministic() -> None:
    model = build_model(tiny_cfg(), seed=0).eval()
    assert model.backbone.config.mask_ratio == 0.0
    lengths = []
    model.backbone.layers[0].register_forward_hook(lambda _m, _i, out: lengths.append(out.shape[1]))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert lengths[0] == (32 // 8) ** 2 + 1  # 16 patches of 8 px + CLS
    assert torch.equal(a, b)


def test_mean_pooling_and_model_overfits_one_batch() -> None:
    """Catches model.pooling=mean silently using the CLS token: the logits must be the head of the mean of the patch
    tokens of the backbone's own (Hugging Face) forward pass, not of its CLS token."""
    torch.manual_seed(0)
    reference = build_model(tiny_cfg(pooling="mean", freeze_blocks=0), seed=0).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        tokens = reference.backbone(pixel_values=x, noise=torch.arange(16).expand(4, -1)).last_hidden_state
        assert tokens.shape == (4, 17, reference.backbone.config.hidden_size)  # CLS + 16 patches, none masked
        by_mean, by_cls = reference.head(tokens[:, 1:].mean(dim=1)), reference.head(tokens[:, 0])
        logits = reference(x)
    torch.testing.assert_close(logits, by_mean, rtol=1e-5, atol=1e-6)
    assert (logits - by_cls).abs().max() > 1e-3
    model = build_model(tiny_cfg(pooling="mean", freeze_blocks=0), seed=0).train()
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 7
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def save_pretraining_checkpoint(folder: Path, image_size: int = 32) -> ViTMAEForPreTraining:
    """A randomly initialised ViTMAEForPreTraining saved the way facebook/vit-mae-base is published."""
    torch.manual_seed(1)
    full = ViTMAEForPreTraining(random_backbone_config("tiny", image_size=image_size))
    full.save_pretrained(folder)
    return full


def test_loads_a_save_pretrained_folder_with_its_weights(tmp_path: Path) -> None:
    full = save_pretraining_checkpoint(tmp_path / "mae")
    model = build_model(ModelConfig(pretrained=str(tmp_path / "mae"), image_size=32), seed=0)
    assert model.backbone.config.mask_ratio == 0.0
    assert torch.equal(model.backbone.layers[3].mlp.fc1.weight, full.vit.layers[3].mlp.fc1.weight)
    assert torch.equal(model.backbone.embeddings.cls_token, full.vit.embeddings.cls_token)


def test_other_image_sizes_interpolate_position_embeddings(tmp_path: Path) -> None:
    save_pretraining_checkpoint(tmp_path / "mae", image_size=32)
    model = build_model(ModelConfig(pretrained=str(tmp_path / "mae"), image_size=48), seed=0).eval()
    lengths = []
    model.backbone.layers[0].register_forward_hook(lambda _m, _i, out: lengths.append(out.shape[1]))
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 48, 48))
    assert lengths == [(48 // 8) ** 2 + 1] and torch.isfinite(logits).all()


def _embedded(model: torch.nn.Module, size: int) -> torch.Tensor:
    """The tokens the embeddings hand to the first block for a black image: the patch projection's bias plus the
    position embedding of every patch, and the CLS token plus its own."""
    out = []
    handle = model.backbone.embeddings.register_forward_hook(lambda _m, _i, o: out.append(o[0]))
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    handle.remove()
    return out[0][0]


def test_interpolated_position_embeddings_keep_the_checkpoints_values(tmp_path: Path) -> None:
    """Catches the position embeddings being lost, re-drawn or resized wrongly when a 32-px checkpoint runs at 48 px:
    same grid is the identity, the CLS embedding is kept, the patch grid is the checkpoint's, resized bicubically."""
    torch.manual_seed(1)
    full = ViTMAEForPreTraining(random_backbone_config("tiny", image_size=32))
    with torch.no_grad():  # transformers 5 leaves them at zero (see with_position_embeddings): give them values
        full.vit.embeddings.position_embeddings.normal_()
    full.save_pretrained(tmp_path / "mae")
    saved = full.vit.embeddings.position_embeddings.detach()[0]  # [1 + 16, dim], a 4x4 grid of patches
    cls = full.vit.embeddings.cls_token.detach()[0, 0]
    bias = full.vit.embeddings.patch_embeddings.projection.bias.detach()
    dim = saved.shape[1]

    same = _embedded(build_model(ModelConfig(pretrained=str(tmp_path / "mae"), image_size=32), seed=0).eval(), 32)
    torch.testing.assert_close(same[0], cls + saved[0])
    torch.testing.assert_close(same[1:], bias + saved[1:])  # the same grid: the checkpoint's values as they are

    bigger = _embedded(build_model(ModelConfig(pretrained=str(tmp_path / "mae"), image_size=48), seed=0).eval(), 48)
    grid = saved[1:].reshape(1, 4, 4, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(36, dim)
    assert bigger.shape == (37, dim)
    torch.testing.assert_close(bigger[0], cls + saved[0])  # the CLS position embedding is not interpolated
    torch.testing.assert_close(bigger[1:], bias + resized, rtol=1e-5, atol=1e-5)


def test_loads_from_an_s3_prefix(tmp_path: Path, s3: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    endpoint, bucket = s3
    full = save_pretraining_checkpoint(tmp_path / "mae")
    client = boto3.client("s3", endpoint_url=endpoint)
    for f in (tmp_path / "mae").iterdir():
        client.upload_file(str(f), bucket, f"models/mae/{f.name}")
    monkeypatch.setenv("FERDIST_CACHE", str(tmp_path / "cache"))
    cfg = ModelConfig(pretrained=f"s3://{bucket}/models/mae", image_size=32)
    check_pretrained(cfg, endpoint_url=endpoint)
    model = build_model(cfg, seed=0, endpoint_url=endpoint)
    assert torch.equal(model.backbone.layers[5].attention.q_proj.weight, full.vit.layers[5].attention.q_proj.weight)


def test_unavailable_sources_get_one_sentence_naming_the_alternatives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    # As on a machine without internet, minus the ~25 s of connection retries (the flag is read at import time).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FerdistError) as info:
        check_pretrained(ModelConfig(pretrained="facebook/vit-mae-base-not-cached"))
    assert "random:tiny" in str(info.value) and "model.pretrained=DIR" in str(info.value)
    assert "hf download facebook/vit-mae-base-not-cached --local-dir DIR" in str(info.value)  # the Hub's own CLI
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    from conftest import free_port

    # A Hub that does not answer (no internet): the cache is read at once, not after half a minute of retries.
    monkeypatch.setenv("HF_ENDPOINT", hub := f"http://127.0.0.1:{free_port()}")
    (tmp_path / "pretrained").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FerdistError) as info:
        check_pretrained(ModelConfig(pretrained="pretrained/mistyped"))  # a folder that is not there, or a Hub id
    assert str(info.value).startswith(f"cannot load pretrained weights 'pretrained/mistyped' (there is no folder "
                                      f"pretrained/mistyped here, and the Hub at {hub} cannot be reached and no copy "
                                      "is cached)")  # fmt: skip
    (tmp_path / "empty").mkdir()
    with pytest.raises(FerdistError, match="folder without config.json"):
        build_model(ModelConfig(pretrained=str(tmp_path / "empty")), seed=0)
    with pytest.raises(FerdistError, match="random:huge is unknown"):
        check_pretrained(ModelConfig(pretrained="random:huge"))
    with pytest.raises(FerdistError, match="not a multiple of random:tiny's patch size 8"):
        check_pretrained(ModelConfig(pretrained="random:tiny", image_size=36))
    with pytest.raises(FerdistError, match="exceeds the backbone's 6 blocks"):
        build_model(tiny_cfg(freeze_blocks=7), seed=0)


def test_checkpoints_that_are_not_usable_vit_maes_are_refused_from_their_config(
    tmp_path: Path, s3: tuple[str, str]
) -> None:
    """Another model's config.json loaded as a ViTMAEConfig would silently fill in ViT-MAE defaults."""
    import boto3

    for kind in ("vit", "bert"):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "config.json").write_text(json.dumps({"model_type": kind, "hidden_size": 64}))
        with pytest.raises(FerdistError, match=rf"is a '{kind}' model \(the model_type in its config.json\), not a "):
            check_pretrained(ModelConfig(pretrained=str(tmp_path / kind)))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "vit_mae", ')
    with pytest.raises(FerdistError, match="is not a valid JSON file.*re-save it with save_pretrained") as info:
        build_model(ModelConfig(pretrained=str(tmp_path / "broken")), seed=0)
    assert "internet" not in str(info.value)  # a local file, not a download
    # A checkpoint's patch size (8) must divide the fine-tuning image size too, before any worker starts, read from
    # config.json alone on S3 (the weights are not there to read).
    save_pretraining_checkpoint(tmp_path / "mae")
    endpoint, bucket = s3
    boto3.client("s3", endpoint_url=endpoint).upload_file(
        str(tmp_path / "mae" / "config.json"), bucket, "only-config/config.json"
    )
    for source in (str(tmp_path / "mae"), f"s3://{bucket}/only-config"):
        with pytest.raises(FerdistError, match=f"model.image_size=36 is not a multiple of {source}'s patch size 8"):
            check_pretrained(ModelConfig(pretrained=source, image_size=36), endpoint_url=endpoint)
    with pytest.raises(FerdistError, match="model.image_size=36 is not a multiple"):
        build_model(ModelConfig(pretrained=str(tmp_path / "mae"), image_size=36), seed=0)


def _tiny(*extra: str):  # noqa: ANN202
    from ferdist.config import load_config
    from ferdist.train.model import build_model

    cfg = load_config(None, ["model.pretrained=random:tiny", "model.image_size=32", "model.freeze_blocks=2", *extra])
    return build_model(cfg.model, seed=0).eval()


def test_sdpa_and_eager_attention_give_the_same_logits() -> None:
    sdpa, eager = _tiny("model.attention=sdpa"), _tiny("model.attention=eager")
    assert sdpa.backbone.config._attn_implementation == "sdpa"
    assert eager.backbone.config._attn_implementation == "eager"
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(sdpa(x), eager(x), atol=1e-5)


@pytest.mark.slow
def test_a_compiled_model_gives_the_eager_logits_and_gradients() -> None:
    model = _tiny()
    compiled = torch.compile(model)  # what loop.compile=default does (inductor, here on the CPU)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
    compiled(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(x).square().mean().backward()
    assert grads and all(torch.allclose(g, dict(model.named_parameters())[n].grad, atol=1e-5) for n, g in grads.items())


@pytest.mark.parametrize("geometry", ["tiny", "small"])
def test_a_random_backbone_knows_where_each_patch_is(geometry: str) -> None:
    # transformers 5 builds a ViT-MAE from a config with zero (frozen) position embeddings: swapping two patches of
    # the input then changes nothing, and neither training nor fine-tuning can ever learn the face's layout.
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    cfg = ModelConfig(pretrained=f"random:{geometry}", image_size=48, freeze_blocks=0)
    model = build_model(cfg, seed=0).eval()
    embeddings = model.backbone.embeddings
    grid = 48 // embeddings.patch_size
    width = embeddings.position_embeddings.shape[-1]
    expected = build_2d_sinusoidal_position_embedding(height=grid, width=grid, embed_dim=width, cls_token=True)
    half = expected.shape[-1] // 2  # MAE's published layout: the width half first
    assert torch.equal(embeddings.position_embeddings[0], torch.cat([expected[..., half:], expected[..., :half]], -1))
    assert embeddings.cls_token.abs().sum() > 0
    x = torch.randn(1, 3, 48, 48)
    p = embeddings.patch_size
    swapped = x.clone()
    swapped[..., :p, :p], swapped[..., -p:, -p:] = x[..., -p:, -p:], x[..., :p, :p]
    with torch.no_grad():
        assert not torch.allclose(model(x), model(swapped), atol=1e-4)
