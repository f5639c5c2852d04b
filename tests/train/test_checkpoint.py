"""The checkpoint policy: which epochs are kept as models and as resume state, selection by either metric, a failed
background write, and a pretrained source that changed under a run."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs
import pytest
import torch
from sessions import CrashingSession
from test_loop import tiny_run

from ferdist.config import CheckpointConfig, load_config
from ferdist.errors import FerdistError
from ferdist.train import runs
from ferdist.train.checkpoint import CheckpointManager, ModelStore, TrainState, load_classifier, take_snapshot
from ferdist.train.loop import LocalSession, run_training
from ferdist.train.model import build_model

# Epoch metrics where the two selection metrics disagree: accuracy peaks at epoch 2, macro-F1 at epoch 4.
METRICS = [(0.50, 0.30), (0.62, 0.35), (0.55, 0.41), (0.58, 0.47), (0.60, 0.44)]


def _feed(store: Path, select_by: str) -> tuple[CheckpointManager, dict[int, torch.Tensor]]:
    cfg = load_config(None, ["model.pretrained=random:tiny", "model.image_size=32", "model.freeze_blocks=0"])
    model = build_model(cfg.model, seed=0)
    manager = CheckpointManager(CheckpointConfig(keep=2, select_by=select_by), epochs=len(METRICS), eval_every=1,
                                store=ModelStore(pyarrow.fs.LocalFileSystem(), str(store)), history=[])  # fmt: skip
    state, heads = TrainState(), {}
    for epoch, (acc, f1) in enumerate(METRICS, start=1):
        with torch.no_grad():
            model.head.bias.fill_(epoch)  # each epoch's weights are recognisable
        heads[epoch] = model.head.bias.clone()
        metrics = {"epoch": epoch, "val/acc": acc, "val/macro_f1": f1}
        state.history.append(metrics)
        state.epochs_done = epoch
        if manager.improves(metrics):
            manager.save_model(lambda: take_snapshot(model, cfg=cfg, state=state, confusion=[[0] * 7] * 7))
        with torch.no_grad():
            model.head.bias.fill_(-1)  # training goes on while the snapshot is written
        # Then each write ends before the next best arrives: a write still queued when a newer best comes is skipped
        # by design (the loop never waits), which made which epochs are kept depend on the writer's speed.
        manager.raise_if_failed(wait=True)
    manager.finish()
    return manager, heads


@pytest.mark.parametrize(("select_by", "kept", "best"), [("val/acc", [1, 2], 2), ("val/macro_f1", [3, 4], 4)])
def test_the_best_models_by_the_selection_metric_are_kept_with_their_own_weights(
    tmp_path: Path, select_by: str, kept: list[int], best: int
) -> None:
    _, heads = _feed(tmp_path, select_by)
    found = runs.models(str(tmp_path))
    assert [c.summary["epoch"] for c in found] == kept
    for checkpoint in found:
        model, _ = load_classifier(Path(checkpoint.path))
        assert torch.equal(model.head.bias, heads[checkpoint.summary["epoch"]])  # not the later in-place updates
    (tmp_path / "checkpoint_epoch_0005").mkdir()  # resume state, as Ray leaves it
    (tmp_path / "checkpoint_epoch_0005" / "summary.json").write_text('{"epoch": 5, "metrics": {}, "history": []}')
    chosen, last = runs.best_and_last(str(tmp_path), select_by=select_by)
    assert chosen.summary["epoch"] == best and last.summary["epoch"] == 5


def test_a_failed_model_write_is_one_sentence_and_the_committed_checkpoints_still_restore(
    synth_shards: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    cfg = tiny_run(synth_shards, "loop.epochs=3", "checkpoint.every_epochs=1")
    with pytest.raises(RuntimeError, match="worker lost"):
        run_training(cfg, CrashingSession(run, crash_after=1))
    # The storage stops taking writes: a file sits wherever the next epochs' folders must be made.
    blockers = [run / f"{kind}_epoch_{epoch:04d}{part}" for epoch in (2, 3)
                for kind, part in (("model", ""), ("checkpoint", ".part"))]  # fmt: skip
    for blocker in blockers:
        blocker.write_text("not a folder")
    with pytest.raises(FerdistError) as info:
        run_training(cfg, LocalSession(run))
    message = str(info.value)
    assert message.startswith(("could not write the best model (epoch 2)", "could not write the resume checkpoint"))
    assert "\n" not in message
    # The resume state committed before the failure still restores, and the run finishes.
    assert sorted(p.name for p in run.glob("checkpoint_epoch_*[0-9]")) == ["checkpoint_epoch_0001"]
    for blocker in blockers:
        blocker.unlink()
    state = run_training(cfg, LocalSession(run))
    assert [m["epoch"] for m in state.history] == [1, 2, 3] and state.resumed_at == [1]


def test_a_failed_model_write_names_the_epoch_and_keeps_what_was_written(tmp_path: Path) -> None:
    (tmp_path / "model_epoch_0002").write_text("not a folder")  # where epoch 2's model must go
    with pytest.raises(FerdistError) as info:
        _feed(tmp_path, "val/acc")
    assert str(info.value).startswith(f"could not write the best model (epoch 2) to {tmp_path}/model_epoch_0002 (")
    assert "the checkpoints written before it are intact" in str(info.value) and "\n" not in str(info.value)
    assert [c.summary["epoch"] for c in runs.models(str(tmp_path))] == [1]


def test_resuming_on_a_pretrained_source_whose_frozen_weights_changed_is_refused(
    synth_shards: Path, tmp_path: Path
) -> None:
    from transformers import ViTMAEConfig, ViTMAEModel

    source = tmp_path / "pretrained"
    geometry = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8,
                    image_size=32)  # fmt: skip
    torch.manual_seed(1)
    ViTMAEModel(ViTMAEConfig(**geometry)).save_pretrained(source)
    cfg = tiny_run(synth_shards, f"model.pretrained={source}", "model.freeze_blocks=1", "loop.epochs=2",
                   "checkpoint.every_epochs=1")  # fmt: skip
    with pytest.raises(RuntimeError, match="worker lost"):
        run_training(cfg, CrashingSession(tmp_path / "run", crash_after=1))
    torch.manual_seed(2)
    ViTMAEModel(ViTMAEConfig(**geometry)).save_pretrained(source)  # someone replaced the weights
    with pytest.raises(FerdistError) as info:
        run_training(cfg, LocalSession(tmp_path / "run"))
    assert str(info.value).startswith(f"the frozen weights of model.pretrained={source} differ from the ones")
    assert "start a new run with --set name=" in str(info.value)
