"""The run config: round-trips through flat dicts, strings, YAML and --set, and rejects bad input in one sentence."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ferdist.config import (
    CheckpointConfig,
    PretrainConfig,
    RunConfig,
    from_flat_dict,
    load_config,
    redacted,
    to_flat_dict,
    to_yaml,
)
from ferdist.errors import FerdistError

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def test_flat_dict_round_trip_with_native_and_string_values() -> None:
    cfg = load_config(None, ["optim.lr=3e-4", "workers.use_gpu=true", "data.endpoint_url=http://127.0.0.1:9000"])
    flat = to_flat_dict(cfg)
    assert flat["optim.lr"] == 3e-4 and flat["workers.use_gpu"] is True and flat["data.endpoint_url"].endswith("9000")
    assert from_flat_dict(flat) == cfg
    assert from_flat_dict({k: str(v) for k, v in flat.items()}) == cfg  # MLflow params and Tune spaces are strings


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        None, ["name=exp-1", "model.pooling=mean", "loop.epochs=3", "optim.class_weights=inverse_frequency"]
    )
    path = tmp_path / "run.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("name", ["quickstart", "fer2013-vitmae-base"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.name == name
    if name == "fer2013-vitmae-base":
        # The defaults: AdamW at 3e-5, 80 epochs, blocks 0-3 frozen, ViT-MAE base at 224.
        assert (cfg.optim.lr, cfg.loop.epochs, cfg.model.freeze_blocks) == (3e-5, 80, 4)
        assert (cfg.model.pretrained, cfg.model.image_size) == ("facebook/vit-mae-base", 224)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_as_what_its_job_reads(path: Path) -> None:
    from ferdist.tune.sweep import load_sweep

    if path.stem.startswith("pretrain-"):
        cfg = load_config(path, root=PretrainConfig)
        assert cfg.data.split == "train" and 0 < cfg.model.mask_ratio < 1
    elif "sweep" in path.stem:
        cfg = load_sweep(path).base
    else:
        cfg = load_config(path)
    assert cfg.name == path.stem


def test_pretrain_config_defaults_round_trip_and_differ_where_mae_does() -> None:
    cfg = load_config(None, ["model.mask_ratio=0.6", "loop.epochs=3"], root=PretrainConfig)
    # MAE's optimiser, not the fine-tuning defaults its sections would otherwise give.
    assert (cfg.optim.beta2, cfg.optim.label_smoothing, cfg.model.pretrained) == (0.95, 0.0, "random:small")
    flat = to_flat_dict(cfg)
    assert from_flat_dict(flat, root=PretrainConfig) == cfg
    assert from_flat_dict({k: str(v) for k, v in flat.items()}, root=PretrainConfig) == cfg
    with pytest.raises(FerdistError, match="optim.layer_decay is a fine-tuning setting"):
        load_config(None, ["optim.layer_decay=0.75"], root=PretrainConfig)
    with pytest.raises(FerdistError, match="data.split=holdout: pretraining reads only the train split; remove"):
        load_config(None, ["data.split=holdout"], root=PretrainConfig)


@pytest.mark.parametrize(
    "override",
    ["optim.label_smoothing=0.1", "optim.class_weights=inverse_frequency", "loop.eval_every=2", "checkpoint.keep=3",
     "checkpoint.select_by=val/macro_f1", "tracking.registered_model=backbone", "tracking.parent_run_id=abc"],
)  # fmt: skip
def test_pretraining_refuses_fine_tuning_settings_it_would_ignore(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(FerdistError, match=rf"{re.escape(key)} is a fine-tuning setting that pretraining would "):
        load_config(None, [override], root=PretrainConfig)
    # The defaults themselves (what a saved pretraining config holds) still load.
    assert load_config(None, [], root=PretrainConfig).checkpoint.keep == CheckpointConfig().keep


@pytest.mark.parametrize(
    ("file_text", "override", "blamed"),
    [("optim:\n  lr: 1.0e-3\n", "optim.label_smoothing=0.1", "command line"),  # on --set, not the file
     ("optim:\n  label_smoothing: 0.1\n", None, "FILE"),
     ("optim:\n  lr: 1.0e-3\n", "optim.lr=fast", "command line"),
     ("optim:\n  lr: fast\n", "loop.epochs=3", "FILE"),
     ("loop:\n  epochs: 2\n", "loop.epochz=3", "command line"),
     ("loop:\n  epochz: 2\n", "loop.epochs=3", "FILE")],
)  # fmt: skip
def test_a_bad_key_is_blamed_on_where_it_was_written(
    tmp_path: Path, file_text: str, override: str | None, blamed: str
) -> None:
    """The sentence names the file or the command line, whichever holds the key (a --set key was blamed on the file)."""
    path = tmp_path / "run.yaml"
    path.write_text(file_text)
    with pytest.raises(FerdistError) as err:
        load_config(path, [override] if override else [], root=PretrainConfig)
    assert str(err.value).startswith(f"{path if blamed == 'FILE' else blamed}: "), str(err.value)


def test_overrides_apply_on_top_of_the_file() -> None:
    cfg = load_config(CONFIGS / "quickstart.yaml", ["loop.epochs=2", "workers.num_workers=1", "seed=7"])
    assert (cfg.loop.epochs, cfg.workers.num_workers, cfg.seed) == (2, 1, 7)
    assert cfg.model.pretrained == "random:tiny"  # untouched keys keep the file's values


def test_unknown_key_names_the_file_and_suggests(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(FerdistError, match=r"bad\.yaml: unknown key 'optim\.lrr' \(did you mean 'optim\.lr'\?\)"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=fast", "optim.lr must be a finite number, got 'fast'"),
        ("optim.lr=nan", "optim.lr must be a finite number, got 'nan'"),
        ("optim.weight_decay=inf", "optim.weight_decay must be a finite number, got 'inf'"),
        ("loop.epochs=1e3", "loop.epochs must be an integer, got '1e3'"),
        ("loop.epochs=2.5", "loop.epochs must be an integer, got 2.5"),
        ("loop.precision=fp16", "loop.precision must be one of 'auto', 'fp32', 'bf16', got 'fp16'"),
        ("workers.use_gpu=maybe", "workers.use_gpu must be true or false"),
        ("optim.lr=-1", "optim.lr must be > 0, got -1.0"),
        ("workers.num_workers=3", "global_batch_size=256 does not divide by 3 workers"),
        ("name=a b", "name must be letters"),
        ("optim.lr", "write overrides as key=value"),
        ("seed=-1", "seed must be between 0 and 18446744073709551615, got -1"),  # a worker's generators refused it
        ("seed=18446744073709551616", "seed must be between 0 and 18446744073709551615, got 18446744073709551616"),
    ],
)
def test_bad_values_get_one_clear_sentence(override: str, message: str) -> None:
    with pytest.raises(FerdistError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_wrong_type_in_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "typed.yaml"
    path.write_text("loop:\n  global_batch_size: [64]\n")
    with pytest.raises(FerdistError, match=r"typed\.yaml: loop\.global_batch_size must be an integer"):
        load_config(path)


def test_broken_yaml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("optim:\n  lr: [1,\n")
    with pytest.raises(FerdistError, match=r"broken\.yaml: line \d+ is not valid YAML"):
        load_config(path)
    with pytest.raises(FerdistError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_secrets_are_redacted_when_printed() -> None:
    cfg = load_config(None, ["tracking.tracking_uri=postgresql://mlflow:hunter2@db:5432/mlflow"])
    assert "hunter2" not in to_yaml(cfg)
    assert redacted(to_flat_dict(cfg))["tracking.tracking_uri"] == "postgresql://mlflow:***@db:5432/mlflow"
    assert cfg.tracking.tracking_uri == "postgresql://mlflow:hunter2@db:5432/mlflow"  # the run still gets it


def test_defaults_are_the_design_defaults() -> None:
    cfg = RunConfig()
    assert cfg.optim.lr == 3e-5 and cfg.loop.epochs == 80 and cfg.model.freeze_blocks == 4
    assert cfg.loop.batch_per_worker(4) == 64
