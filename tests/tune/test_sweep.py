"""Sweep files: the search space and scheduler settings are parsed, typed and checked before Ray starts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ray import tune

from ferdist.config import load_config
from ferdist.errors import FerdistError
from ferdist.tune.sweep import Dimension, load_sweep, trial_epochs_budget
from ferdist.tune.tuning import SweepSummary, TrialOutcome, concurrent_trials, param_space, trial_config

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_shipped_sweeps_parse_with_typed_dimensions() -> None:
    sweep = load_sweep(CONFIGS / "fer2013-sweep.yaml")
    dims = {d.key: d for d in sweep.search}
    assert dims["optim.lr"] == Dimension("optim.lr", "loguniform", (1e-4, 1e-3))
    freeze = dims["model.freeze_blocks"].values
    assert freeze == (0, 4) and all(type(v) is int for v in freeze)
    assert sweep.sweep.grace_period == 10 and sweep.sweep.reduction_factor == 3.0 and sweep.base.loop.epochs == 80
    quick = load_sweep(CONFIGS / "quickstart-sweep.yaml", ["sweep.samples=2", "loop.epochs=3"])
    assert quick.sweep.samples == 2 and quick.base.loop.epochs == 3
    assert trial_epochs_budget(quick) == 6
    # train.py can run a sweep file: it reads the base run config and leaves sweep: / search: to tune.py.
    assert load_config(CONFIGS / "quickstart-sweep.yaml") == load_sweep(CONFIGS / "quickstart-sweep.yaml").base


def test_nested_and_dotted_keys_and_grid_budget(tmp_path: Path) -> None:
    sweep = load_sweep(write(tmp_path, "loop: {epochs: 5}\nsweep: {samples: 3}\nsearch:\n  optim:\n"
                                       "    lr: {grid: [1.0e-3, 1.0e-4]}\n  model.freeze_blocks: {randint: [0, 4]}\n"))
    assert [d.key for d in sweep.search] == ["optim.lr", "model.freeze_blocks"]
    assert trial_epochs_budget(sweep) == 3 * 2 * 5
    space = param_space(sweep)
    assert space["optim.lr"] == {"grid_search": [1e-3, 1e-4]}
    assert isinstance(space["model.freeze_blocks"], tune.search.sample.Integer)
    assert (space["model.freeze_blocks"].lower, space["model.freeze_blocks"].upper) == (0, 5)  # inclusive 4
    assert space["loop.epochs"] == 5
    # An optional number (off by default) is searched as the number it is when set.
    ema = load_sweep(write(tmp_path, "search:\n  optim.ema_decay: {uniform: [0.99, 0.999]}\n"))
    assert ema.search[0].values == (0.99, 0.999)
    assert (param_space(ema)["optim.ema_decay"].lower, param_space(ema)["optim.ema_decay"].upper) == (0.99, 0.999)


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ("optim.lrr: {choice: [1]}", r"search\.optim\.lrr: unknown config key \(did you mean 'optim\.lr'\?\)"),
        ("optim.lr: {normal: [0, 1]}", r"search\.optim\.lr: write one of choice, grid, uniform, loguniform, randint"),
        ("optim.lr: {loguniform: [0, 1.0e-3]}", r"loguniform bounds must be > 0"),
        ("optim.lr: {uniform: [1.0e-3, 1.0e-4]}", r"takes \[low, high\] with low < high"),
        ("model.freeze_blocks: {uniform: [0, 4]}", r"uniform needs a float setting; use choice"),
        ("model.pooling: {choice: [cls, max]}", r"model\.pooling must be one of 'cls', 'mean', got 'max'"),
        ("loop.global_batch_size: {choice: [64, 65]}", r"global_batch_size = 65: .*does not divide by 2 workers"),
        ("optim.lr: {choice: []}", r"choice needs a list of values"),
    ],
)
def test_bad_dimension_is_one_sentence_naming_file_and_key(tmp_path: Path, search: str, message: str) -> None:
    path = write(tmp_path, f"workers: {{num_workers: 2}}\nsearch:\n  {search}\n")
    with pytest.raises(FerdistError, match=message) as info:
        load_sweep(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ("{sample: 3}", r"unknown key 'sweep\.sample' \(did you mean 'sweep\.samples'\?\)"),
        ("{reduction_factor: 1}", r"sweep\.reduction_factor must be > 1"),
        ("{scheduler: pbt}", r"sweep\.scheduler must be one of 'asha', 'fifo'"),
        ("{driver_cpus: 0}", r"sweep\.driver_cpus must be > 0"),
        # ASHAScheduler's own assertion failed after Ray had started and the sweep's MLflow run was opened.
        ("{grace_period: 81}", r"sweep\.grace_period=81 epochs is past loop\.epochs=80, so ASHA could never compare"),
    ],
)
def test_bad_sweep_setting(tmp_path: Path, sweep: str, message: str) -> None:
    with pytest.raises(FerdistError, match=message):
        load_sweep(write(tmp_path, f"loop: {{epochs: 80}}\nsweep: {sweep}\n"))
    load_sweep(write(tmp_path, "loop: {epochs: 80}\nsweep: {scheduler: fifo, grace_period: 81}\n"))  # no rungs


def test_a_bad_sweep_setting_names_where_it_came_from(tmp_path: Path) -> None:
    """Catches `tune.py --config nosweep.yaml --samples 0` blaming nosweep.yaml, which has no sweep: section."""
    path = write(tmp_path, "loop: {epochs: 4}\nsweep: {samples: 2}\n")
    assert load_sweep(path).sweep.grace_period == 4  # the default 10, at most the run's epochs when not set
    assert load_sweep(path, ["sweep.samples=010"]).sweep.samples == 10  # as typed, not YAML 1.1's octal 8
    for override, said in [("sweep.samples=0", "command line: sweep.samples must be >= 1, got 0"),
                           ("sweep.grace_period=5", "command line: sweep.grace_period=5 epochs is past loop.epochs=4"),
                           ("sweep.sampels=3", "command line: unknown key 'sweep.sampels'"),
                           ("sweep.scheduler=pbt", "command line: sweep.scheduler must be one of"),
                           ("sweep.grace_period = 5", "command line: sweep.grace_period=5 epochs is past loop.epochs"),
                           ("sweep.samples=1_0", "command line: sweep.samples must be an integer")]:  # fmt: skip
        with pytest.raises(FerdistError, match=re.escape(said)):
            load_sweep(path, [override])
    with pytest.raises(FerdistError, match=re.escape(f"{path}: sweep.reduction_factor must be > 1")):
        load_sweep(write(tmp_path, "sweep: {reduction_factor: 1}\n"), ["sweep.samples=3"])


def test_trials_fit_the_cluster_gpus_or_cpus() -> None:
    gpu = load_config(None, ["workers.num_workers=4", "workers.use_gpu=true", "workers.gpus_per_worker=1"])
    assert concurrent_trials(gpu, driver_cpus=1, resources={"CPU": 192, "GPU": 8}) == 2
    assert concurrent_trials(gpu, driver_cpus=1, resources={"CPU": 192, "GPU": 3}) == 1  # never 0
    cpu = load_config(None, ["workers.num_workers=1", "workers.use_gpu=false", "workers.cpus_per_worker=0.9"])
    assert concurrent_trials(cpu, driver_cpus=0.1, resources={"CPU": 2}) == 2


def test_trial_runs_are_named_and_stored_under_the_sweep() -> None:
    base = load_config(None, ["name=s1", "checkpoint.storage_path=s3://bucket/runs/"])
    from ferdist.config import to_flat_dict

    cfg = trial_config(to_flat_dict(base) | {"optim.lr": 5e-4}, "ab12c_00003")
    assert cfg.name == "s1-ab12c_00003" and cfg.optim.lr == 5e-4
    assert cfg.checkpoint.storage_path == "s3://bucket/runs/s1/trials"


def test_asha_savings_are_counted_in_trial_epochs_and_device_hours() -> None:
    run = load_config(None)
    trials = [
        TrialOutcome("a", run, "completed", 80, 0.6, 8000.0, {}),
        TrialOutcome("b", run, "early-stopped", 10, 0.4, 1000.0, {}),
        TrialOutcome("c", run, "early-stopped", 30, 0.5, 3000.0, {}),
    ]
    summary = SweepSummary(trials, budget_trial_epochs=240, devices_per_trial=4)
    assert summary.run_trial_epochs == 120 and summary.saved_trial_epochs == 120
    assert summary.saved_device_hours == pytest.approx(120 * 100.0 * 4 / 3600)
    assert summary.best is trials[0] and summary.count("early-stopped") == 2


def test_a_trial_whose_checkpoints_reach_the_last_epoch_is_not_trained_again(tmp_path: Path) -> None:
    import json

    from ferdist.config import to_flat_dict
    from ferdist.tune.tuning import finished_metrics

    base = load_config(None, ["name=s", f"checkpoint.storage_path={tmp_path}", "loop.epochs=2"])
    cfg = trial_config(to_flat_dict(base), "t_00001")
    run = tmp_path / "s" / "trials" / "s-t_00001"
    assert finished_metrics(cfg) is None  # nothing stored yet
    for epoch in (1, 2):
        (run / f"checkpoint_{epoch}").mkdir(parents=True)
        summary = {"epoch": epoch, "metrics": {"epoch": epoch, "val/acc": 0.1 * epoch}, "confusion": [], "history": []}
        (run / f"checkpoint_{epoch}" / "summary.json").write_text(json.dumps(summary))
        expected = None if epoch < 2 else {"epoch": 2, "val/acc": 0.2}
        assert finished_metrics(cfg) == expected


def test_searched_datasets_are_checked_and_given_to_trials_as_absolute_paths(
    synth_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches a searched local path checked as an absolute one but handed to trials as typed: a trial does not run
    in the driver's directory, so a relative choice that passed the check failed there."""
    from ferdist.launch import preflight
    from ferdist.tune.tuning import check_searched_sources

    monkeypatch.chdir(synth_shards.parent)
    settings = [f"data.manifest={synth_shards}", "model.pretrained=random:tiny", "model.image_size=32",
                "data.loader_workers=0", "loop.global_batch_size=32", "tracking.backend=none",
                f"checkpoint.storage_path={tmp_path / 'runs'}"]  # fmt: skip
    base = preflight.with_absolute_paths(load_config(None, settings))
    lr = Dimension("optim.lr", "choice", (1e-3, 2e-3))
    data, same = check_searched_sources(base, (Dimension("data.manifest", "choice", (synth_shards.name,)), lr))
    assert data.values == (str(synth_shards),) and same == lr
    with pytest.raises(FerdistError, match=r"search\.data\.manifest = 'nope': no manifest at"):
        check_searched_sources(base, (Dimension("data.manifest", "choice", ("nope",)),))


