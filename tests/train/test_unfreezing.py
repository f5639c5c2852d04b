"""Gradual unfreezing (model.unfreeze): the schedule, the optimizer holding the released blocks in their layer-decay
groups from the start, the trainable set changing at the stated epoch, exact resume across it, and (slow) two Ray
workers staying in sync after DDP is rebuilt."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from sessions import CrashingSession

from ferdist.config import ModelConfig, load_config
from ferdist.errors import FerdistError
from ferdist.train.checkpoint import Snapshot, load_classifier
from ferdist.train.loop import LocalSession, optimizer_for_run, run_training
from ferdist.train.model import build_model, check_pretrained
from ferdist.train.optim import make_schedule

ROOT = Path(__file__).resolve().parents[2]


def tiny_run(manifest: Path, *extra: str):
    return load_config(None, [f"data.manifest={manifest}", "data.loader_workers=1", "model.pretrained=random:tiny",
                              "model.image_size=32", "model.freeze_blocks=4", "model.head_dropout=0.1",
                              "optim.lr=2e-3", "optim.warmup_epochs=1", "loop.epochs=4", "loop.global_batch_size=32",
                              "tracking.backend=none", *extra])  # fmt: skip


def without_perf(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in history]


def blocks_of(names: set[str] | list[str]) -> set[str]:
    """The backbone parts among parameter names: 'embeddings', or a block number."""
    return {n.split(".")[2] if n.startswith("backbone.layers.") else n.split(".")[1] for n in names
            if n.startswith("backbone.") and not n.startswith("backbone.layernorm")}  # fmt: skip


def test_the_schedule_reads_epoch_blocks_pairs_and_gives_each_epochs_frozen_prefix() -> None:
    cfg = ModelConfig(freeze_blocks=4, unfreeze=("2:2", "3:0"))
    assert cfg.unfreeze_schedule() == [(2, 2), (3, 0)]
    assert [cfg.frozen_blocks_at(e) for e in range(5)] == [4, 4, 2, 0, 0] and cfg.fewest_frozen() == 0
    assert ModelConfig(freeze_blocks=4).frozen_blocks_at(7) == 4 == ModelConfig(freeze_blocks=4).fewest_frozen()
    # --set: items as typed, quoted or not (in a file an unquoted 5:2 is a base-60 number, refused: below).
    assert load_config(None, ['model.unfreeze=["2:2", "3:0"]']).model.unfreeze == ("2:2", "3:0")


def test_the_optimizer_holds_the_released_blocks_in_their_layer_decay_groups_from_the_start(
    synth_shards: Path,
) -> None:
    cfg = tiny_run(synth_shards, 'model.unfreeze=["2:2"]', "optim.layer_decay=0.5")
    model = build_model(cfg.model, seed=0)
    optimizer, _, trainable = optimizer_for_run(model, cfg, schedule=make_schedule(cfg.optim, steps_per_epoch=8,
                                                                                    epochs=4))  # fmt: skip
    names = {id(p): n for n, p in model.named_parameters()}
    trains_now = {n for n, p in model.named_parameters() if p.requires_grad}
    assert blocks_of(trains_now) == {"4", "5"}  # blocks 0-3 frozen until epoch 2
    held = {names[id(p)]: g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}
    assert blocks_of(held) == {"2", "3", "4", "5"} and [names[id(p)] for p in trainable] == [
        n for n, _ in model.named_parameters() if n in held
    ]
    for name, lr in held.items():  # block i of 6 at lr × 0.5^(6 − i)
        if name.startswith("backbone.layers."):
            assert lr == pytest.approx(2e-3 * 0.5 ** (6 - int(name.split(".")[2])))


class Recording(LocalSession):
    """A LocalSession keeping the names of the trained weights in each epoch's resume state."""

    trained: dict[int, set[str]]

    def report(self, metrics: dict[str, float], resume: Snapshot | None, *, mode: str) -> None:
        if resume is not None:
            self.trained[resume.epoch] = set(resume.weights)
        super().report(metrics, resume, mode=mode)


