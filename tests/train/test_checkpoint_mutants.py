"""Best-model selection (``select_by``) and pruning (``keep``) on their own, without training: ties, epochs that were
not evaluated, a resumed history, and the folders pruning leaves (written for mutation testing, see
MUTATION_RESULTS.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.fs
import pytest
import torch

from ferdist.config import CheckpointConfig
from ferdist.errors import FerdistError
from ferdist.train import runs
from ferdist.train.checkpoint import CheckpointManager, ModelStore, Snapshot, better, prune_models


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [(0.6, None, True), (0.6, 0.5, True), (0.5, 0.5, False), (0.4, 0.5, False)],
)
def test_better_is_strict_so_the_earlier_epoch_wins_a_tie(a: float, b: float | None, expected: bool) -> None:
    # Kills better mutants of `b is None` (→ is not None), of `or` (→ and) and of `>` (→ >=, <).
    assert better({"val/acc": a}, None if b is None else {"val/acc": b}, "val/acc") is expected


def manager(history: list[dict[str, float]], select_by: str = "val/acc") -> CheckpointManager:
    return CheckpointManager(
        CheckpointConfig(select_by=select_by), epochs=10, eval_every=1, store=None, history=history
    )


def test_a_resumed_run_starts_from_the_best_evaluated_epoch_of_its_history() -> None:
    # Kills CheckpointManager.__init__ mutants of the best's max (→ min), its key, its filter and its default.
    history = [{"epoch": 1, "val/acc": 0.5, "val/macro_f1": 0.6}, {"epoch": 2}, {"epoch": 3, "val/acc": 0.7,
               "val/macro_f1": 0.2}, {"epoch": 4, "val/acc": 0.7, "val/macro_f1": 0.1}]  # fmt: skip
    assert manager(history).best == history[2]  # a tie keeps the earlier epoch
    assert manager(history, "val/macro_f1").best == history[0]
    assert manager([{"epoch": 1}]).best is None and manager([]).best is None
    fresh = manager(history)
    assert (fresh.epochs, fresh.eval_every, fresh.store, fresh.blocked_s) == (10, 1, None, 0.0)


def test_improves_only_on_an_evaluated_epoch_that_beats_the_best() -> None:
    # Kills CheckpointManager.improves mutants of `select_by in metrics` (→ not in) and `and` (→ or).
    first = manager([])
    assert not first.improves({"epoch": 1})  # not evaluated: no val metrics, even with no best yet
    assert first.improves({"epoch": 1, "val/acc": 0.1})
    resumed = manager([{"epoch": 1, "val/acc": 0.5}])
    assert resumed.improves({"epoch": 2, "val/acc": 0.51}) and not resumed.improves({"epoch": 2, "val/acc": 0.5})
    assert not manager([], "val/macro_f1").improves({"epoch": 1, "val/acc": 0.9})


class Flaky:
    """A filesystem that does what ``base`` does, except the calls named in ``fail`` (after doing it, for
    delete_dir: the folder is gone, as when another process removed it first)."""

    def __init__(self, base: pyarrow.fs.FileSystem, fail: dict[str, type[OSError]]) -> None:
        self.base, self.fail = base, fail

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.base, name)
        if name not in self.fail:
            return method

        def failing(*args: Any, **kwargs: Any) -> Any:
            if name == "delete_dir":
                method(*args, **kwargs)
            raise self.fail[name](f"{name} failed")

        return failing


def stored_models(root: Path, scores: dict[int, float], fail: dict[str, type[OSError]] | None = None) -> ModelStore:
    """Model folders of ``scores`` in ``root``/run, on a filesystem rooted at ``root`` (not the process's own)."""
    for epoch, acc in scores.items():
        folder = root / "run" / f"{runs.MODEL_PREFIX}{epoch:04d}"
        folder.mkdir(parents=True)
        summary = {"epoch": epoch, "metrics": {"val/acc": acc, "val/macro_f1": 1 - acc}, "history": []}
        (folder / runs.SUMMARY_FILE).write_text(json.dumps(summary))
    filesystem = pyarrow.fs.SubTreeFileSystem(str(root), pyarrow.fs.LocalFileSystem())
    return ModelStore(Flaky(filesystem, fail) if fail else filesystem, "run")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("keep", "select_by", "kept"),
    [
        (1, "val/acc", [3]),
        (2, "val/acc", [2, 3]),
        (3, "val/acc", [1, 2, 3]),
        (2, "val/macro_f1", [1, 4]),
        (9, "val/acc", [1, 2, 3, 4]),
    ],
)
def test_pruning_keeps_the_best_by_select_by_and_the_earlier_of_a_tie(
    tmp_path: Path, keep: int, select_by: str, kept: list[int]
) -> None:
    # Kills prune_models mutants of the ranking key (the sign, the metric, the tie on epoch), of ranked[keep:] and of
    # listing through store.filesystem (→ None: the process's own filesystem, where "run" is not the store's folder).
    store = stored_models(tmp_path, {1: 0.6, 2: 0.7, 3: 0.8, 4: 0.6})  # epochs 1 and 4 tie on val/acc
    prune_models(store, keep=keep, select_by=select_by)
    assert [c.summary["epoch"] for c in runs.models(str(tmp_path / "run"))] == kept
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [f"{runs.MODEL_PREFIX}{e:04d}" for e in kept]


def test_a_folder_already_gone_does_not_stop_pruning(tmp_path: Path) -> None:
    # Kills prune_models' contextlib.suppress(FileNotFoundError) mutants (→ suppress(None) raises a TypeError).
    store = stored_models(tmp_path, {1: 0.6, 2: 0.7, 3: 0.8}, fail={"delete_dir": FileNotFoundError})
    prune_models(store, keep=1, select_by="val/acc")
    assert [c.summary["epoch"] for c in runs.models(str(tmp_path / "run"))] == [3]


def snapshot(epoch: int, acc: float) -> Snapshot:
    summary = {"epoch": epoch, "metrics": {"epoch": epoch, "val/acc": acc}, "history": []}
    return Snapshot(epoch=epoch, weights={"w": torch.zeros(1)}, summary=summary, backbone={}, config_yaml="")


def test_a_manager_with_a_store_writes_its_best_models_with_one_writer(tmp_path: Path) -> None:
    # Kills CheckpointManager.__init__ mutants of its writer pool (none, or more than one thread) and of the
    # _pending / _queued futures it starts without ("" has no cancel() or done()).
    store = stored_models(tmp_path, {})
    manager = CheckpointManager(CheckpointConfig(keep=2, write="sync"), epochs=3, eval_every=1, store=store, history=[])
    assert manager._pool is not None and manager._pool._max_workers == 1
    for epoch, acc in enumerate([0.5, 0.6, 0.7], start=1):
        manager.save_model(lambda e=epoch, a=acc: snapshot(e, a))
    manager.finish()
    assert [c.summary["epoch"] for c in runs.models(str(tmp_path / "run"))] == [2, 3]
    assert manager.best == {"epoch": 3, "val/acc": 0.7}


def test_a_failed_write_is_raised_at_finish(tmp_path: Path) -> None:
    # Kills CheckpointManager.__init__'s `_errors = []` mutant (None: the writer's error would vanish in its thread).
    store = stored_models(tmp_path, {}, fail={"create_dir": OSError})
    manager = CheckpointManager(CheckpointConfig(), epochs=1, eval_every=1, store=store, history=[])
    manager.save_model(lambda: snapshot(1, 0.5))
    with pytest.raises(FerdistError, match=r"could not write the best model \(epoch 1\) to run/model_epoch_0001"):
        manager.finish()
