"""Fine-tuning regularisation: mixup and cutmix with soft targets, random erasing, rotation and shift inside the crop's
sampler, stochastic depth, the EMA of the weights; each checked against its definition, and a run with all of them on
resumes bit-identical."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sessions import CrashingSession

from ferdist.config import AugmentConfig, ModelConfig, PretrainConfig, RunConfig, load_config
from ferdist.data.mixing import Mix, augment_batch, draw_mix, mix_batch
from ferdist.data.transforms import (
    compose,
    crop_params,
    erase,
    erase_boxes,
    eval_transform,
    rotation_shift,
    to_model_input,
    train_transform,
)
from ferdist.errors import FerdistError
from ferdist.train.checkpoint import load_classifier
from ferdist.train.ema import averaged, ema_copy, update_ema
from ferdist.train.loop import LocalSession, classification_loss, run_training
from ferdist.train.model import DropPath, build_model

K = 7


def faces(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 48, 48), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- mixup, cutmix, soft targets


def test_mixup_is_the_convex_combination_with_the_reversed_batch_by_the_drawn_lambda() -> None:
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 6])
    mix = draw_mix(AugmentConfig(mixup=0.8), size=32, generator=rng(3))
    assert mix.kind == "mixup" and 0 < mix.lam < 1 and mix.box is None
    out, targets = mix_batch(x, labels, mix, num_classes=K)
    # λ read back from the pixels of every face is the λ of the targets.
    lam = (out - x.flip(0)) / (x - x.flip(0))
    assert torch.allclose(lam, torch.full_like(lam, mix.lam))
    one_hot = F.one_hot(labels, K).double()
    assert torch.equal(targets, mix.lam * one_hot + (1 - mix.lam) * one_hot.flip(0))
    assert torch.allclose(targets.sum(1), torch.ones(6, dtype=torch.float64))


def test_cutmix_pastes_exactly_its_box_and_mixes_the_targets_by_the_box_area() -> None:
    x = torch.randn(6, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3, 4, 6])
    for seed in range(8):
        mix = draw_mix(AugmentConfig(cutmix=1.0), size=32, generator=rng(seed))
        assert mix.kind == "cutmix" and mix.box is not None
        out, targets = mix_batch(x, labels, mix, num_classes=K)
        top, left, height, width = mix.box
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[top : top + height, left : left + width] = True
        assert torch.equal(out[..., inside], x.flip(0)[..., inside]) and torch.equal(out[..., ~inside], x[..., ~inside])
        assert mix.lam == pytest.approx(1 - height * width / 32**2)  # λ corrected to the area actually kept
        expected = mix.lam * F.one_hot(labels, K) + (1 - mix.lam) * F.one_hot(labels.flip(0), K)
        assert torch.allclose(targets, expected.float())


def test_mix_probability_and_switch_choose_what_a_batch_gets() -> None:
    assert {draw_mix(AugmentConfig(mixup=1.0, mix_prob=0.0), size=8, generator=rng(s)).kind for s in range(20)} == {
        "none"
    }
    both = AugmentConfig(mixup=1.0, cutmix=1.0)
    kinds = [draw_mix(both, size=8, generator=rng(s)).kind for s in range(40)]
    assert set(kinds) == {"mixup", "cutmix"}
    assert {draw_mix(AugmentConfig(mixup=1.0, cutmix=1.0, mix_switch=1.0), size=8, generator=rng(s)).kind
            for s in range(20)} == {"cutmix"}  # fmt: skip
    half = [draw_mix(AugmentConfig(mixup=1.0, mix_prob=0.5), size=8, generator=rng(s)).kind for s in range(200)]
    assert 0.35 < half.count("none") / 200 < 0.65


def test_with_mixing_off_a_batch_is_exactly_the_plain_transform_with_its_labels() -> None:
    images, labels = faces(), torch.arange(6)
    inputs, targets = augment_batch(images, labels, AugmentConfig(), image_size=32, num_classes=K, generator=rng(5))
    assert torch.equal(inputs, train_transform(images, AugmentConfig(), image_size=32, generator=rng(5)))
    assert targets is labels


def test_the_loss_takes_soft_targets_smoothing_the_one_hot_labels_before_they_are_mixed() -> None:
    logits = torch.randn(6, K, generator=rng(1), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 6])
    mix = Mix("mixup", 0.3)
    _, targets = mix_batch(torch.zeros(6, 3, 4, 4, dtype=torch.float64), labels, mix, num_classes=K)
    s = 0.1

    def smooth(y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, K).double() * (1 - s) + s / K

    mixed_smoothed = 0.3 * smooth(labels) + 0.7 * smooth(labels.flip(0))
    by_hand = -(mixed_smoothed * logits.log_softmax(1)).sum(1)
    assert classification_loss(logits, targets, weights=None, label_smoothing=s).item() == pytest.approx(
        by_hand.mean().item(), rel=1e-12
    )
    # Class weights: a mixed sample weighs the same mix of its two classes' weights.
    w = torch.arange(1.0, K + 1, dtype=torch.float64)
    per = 0.3 * w[labels] + 0.7 * w[labels.flip(0)]
    assert classification_loss(logits, targets, weights=w, label_smoothing=s).item() == pytest.approx(
        ((by_hand * per).sum() / per.sum()).item(), rel=1e-12
    )
    # A one-hot target is the class index.
    one_hot = F.one_hot(labels, K).double()
    for weights in (None, w):
        assert classification_loss(logits, one_hot, weights=weights, label_smoothing=s).item() == pytest.approx(
            classification_loss(logits, labels, weights=weights, label_smoothing=s).item(), rel=1e-12
        )


# --------------------------------------------------------------------------- random erasing


def test_random_erasing_sets_exactly_its_rectangle_to_the_mean_and_nothing_else() -> None:
    cfg = AugmentConfig(erase=1.0, erase_area_min=0.1, erase_area_max=0.2)
    boxes = erase_boxes(6, 32, cfg, generator=rng(2))
    x = torch.randn(6, 3, 32, 32) + 5  # no pixel is 0 before
    out = erase(x, boxes)
    for i, (top, left, height, width) in enumerate(boxes.tolist()):
        changed = (out[i] != x[i]).all(0)
        assert int(changed.sum()) == height * width  # exactly the stated area changed
        assert changed[top : top + height, left : left + width].all() and (out[i][:, changed] == 0).all()
        # The area drawn in [0.1, 0.2] of the image, up to rounding each side to whole pixels.
        assert 0.1 - (height + width) / 32**2 <= height * width / 32**2 <= 0.2 + (height + width + 1) / 32**2


def test_random_erasing_in_the_transform_follows_its_probability_and_leaves_the_rest_exact() -> None:
    images = faces(64)
    plain = train_transform(images, AugmentConfig(), image_size=32, generator=rng(4))
    erased = train_transform(images, AugmentConfig(erase=0.5), image_size=32, generator=rng(4))
    changed = (plain != erased).flatten(1).any(1)
    assert 16 < int(changed.sum()) < 48  # about half the faces
    assert torch.equal(plain[~changed], erased[~changed])
    assert torch.equal(train_transform(images, AugmentConfig(erase=0.0), image_size=32, generator=rng(4)), plain)


# --------------------------------------------------------------------------- rotation and shift in the affine sampler


def _crop_params_before_rotation(batch: int, cfg: AugmentConfig, *, generator: torch.Generator) -> torch.Tensor:
    """crop_params as it was before rotation and shift existed (a copy, so the default path is pinned)."""
    u = torch.rand(batch, 5, generator=generator, dtype=torch.float64)
    area = cfg.crop_scale + (1.0 - cfg.crop_scale) * u[:, 0]
    ratio = torch.exp((2 * u[:, 1] - 1) * math.log(cfg.crop_ratio))
    width, height = torch.sqrt(area * ratio).clamp(max=1.0), torch.sqrt(area / ratio).clamp(max=1.0)
    cx, cy = (2 * u[:, 2] - 1) * (1 - width), (2 * u[:, 3] - 1) * (1 - height)
    flip = torch.where(u[:, 4] < cfg.hflip, -1.0, 1.0).to(torch.float64)
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    return theta.float()


def test_rotation_0_and_shift_0_are_todays_transform_exactly() -> None:
    images = faces(8)
    cfg = AugmentConfig(rotate=0.0, translate=0.0)
    assert torch.equal(crop_params(8, cfg, generator=rng(7)), _crop_params_before_rotation(8, cfg, generator=rng(7)))
    today = to_model_input(images, image_size=32, theta=_crop_params_before_rotation(8, cfg, generator=rng(7)))
    assert torch.equal(train_transform(images, cfg, image_size=32, generator=rng(7)), today)


def test_a_90_degree_turn_of_a_square_face_is_rot90() -> None:
    images = faces()
    theta = rotation_shift(torch.full((6,), 90.0), torch.zeros(6, 2)).float()
    turned = to_model_input(images, image_size=48, theta=theta)
    assert torch.allclose(turned, eval_transform(images.rot90(1, dims=(-2, -1)), image_size=48), atol=1e-5)


def test_a_shift_moves_the_face_by_that_fraction_of_its_side() -> None:
    images = faces()
    theta = rotation_shift(torch.zeros(6), torch.tensor([[0.125, -0.25]] * 6)).float()  # 6 px right, 12 px up
    moved = to_model_input(images, image_size=48, theta=theta)
    assert torch.allclose(moved[..., :36, 6:], eval_transform(images, image_size=48)[..., 12:, :42], atol=1e-5)


def test_turn_and_shift_compose_after_the_crop_in_one_sampling() -> None:
    images = faces()
    cfg = AugmentConfig(rotate=30.0, translate=0.1)
    theta = crop_params(6, cfg, generator=rng(9))
    # The same crop draws first, then the turn's and shift's own.
    g = rng(9)
    crop = _crop_params_before_rotation(6, cfg, generator=g).double()
    v = torch.rand(6, 3, generator=g, dtype=torch.float64)
    degrees, shift = (2 * v[:, 0] - 1) * 30.0, (2 * v[:, 1:] - 1) * 0.1
    assert degrees.abs().max() <= 30 and shift.abs().max() <= 0.1 and degrees.std() > 1
    assert torch.allclose(theta, compose(crop, rotation_shift(degrees, shift)).float())
    # One sampling of crop-then-turn equals cropping and then turning the crop (a quarter turn moves whole pixels).
    crop_then_turn = compose(crop, rotation_shift(torch.full((6,), 90.0), torch.zeros(6, 2))).float()
    cropped = to_model_input(images, image_size=48, theta=crop.float())
    assert torch.allclose(to_model_input(images, image_size=48, theta=crop_then_turn),
                          cropped.rot90(1, dims=(-2, -1)), atol=1e-4)  # fmt: skip


# --------------------------------------------------------------------------- stochastic depth


def _tiny(**kw: object) -> ModelConfig:
    return ModelConfig(pretrained="random:tiny", image_size=32, freeze_blocks=0, **kw)  # type: ignore[arg-type]


def test_drop_path_rises_linearly_is_off_in_eval_and_changes_training_outputs() -> None:
    plain, dropping = build_model(_tiny(), seed=0), build_model(_tiny(drop_path=0.3), seed=0)
    rates = [m.rate for m in dropping.modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx([0.3 * i / 5 for i in range(1, 6)])  # block 0 drops nothing
    assert plain.state_dict().keys() == dropping.state_dict().keys()
    x = torch.randn(8, 3, 32, 32, generator=rng(0))
    plain.eval(), dropping.eval()
    assert torch.equal(plain(x), dropping(x))  # eval logits unchanged by it
    plain.train(), dropping.train()
    torch.manual_seed(1)
    a = dropping(x)
    torch.manual_seed(1)
    assert torch.equal(a, dropping(x))  # seeded like dropout
    assert not torch.allclose(a, plain(x))
    # Each sample keeps or drops a whole branch: the survivors are scaled by 1 / (1 - rate).
    torch.manual_seed(0)
    out = DropPath(0.5).train()(torch.ones(1000, 4, 2))
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0} and (per_sample == per_sample[:, :1]).all()


# --------------------------------------------------------------------------- EMA of the weights


def test_the_ema_is_the_hand_computed_average_after_each_step() -> None:
    model = build_model(_tiny(), seed=0)
    ema = ema_copy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    ema_params = averaged(ema, model, params)
    decay = 0.9
    expected = [p.detach().double().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.1)
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=rng(step))
        optimizer.step()
        update_ema(ema_params, params, decay=decay)
        expected = [decay * e + (1 - decay) * p.detach().double() for e, p in zip(expected, params, strict=True)]
    for e, mine in zip(expected, ema_params, strict=True):
        assert torch.allclose(mine.double(), e, atol=1e-6)
    assert not torch.allclose(ema_params[-1], params[-1])
    # A parameter that never changes keeps an average equal to it, bit for bit.
    frozen = torch.randn(5)
    average = frozen.clone()
    update_ema([average], [frozen], decay=0.9998)
    assert torch.equal(average, frozen)


def tiny_run(manifest: Path, *extra: str) -> RunConfig:
    return load_config(None, [f"data.manifest={manifest}", "data.loader_workers=1", "model.pretrained=random:tiny",
                              "model.image_size=32", "model.freeze_blocks=2", "model.head_dropout=0.1",
                              "optim.lr=2e-3", "optim.warmup_epochs=1", "loop.epochs=4", "loop.global_batch_size=32",
                              "tracking.backend=none", *extra])  # fmt: skip


def without_perf(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in history]


ALL_ON = ("augment.mixup=0.8", "augment.cutmix=1.0", "augment.erase=0.25", "augment.rotate=10", "augment.translate=0.1",
          "model.drop_path=0.1", "optim.ema_decay=0.9", "checkpoint.best_weights=ema", "optim.layer_decay=0.75",
          "optim.class_weights=inverse_frequency")  # fmt: skip


def test_a_run_with_every_regulariser_on_resumes_bit_identical_with_its_ema(synth_shards: Path, tmp_path: Path) -> None:
    cfg = tiny_run(synth_shards, "checkpoint.every_epochs=2", *ALL_ON)
    clean = run_training(cfg, LocalSession(tmp_path / "clean"))
    with pytest.raises(RuntimeError, match="worker lost"):
        run_training(cfg, CrashingSession(tmp_path / "crashed", crash_after=3))
    # Epoch 2's resume state holds the EMA of exactly the trained weights; the best model saved is the EMA itself,
    # with the EMA's scores as its val/* (what evaluate.py and the registry read).
    saved = torch.load(tmp_path / "crashed" / "checkpoint_epoch_0002" / "train_state.pt", weights_only=True)
    trained = torch.load(tmp_path / "crashed" / "checkpoint_epoch_0002" / "trained.pt", weights_only=True)
    assert saved["ema"].keys() == trained.keys()
    assert any(not torch.equal(saved["ema"][k], trained[k]) for k in trained)
    resumed = run_training(cfg, LocalSession(tmp_path / "crashed"))

    assert resumed.resumed_at == [2]
    assert without_perf(resumed.history) == without_perf(clean.history)
    assert all("val_ema/acc" in m and "val_ema/loss" in m for m in clean.history)
    assert clean.history[-1]["best/score"] == max(m["val_ema/acc"] for m in clean.history)
    end = [torch.load(tmp_path / run / "checkpoint_epoch_0004" / "train_state.pt", weights_only=True)["ema"]
           for run in ("clean", "crashed")]  # fmt: skip
    assert end[0].keys() == end[1].keys() and all(torch.equal(v, end[1][k]) for k, v in end[0].items())
    for model_dir in (tmp_path / "clean").glob("model_epoch_*"):
        import json

        summary = json.loads((model_dir / "summary.json").read_text())
        epoch = summary["epoch"]
        assert summary["metrics"]["val/acc"] == clean.history[epoch - 1]["val_ema/acc"]
        if epoch == 4:  # the EMA at the last epoch is also in the resume state
            weights, _ = load_classifier(model_dir)
            assert all(torch.equal(weights.state_dict()[k], v) for k, v in end[0].items())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("augment.mixup=-0.2", "augment.mixup must be in (0, 100] (the Beta distribution's alpha; MAE uses 0.8 and "
                               "1.0), or 0 for off, got -0.2"),
        ("augment.cutmix=-1", "augment.cutmix must be in (0, 100] (the Beta distribution's alpha; MAE uses 0.8 and "
                              "1.0), or 0 for off, got -1.0"),
        ("augment.mixup=1e308", "augment.mixup must be in (0, 100]"),
        ("augment.cutmix=100.5", "augment.cutmix must be in (0, 100]"),
        ("augment.mix_prob=1.5", "augment.mix_prob must be a probability in [0, 1], got 1.5"),
        ("augment.mix_switch=-0.1", "augment.mix_switch must be a probability in [0, 1], got -0.1"),
        ("augment.erase=2", "augment.erase must be a probability in [0, 1], got 2.0"),
        ("augment.erase_area_max=1.0", "augment.erase_area_min and erase_area_max must satisfy 0 < min <= max < 1"),
        ("augment.rotate=200", "augment.rotate must be in [0, 180] degrees, got 200.0"),
        ("augment.translate=0.7", "augment.translate must be in [0, 0.5] of the side, got 0.7"),
        ("optim.ema_decay=1.0", "optim.ema_decay must be in (0, 1), e.g. 0.9998, or none for no EMA, got 1.0"),
        ("optim.ema_decay=0", "optim.ema_decay must be in (0, 1)"),
        ("model.drop_path=1.0", "model.drop_path must be in [0, 1), got 1.0"),
        ("checkpoint.best_weights=ema", "checkpoint.best_weights=ema needs optim.ema_decay (the EMA it picks by)"),
    ],
)
def test_bad_regularisation_settings_are_one_sentence(override: str, message: str) -> None:
    with pytest.raises(FerdistError, match=re.escape(f"command line: {message}")):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["augment.mixup=0.8", "augment.erase=0.25", "optim.ema_decay=0.999"])
def test_pretraining_refuses_the_fine_tuning_regularisers(override: str) -> None:
    with pytest.raises(FerdistError, match=rf"{re.escape(override.split('=')[0])} is a fine-tuning setting"):
        load_config(None, [override], root=PretrainConfig)
    assert load_config(None, ["augment.rotate=10"], root=PretrainConfig).augment.rotate == 10.0