def test_searched_values_that_fail_only_together_are_one_sentence(tmp_path: Path) -> None:
    """Catches dimensions checked one at a time: each value is valid alone, but the trials that draw both fail."""
    path = write(tmp_path, "model: {freeze_blocks: 4}\nsearch:\n  loop.epochs: {choice: [5, 20]}\n"
                           "  model.unfreeze: {choice: [['10:0'], ['2:0']]}\n")  # fmt: skip
    with pytest.raises(FerdistError, match=r"search\.loop\.epochs = 5 with search\.model\.unfreeze = \('10:0',\): "
                                           r"model\.unfreeze releases blocks after 10 epochs, but loop\.epochs=5"):
        load_sweep(path)
    path = write(tmp_path, "search:\n  model.freeze_blocks: {grid: [2, 4]}\n  model.unfreeze: {choice: [['3:2']]}\n")
    with pytest.raises(FerdistError, match=r"search\.model\.freeze_blocks = 2 with .*keeps 2 blocks frozen, not fewer"):
        load_sweep(path)
    ok = load_sweep(write(tmp_path, "model: {freeze_blocks: 4}\nsearch:\n  loop.epochs: {randint: [12, 20]}\n"
                                    "  model.unfreeze: {choice: [['10:0'], ['2:0']]}\n"))  # fmt: skip
    assert [d.key for d in ok.search] == ["loop.epochs", "model.unfreeze"]