def test_unfreezing_changes_the_trained_set_at_its_epoch_and_resumes_across_it_bit_identical(
    synth_shards: Path, tmp_path: Path
) -> None:
    # Blocks 0-3 frozen; after 1 epoch blocks 2-3 train too, after 3 every block and the embeddings.
    cfg = tiny_run(synth_shards, 'model.unfreeze=["1:2", "3:0"]', "checkpoint.every_epochs=1", "optim.layer_decay=0.75",
                   "optim.ema_decay=0.9")  # fmt: skip
    clean = Recording(tmp_path / "clean")
    clean.trained = {}
    clean_state = run_training(cfg, clean)
    assert [blocks_of(clean.trained[e]) for e in (1, 2, 3, 4)] == [
        {"4", "5"}, {"2", "3", "4", "5"}, {"2", "3", "4", "5"}, {"0", "1", "2", "3", "4", "5", "embeddings"}
    ]  # fmt: skip
    fresh = build_model(cfg.model, seed=cfg.seed).state_dict()
    final, _ = load_classifier(tmp_path / "clean" / "checkpoint_epoch_0004")
    for name in ("backbone.layers.0.mlp.fc1.weight", "backbone.layers.2.mlp.fc1.weight",
                 "backbone.embeddings.patch_embeddings.projection.weight"):  # fmt: skip
        assert not torch.equal(final.state_dict()[name], fresh[name])  # released, then trained
    assert torch.equal(final.state_dict()["backbone.embeddings.position_embeddings"],
                       fresh["backbone.embeddings.position_embeddings"])  # fixed sin-cos: never trained  # fmt: skip

    # Crash after epoch 3 with resume state every 2 epochs: the restart resumes after epoch 2 (blocks 2-5 trained
    # and saved) and must release the rest at epoch 3 as the clean run did.
    crash_cfg = tiny_run(synth_shards, 'model.unfreeze=["1:2", "3:0"]', "checkpoint.every_epochs=2",
                         "optim.layer_decay=0.75", "optim.ema_decay=0.9")  # fmt: skip
    again = run_training(crash_cfg, LocalSession(tmp_path / "again"))
    with pytest.raises(RuntimeError, match="worker lost"):
        run_training(crash_cfg, CrashingSession(tmp_path / "crashed", crash_after=3))
    resumed = run_training(crash_cfg, LocalSession(tmp_path / "crashed"))
    assert resumed.resumed_at == [2]
    assert without_perf(resumed.history) == without_perf(again.history) == without_perf(clean_state.history)
    a, _ = load_classifier(tmp_path / "again" / "checkpoint_epoch_0004")
    b, _ = load_classifier(tmp_path / "crashed" / "checkpoint_epoch_0004")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (['model.unfreeze=["5:2", "3:0"]'], "model.unfreeze epochs must increase from 1, got 3 after 5"),
        (['model.unfreeze=["0:2"]'], "model.unfreeze epochs must increase from 1, got 0 after 0"),
        (['model.unfreeze=["5:4"]'], "model.unfreeze item '5:4' keeps 4 blocks frozen, not fewer than the 4 frozen"),
        (['model.unfreeze=["5:20"]'], "model.unfreeze item '5:20' keeps 20 blocks frozen, not fewer than the 4"),
        (['model.unfreeze=["five:2"]'], "model.unfreeze item 'five:2' is not EPOCH:BLOCKS; write e.g. '5:2'"),
        (['model.unfreeze=["\u0663:2"]'], "model.unfreeze item '\u0663:2' is not EPOCH:BLOCKS"),  # Arabic-Indic 3
        (['model.unfreeze=["5:2"]', "loop.epochs=5"],
         "model.unfreeze releases blocks after 5 epochs, but loop.epochs=5 ends the run first"),
    ],
)  # fmt: skip
def test_bad_unfreezing_schedules_are_one_sentence(overrides: list[str], message: str) -> None:
    with pytest.raises(FerdistError, match=re.escape(f"command line: {message}")):
        load_config(None, overrides)


def test_an_unquoted_item_in_a_file_is_refused_with_the_advice_to_quote_it(tmp_path: Path) -> None:
    # On the command line the items are taken as typed (shell quotes never reach YAML); in a file YAML decides.
    assert load_config(None, ["model.freeze_blocks=4", "model.unfreeze=[5:2]"]).model.unfreeze_schedule() == [(5, 2)]
    (tmp_path / "run.yaml").write_text("model:\n  unfreeze: [5:2]\n")
    with pytest.raises(
        FerdistError,
        match=re.escape("line 2: model.unfreeze[0]: 5:2 is a base-60 number to YAML (302); quote it ('5:2')"),
    ):
        load_config(tmp_path / "run.yaml")
    (tmp_path / "run.yaml").write_text('model:\n  unfreeze: ["5:2"]\n')
    assert load_config(tmp_path / "run.yaml").model.unfreeze_schedule() == [(5, 2)]


def test_a_frozen_prefix_deeper_than_the_backbone_is_refused_before_ray_starts() -> None:
    # The schedule only releases from model.freeze_blocks, so this check on the driver bounds every step of it.
    cfg = load_config(None, ["model.pretrained=random:tiny", "model.image_size=32", "model.freeze_blocks=8",
                             'model.unfreeze=["2:7"]'])  # fmt: skip
    with pytest.raises(FerdistError, match=r"model.freeze_blocks=8 exceeds the backbone's 6 blocks"):
        check_pretrained(cfg.model)


@pytest.mark.slow
def test_two_ray_workers_stay_in_sync_after_blocks_are_released(tmp_path: Path) -> None:
    """DDP syncs only the parameters that needed gradients when it wrapped the model: without the rewrap, each
    worker trains the released blocks on its own data, and the val metrics (each rank scoring its own weights on its
    half) stop matching one process scoring rank 0's weights."""
    import ray

    from ferdist.data.loader import open_dataset
    from ferdist.data.sharding import write_shards
    from ferdist.data.sources import synthetic_source
    from ferdist.launch import trainer as launch
    from ferdist.train.loop import evaluate

    shards = tmp_path / "synth"
    write_shards(synthetic_source(700, seed=1), str(shards), samples_per_shard=32, workers=2)
    cfg = load_config(ROOT / "jobs" / "configs" / "quickstart.yaml", [
        "name=unfreeze", f"data.manifest={shards}", f"checkpoint.storage_path={tmp_path / 'runs'}", "loop.epochs=3",
        "loop.global_batch_size=32", "workers.num_workers=2", "tracking.backend=none", "model.freeze_blocks=4",
        'model.unfreeze=["1:0"]', "optim.ema_decay=0.9"])  # fmt: skip
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    try:
        summary = launch.summarize(launch.build_trainer(cfg).fit())
    finally:
        ray.shutdown()
    last = summary.last_metrics
    model, _ = load_classifier(tmp_path / "runs" / "unfreeze" / "checkpoint_epoch_0003")
    single = evaluate(model, open_dataset(str(shards)), cfg, split="val", rank=0, world_size=1,
                      device=torch.device("cpu"))  # fmt: skip
    assert single["acc"] == last["val/acc"] and single["loss"] == pytest.approx(last["val/loss"], rel=1e-5)
