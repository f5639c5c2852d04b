"""The per-worker loop run in one process (no Ray): steps, metrics, checkpoints, and resume that changes nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sessions import CrashingSession

from ferdist.config import RunConfig, load_config
from ferdist.data.loader import build_loader, open_dataset
from ferdist.errors import FerdistError
from ferdist.train.checkpoint import Snapshot, load_classifier, read_history
from ferdist.train.loop import LocalSession, class_weights, classification_loss, evaluate, run_training


def tiny_run(manifest: Path, *extra: str) -> RunConfig:
    return load_config(
        None,
        [
            f"data.manifest={manifest}",
            "data.loader_workers=1",
            "model.pretrained=random:tiny",
            "model.image_size=32",
            "model.freeze_blocks=2",
            "model.head_dropout=0.1",  # dropout exercises the seeded global RNG on resume
            "optim.lr=2e-3",
            "optim.warmup_epochs=1",
            "loop.epochs=4",
            "loop.global_batch_size=32",
            "tracking.backend=none",
            *extra,
        ],
    )


def without_perf(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in history]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    model, _ = load_classifier(directory)
    return model.state_dict()


def test_killed_between_resume_points_resumes_from_the_last_one_and_ends_bit_identical(
    synth_shards: Path, tmp_path: Path
) -> None:
    cfg = tiny_run(synth_shards, "checkpoint.every_epochs=2")
    clean = run_training(cfg, LocalSession(tmp_path / "clean"))

    # Epoch 3 is not a resume point: the restart goes back to epoch 2's state and trains epoch 3 again.
    with pytest.raises(RuntimeError, match="worker lost"):
        run_training(cfg, CrashingSession(tmp_path / "crashed", crash_after=3))
    resumed = run_training(cfg, LocalSession(tmp_path / "crashed"))

    assert resumed.resumed_at == [2]
    assert [m["epoch"] for m in resumed.history] == [1, 2, 3, 4]  # no epoch lost or repeated
    steps = 280 // 32
    assert [m["step"] for m in resumed.history] == [steps * e for e in (1, 2, 3, 4)]
    assert without_perf(resumed.history) == without_perf(clean.history)  # same losses, LRs and val metrics
    a = _weights(tmp_path / "clean" / "checkpoint_epoch_0004")
    b = _weights(tmp_path / "crashed" / "checkpoint_epoch_0004")
    assert all(torch.equal(x, b[k]) for k, x in a.items())
    # Resume state is slim: the frozen blocks are rebuilt from model.pretrained, not written.
    trained = torch.load(tmp_path / "clean" / "checkpoint_epoch_0004" / "trained.pt", weights_only=True)
    assert not any(k.startswith(("backbone.embeddings.", "backbone.layers.0.", "backbone.layers.1.")) for k in trained)
    assert any(k.startswith("backbone.layers.2.") for k in trained) and "head.weight" in trained
    # Retention: the newest resume state, and the best two models.
    resume = sorted(p.name for p in (tmp_path / "clean").iterdir() if p.name.startswith("checkpoint_"))
    assert resume == ["checkpoint_epoch_0004"]
    models = sorted(p.name for p in (tmp_path / "clean").iterdir() if p.name.startswith("model_"))
    improving, best = [], -1.0  # a model is written when val/acc improves strictly; the best two stay
    for m in clean.history:
        if m["val/acc"] > best:
            improving.append(m)
            best = m["val/acc"]
    ranked = sorted(improving, key=lambda m: (-m["val/acc"], m["epoch"]))
    assert models == sorted(f"model_epoch_{m['epoch']:04d}" for m in ranked[:2])


def test_run_restored_after_its_last_epoch_reports_its_final_metrics(synth_shards: Path, tmp_path: Path) -> None:
    """A sweep resumed after its driver died restarts trials that had already finished: they train nothing but must
    still report, or Tune sees a trial end without its metric."""

    class Recording(LocalSession):
        reports: list[dict[str, float]] = []

        def report(self, metrics: dict[str, float], resume: Snapshot | None, *, mode: str) -> None:
            self.reports.append(metrics)
            super().report(metrics, resume, mode=mode)

    cfg = tiny_run(synth_shards, "loop.epochs=1")
    done = run_training(cfg, LocalSession(tmp_path))
    again = Recording(tmp_path)
    state = run_training(cfg, again)
    assert state.resumed_at == [1] and len(again.reports) == 1
    assert again.reports[0]["epoch"] == 1 and again.reports[0]["val/acc"] == done.history[-1]["val/acc"]


def test_metrics_count_every_val_sample_and_the_lr_follows_the_schedule(synth_shards: Path, tmp_path: Path) -> None:
    cfg = tiny_run(synth_shards, "loop.epochs=2")
    state = run_training(cfg, LocalSession(tmp_path / "run"))
    last = state.history[-1]
    assert last["val/samples"] == 35
    # 8 steps an epoch, 8 warmup steps: the last step of epoch 1 runs at the peak, of epoch 2 at cosine 7/8 down.
    assert state.history[0]["train/lr"] == pytest.approx(2e-3)
    assert last["train/lr"] == pytest.approx(2e-3 * 0.5 * (1 + np.cos(np.pi * 7 / 8)))
    assert last["best/val_acc"] == max(m["val/acc"] for m in state.history)
    assert read_history(tmp_path / "run" / "checkpoint_epoch_0002").epochs_done == 2

    # Re-evaluating the saved model gives the metrics the run reported for that epoch.
    model, saved_cfg = load_classifier(tmp_path / "run" / "checkpoint_epoch_0002")
    assert saved_cfg == cfg
    val = evaluate(model, open_dataset(str(synth_shards)), cfg, split="val", rank=0, world_size=1,
                   device=torch.device("cpu"))  # fmt: skip
    assert val["acc"] == last["val/acc"] and val["loss"] == pytest.approx(last["val/loss"], rel=1e-6)


def test_the_best_epoch_is_kept_even_when_it_is_not_a_resume_point(synth_shards: Path, tmp_path: Path) -> None:
    cfg = tiny_run(synth_shards, "loop.epochs=4", "checkpoint.every_epochs=4", "checkpoint.keep=1",
                   "optim.lr=2e-2")  # fmt: skip  # a high LR makes val accuracy move up and down
    state = run_training(cfg, LocalSession(tmp_path / "run"))
    best = max(state.history, key=lambda m: (m["val/acc"], -m["epoch"]))
    (model_dir,) = (tmp_path / "run").glob("model_epoch_*")
    assert model_dir.name == f"model_epoch_{best['epoch']:04d}"
    model, _ = load_classifier(model_dir)  # self-contained: every weight is in model.pt
    val = evaluate(model, open_dataset(str(synth_shards)), cfg, split="val", rank=0, world_size=1,
                   device=torch.device("cpu"))  # fmt: skip
    assert val["acc"] == best["val/acc"] and val["macro_f1"] == best["val/macro_f1"]
    assert state.history[-1]["best/epoch"] == best["epoch"]


def test_eval_every_skips_val_between_and_always_evaluates_the_last_epoch(synth_shards: Path, tmp_path: Path) -> None:
    cfg = tiny_run(synth_shards, "loop.epochs=3", "loop.eval_every=2")
    state = run_training(cfg, LocalSession(tmp_path / "run"))
    assert ["val/acc" in m for m in state.history] == [False, True, True]
    assert "best/epoch" not in state.history[0] and state.history[1]["best/epoch"] in (2,)
    # Catches no model at all, or a model from an epoch without validation (the old `<=` compared lists
    # alphabetically): exactly epoch 2's model, plus epoch 3's only if epoch 3 improved on it (keep=2 prunes none).
    expected = ["model_epoch_0002"] + (["model_epoch_0003"] if state.history[2]["best/epoch"] == 3 else [])
    assert sorted(p.name for p in (tmp_path / "run").glob("model_epoch_*")) == expected


def test_missing_manifest_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(FerdistError, match=r"no manifest at .*; shard the data there first"):
        run_training(tiny_run(tmp_path / "nowhere"), LocalSession(tmp_path / "run"))


def test_inverse_frequency_class_weights() -> None:
    w = class_weights([10, 0, 30, 20, 20, 10, 10], "inverse_frequency", device=torch.device("cpu"))
    assert w is not None
    assert w.tolist() == pytest.approx([100 / 70, 0.0, 100 / 210, 100 / 140, 100 / 140, 100 / 70, 100 / 70])
    assert class_weights([1] * 7, "none", device=torch.device("cpu")) is None


FER2013_TRAIN_COUNTS = [3995, 436, 4097, 7215, 4830, 3171, 4965]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_class_weighted_loss_leaves_an_unsure_model_at_the_uniform_guess(smoothing: float) -> None:
    # A batch with FER2013's class mix and its inverse-frequency weights: with no information about the faces, the
    # best constant answer is the uniform one, so the gradient at uniform logits must vanish. PyTorch's
    # F.cross_entropy(weight=, label_smoothing=0.1) instead pushes every face toward Disgust (weight 9.4).
    labels = torch.from_numpy(np.repeat(np.arange(7), FER2013_TRAIN_COUNTS))
    weights = class_weights(FER2013_TRAIN_COUNTS, "inverse_frequency", device=torch.device("cpu"))
    logits = torch.zeros(1, 7, requires_grad=True)
    classification_loss(logits.expand(len(labels), 7), labels, weights=weights, label_smoothing=smoothing).backward()
    assert logits.grad.abs().max() < 1e-6
    torch_logits = torch.zeros(1, 7, requires_grad=True)
    F.cross_entropy(torch_logits.expand(len(labels), 7), labels, weight=weights, label_smoothing=smoothing).backward()
    if smoothing:
        assert torch_logits.grad.argmin() == 1  # Disgust's logit is pushed up: the behaviour avoided here
    else:  # without smoothing both are the same weighted mean
        assert torch.allclose(torch_logits.grad, logits.grad, atol=1e-7)
    random_logits = torch.randn(64, 7, generator=torch.Generator().manual_seed(0))
    some = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:64]]
    assert classification_loss(random_logits, some, weights=None, label_smoothing=smoothing) == pytest.approx(
        F.cross_entropy(random_logits, some, label_smoothing=smoothing).item()
    )
    if not smoothing:
        assert classification_loss(random_logits, some, weights=weights, label_smoothing=0.0) == pytest.approx(
            F.cross_entropy(random_logits, some, weight=weights).item()
        )


def test_class_balanced_sampling_evens_out_an_imbalanced_split(tmp_path: Path) -> None:
    """Catches `data.sampling=class_balanced` doing nothing (`_ShardStream.class_weights` always None)."""
    from ferdist.data.sharding import write_shards
    from ferdist.data.sources import open_source

    # A FER-like imbalance (Disgust 2 %), faces blank: only the labels matter. Sharded and read back through the
    # config -> build_loader path that training uses.
    labels = np.repeat(np.arange(7), [100, 10, 100, 200, 100, 50, 100])
    blank = " ".join(["0"] * 48 * 48)
    lines = ["emotion,pixels,Usage", *(f"{y},{blank},Training" for y in labels)]
    lines += [f"{y},{blank},{usage}" for usage in ("PublicTest", "PrivateTest") for y in range(7)]
    (tmp_path / "imbalanced.csv").write_text("\n".join(lines) + "\n")
    write_shards(open_source(tmp_path / "imbalanced.csv"), str(tmp_path / "shards"), samples_per_shard=66, workers=1)
    dataset = open_dataset(str(tmp_path / "shards"))

    def shares(sampling: str) -> np.ndarray:
        cfg = load_config(None, [f"data.manifest={tmp_path / 'shards'}", f"data.sampling={sampling}",
                                 "data.loader_workers=0", "data.shuffle_buffer=660"]).data  # fmt: skip
        drawn = np.concatenate([
            b["label"].numpy()
            for epoch in range(8)
            for b in build_loader(dataset, "train", cfg, batch_size=66, epoch=epoch, training=True)
        ])  # fmt: skip
        return np.bincount(drawn, minlength=7) / len(drawn)

    natural, balanced = shares("natural"), shares("class_balanced")
    assert natural == pytest.approx(np.bincount(labels) / len(labels), abs=0.01)  # natural keeps the imbalance
    assert np.allclose(balanced, 1 / 7, atol=0.025)  # Disgust from 1.5 % to ~14 %
    assert balanced[1] > 0.11 and natural[1] < 0.02