def test_searched_depths_and_sizes_are_checked_against_every_searched_backbone(synth_shards: Path) -> None:
    """Catches model.freeze_blocks or model.image_size checked only as numbers: 99 frozen blocks of random:tiny's
    6, or a size its 8-pixel patches do not divide, failed in every trial that drew it."""
    from ferdist.tune.tuning import check_searched_sources

    base = load_config(None, [f"data.manifest={synth_shards}", "model.pretrained=random:tiny", "model.image_size=32",
                              "model.freeze_blocks=0", "tracking.backend=none"])  # fmt: skip
    with pytest.raises(FerdistError, match=r"^search\.model\.freeze_blocks = 99: .*freeze_blocks"):
        check_searched_sources(base, (Dimension("model.freeze_blocks", "choice", (0, 99)),))
    with pytest.raises(FerdistError, match=r"^search\.model\.image_size = 33: "):  # inside the range, not an end
        check_searched_sources(base, (Dimension("model.image_size", "randint", (32, 40)),))
    both = (Dimension("model.pretrained", "choice", ("random:tiny", "random:base")),
            Dimension("model.freeze_blocks", "choice", (4, 8)))  # fmt: skip
    with pytest.raises(FerdistError, match=r"^search\.model\.pretrained = 'random:tiny' with search\.model\."
                                           r"freeze_blocks = 8: "):  # fmt: skip
        check_searched_sources(base, both)
    assert check_searched_sources(base, (Dimension("model.freeze_blocks", "randint", (0, 6)),))[0].values == (0, 6)
