"""loop.precision=bf16 on the CPU (PyTorch's CPU autocast supports bf16): training steps and evaluation follow fp32
within stated tolerances, and bf16 is really used (the numbers are not fp32's bit for bit)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ferdist.config import RunConfig, load_config
from ferdist.data.loader import open_dataset
from ferdist.train.checkpoint import load_classifier
from ferdist.train.loop import LocalSession, evaluate, run_training
from ferdist.train.model import build_model


def run(manifest: Path, precision: str) -> RunConfig:
    return load_config(
        None,
        [f"data.manifest={manifest}", "data.loader_workers=0", "model.pretrained=random:tiny", "model.image_size=32",
         "model.freeze_blocks=2", "optim.lr=2e-3", "optim.warmup_epochs=1", "loop.epochs=1",
         "loop.global_batch_size=32", "tracking.backend=none", f"loop.precision={precision}"],
    )  # fmt: skip


@pytest.fixture(scope="module")
def both(synth_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[RunConfig, Path, dict]]:
    """One epoch (8 optimizer steps) of the same run in fp32 and in bf16: its config, model folder and metrics."""
    out = {}
    for precision in ("fp32", "bf16"):
        cfg, root = run(synth_shards, precision), tmp_path_factory.mktemp(precision)
        state = run_training(cfg, LocalSession(root))
        out[precision] = (cfg, root / "model_epoch_0001", state.history[0])
    return out


def test_bf16_training_steps_on_the_cpu_follow_fp32(both: dict[str, tuple[RunConfig, Path, dict]]) -> None:
    """Catches loop.precision=bf16 being ignored (bit-identical to fp32) or breaking training (far from fp32).
    Tolerances: the epoch's mean loss within 1 % of fp32's; every trained weight tensor moved from the shared start
    by the same update up to 10 % of that update's size (bf16 keeps 8 bits of mantissa in the forward pass)."""
    (cfg, fp32_dir, fp32), (_, bf16_dir, bf16) = both["fp32"], both["bf16"]
    assert bf16["train/loss"] != fp32["train/loss"]  # autocast really ran in bf16
    assert bf16["train/loss"] == pytest.approx(fp32["train/loss"], rel=0.01)  # the epoch's 8 steps
    assert bf16["val/loss"] == pytest.approx(fp32["val/loss"], rel=0.01)
    start = build_model(cfg.model, seed=cfg.seed).state_dict()
    fp32_weights, bf16_weights = load_classifier(fp32_dir)[0].state_dict(), load_classifier(bf16_dir)[0].state_dict()
    moved = [k for k in start if not torch.equal(fp32_weights[k], start[k])]
    assert len(moved) > 10 and "head.weight" in moved
    steps = 8  # 280 faces / global batch 32
    for k in moved:
        if k.endswith("attention.k_proj.bias"):
            # A key bias adds the same number to every logit of a softmax row: its gradient is zero but for rounding,
            # which fp32 keeps near zero and bf16 does not; AdamW then moves it at most lr per element and step.
            assert (bf16_weights[k] - fp32_weights[k]).abs().max() <= 2 * steps * cfg.optim.lr, k
            continue
        update = (fp32_weights[k] - start[k]).norm()  # measured: at most 3.2 % of it apart
        assert (bf16_weights[k] - fp32_weights[k]).norm() < 0.1 * update, k


def test_bf16_evaluation_on_the_cpu_follows_fp32(
    both: dict[str, tuple[RunConfig, Path, dict]], synth_shards: Path
) -> None:
    """Catches evaluate() ignoring loop.precision=bf16, or bf16 evaluation going wrong: the same model scores val with
    a loss within 1 % of fp32's and the same predictions but for at most 2 of its 35 faces."""
    cfg, model_dir, _ = both["fp32"]
    model, _ = load_classifier(model_dir)
    dataset = open_dataset(str(synth_shards))
    scores = {}
    for precision in ("fp32", "bf16"):
        cfg_p = run(synth_shards, precision)
        scores[precision] = evaluate(model, dataset, cfg_p, split="val", rank=0, world_size=1,
                                     device=torch.device("cpu"))  # fmt: skip
    fp32, bf16 = scores["fp32"], scores["bf16"]
    assert bf16["loss"] != fp32["loss"] and bf16["loss"] == pytest.approx(fp32["loss"], rel=0.01)
    # rows = true class, so the same row sums; a face whose prediction changed moves one count within its row
    changed = (torch.tensor(bf16["confusion"]) - torch.tensor(fp32["confusion"])).abs().sum().item() / 2
    assert bf16["samples"] == fp32["samples"] == 35 and changed <= 2
