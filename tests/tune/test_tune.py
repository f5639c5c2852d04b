"""jobs/tune.py as a user runs it, against a real `mlflow server` on 127.0.0.1: ASHA stops the laggard, one MLflow
run per trial (not per worker) under the sweep's parent run, reports, the registered @champion serving the
checkpoint's predictions; a sweep killed mid-way resumes without redoing finished trials."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, free_port
from mlflow.tracking import MlflowClient
from PIL import Image

TUNE = str(ROOT / "jobs" / "tune.py")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ferdist.data.sharding import write_shards
    from ferdist.data.sources import synthetic_source

    dest = tmp_path_factory.mktemp("tune") / "shards"
    write_shards(synthetic_source(1400, seed=3), str(dest), samples_per_shard=32, workers=2)
    return dest


def sweep_file(tmp_path: Path, shards: Path, *, name: str, sweep: str, search: str, epochs: int, workers: int) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""
name: {name}
data: {{manifest: {shards}, loader_workers: 0}}
model: {{pretrained: "random:tiny", image_size: 32, freeze_blocks: 0}}
optim: {{lr: 2.0e-3, warmup_epochs: 1}}
loop: {{epochs: {epochs}, global_batch_size: 32}}
workers: {{num_workers: {workers}, use_gpu: false, cpus_per_worker: 0.9}}
checkpoint: {{storage_path: {tmp_path / 'runs'}}}
tracking: {{registered_model: {name}-model}}
sweep: {sweep}
search:
  {search}
""")
    return path


def tune_env(uri: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"MLFLOW_TRACKING_URI": uri}


def children(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], "tags.`mlflow.parentRunId` != ''")


def steps(client: MlflowClient, run) -> list[int]:  # noqa: ANN001
    return [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")]


def png(face: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(face).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.slow
def test_asha_stops_the_laggard_one_run_per_trial_and_champion_serves_the_checkpoint(
    shards: Path, mlflow_server: str, tmp_path: Path
) -> None:
    # Two trials of 2 workers each, one at a time (1.9 of 2 CPUs per trial): lr 3e-3 learns, lr 1e-7 cannot, so
    # at the epoch-2 rung ASHA (keep the top half) stops the second one.
    config = sweep_file(tmp_path, shards, name="asha", epochs=4, workers=2,
                        sweep="{samples: 1, scheduler: asha, grace_period: 2, reduction_factor: 2, driver_cpus: 0.1}",
                        search="optim.lr: {grid: [3.0e-3, 1.0e-7]}")  # fmt: skip
    proc = subprocess.run([sys.executable, TUNE, "--config", str(config)], capture_output=True, text=True,
                          timeout=900, env=tune_env(mlflow_server), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 trials: 1 completed, 1 stopped early, 0 failed; 6 of 8 trial-epochs run, 2 saved" in proc.stderr

    client = MlflowClient(mlflow_server)
    runs = children(client, "asha")
    assert len(runs) == 2  # one per trial, though each trial ran 2 workers
    experiment = client.get_experiment_by_name("asha").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`ferdist.sweep` = 'asha'")
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    by_status = {r.data.tags["ferdist.status"]: r for r in runs}
    assert set(by_status) == {"completed", "early-stopped"}
    good, stopped = by_status["completed"], by_status["early-stopped"]
    assert float(good.data.params["optim.lr"]) == 3e-3 and float(stopped.data.params["optim.lr"]) == 1e-7
    assert steps(client, good) == [1, 2, 3, 4]
    # Stopped at the epoch-2 rung: Tune saw 2 epochs of it (the summary line above). Its workers keep training until
    # Tune's stop reaches them, 3-4 s after the decision on this machine: one or two of this run's 1.4 s epochs
    # (under one on a GPU epoch of 6.5 s), so MLflow has epochs 1-2 and possibly the ones in flight.
    assert steps(client, stopped)[:2] == [1, 2]
    for run in runs:
        assert {m for m in run.data.metrics} >= {"train/loss", "train/acc", "train/lr", "val/loss", "val/acc",
                                                 "val/macro_f1", "perf/samples_per_s"}  # fmt: skip
        assert {a.path for a in client.list_artifacts(run.info.run_id, "reports")} == {
            "reports/class_report.md", "reports/confusion_matrix.png", "reports/learning_curves.png"}  # fmt: skip
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert parent.data.metrics["trials"] == 2 and parent.data.metrics["trial_epochs_saved"] == 2
    assert parent.data.tags["best_run_id"] == good.info.run_id

    champion = client.get_model_version_by_alias("asha-model", "champion")
    assert champion.run_id == good.info.run_id
    best = max(m.value for m in client.get_metric_history(good.info.run_id, "val/acc"))
    assert float(champion.tags["val_acc"]) == pytest.approx(best, abs=1e-6)

    # The served model and the checkpoint it came from give the same probabilities on raw PNG faces.
    import mlflow.pyfunc

    from ferdist.constants import FER_CLASSES
    from ferdist.data.loader import build_loader, open_dataset
    from ferdist.serve.inference import Predictor
    from ferdist.track.registry import using_store
    from ferdist.train import runs as stored
    from ferdist.train.checkpoint import load_classifier

    with using_store(mlflow_server):
        served = mlflow.pyfunc.load_model("models:/asha-model@champion")
    trial_runs = tmp_path / "runs" / "asha" / "trials"
    (checkpoint,) = [c for c in stored.models(str(trial_runs / good.data.tags["ferdist.run"]))
                     if c.summary["epoch"] == int(champion.tags["epoch"])]  # fmt: skip
    model, cfg = load_classifier(Path(checkpoint.path))
    loader = build_loader(open_dataset(str(shards)), "val", cfg.data, batch_size=64, rank=0, world_size=1,
                          training=False)  # fmt: skip
    faces = torch.cat([b["image"] for b in loader])[:, 0].numpy()
    table = served.predict(pd.DataFrame({"image": [png(f) for f in faces]}))
    columns = [f"p_{c.lower()}" for c in FER_CLASSES]
    np.testing.assert_allclose(table[columns].to_numpy(), Predictor(model, image_size=32).probabilities(faces),
                               atol=1e-6)  # fmt: skip
    assert list(table["face"]) == [0] * len(faces)  # 48×48 faces are crops: one row each


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_finished_trials(
    shards: Path, mlflow_server: str, tmp_path: Path
) -> None:
    config = sweep_file(tmp_path, shards, name="resumed", epochs=2, workers=1,
                        sweep="{samples: 3, scheduler: fifo, driver_cpus: 0.1, seed: 0}",
                        search="optim.lr: {loguniform: [1.0e-3, 3.0e-3]}")  # fmt: skip
    client = MlflowClient(mlflow_server)
    proc = subprocess.Popen([sys.executable, TUNE, "--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=tune_env(mlflow_server), cwd=tmp_path,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    while not any(r.data.tags.get("ferdist.status") == "completed" for r in children(client, "resumed")):
        assert proc.poll() is None and time.monotonic() < deadline, "no trial finished"
        time.sleep(0.5)  # polling MLflow for the condition, not waiting a fixed time
    # A crash of the whole driver node: the sweep, its in-process Ray and every trial die at once.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {r.info.run_id for r in children(client, "resumed") if r.data.tags.get("ferdist.status") == "completed"}
    assert 1 <= len(finished) < 3

    again = subprocess.run([sys.executable, TUNE, "--config", str(config)], capture_output=True, text=True,
                           timeout=120, env=tune_env(mlflow_server), cwd=tmp_path)  # fmt: skip
    assert again.returncode == 2 and "already exists" in again.stderr and "--resume" in again.stderr

    resumed = subprocess.run([sys.executable, TUNE, "--config", str(config), "--resume"], capture_output=True,
                             text=True, timeout=900, env=tune_env(mlflow_server), cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "3 trials: 3 completed, 0 stopped early, 0 failed" in resumed.stderr
    runs = children(client, "resumed")
    assert len(runs) == 3 and all(r.data.tags["ferdist.status"] == "completed" for r in runs)
    for run in runs:
        if run.info.run_id in finished:
            assert steps(client, run) == [1, 2]  # finished before the crash: not run again
        else:
            # Resumed from its checkpoint, or started after the restore; each epoch logged once (catches an epoch
            # re-trained after the restore being logged again: the old `set(...) == {1, 2}` passed [1, 2, 1, 2]).
            assert steps(client, run) == [1, 2]
    (parent,) = client.search_runs([client.get_experiment_by_name("resumed").experiment_id],
                                   "tags.`ferdist.sweep` = 'resumed'")  # fmt: skip
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials"] == 3


def test_tracking_server_down_is_one_sentence_before_ray_starts(synth_shards: Path, tmp_path: Path) -> None:
    config = sweep_file(tmp_path, synth_shards, name="down", epochs=1, workers=1, sweep="{samples: 1}",
                        search="optim.lr: {choice: [1.0e-3]}")  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run([sys.executable, TUNE, "--config", str(config)], capture_output=True, text=True,
                          timeout=120, env=tune_env(f"http://127.0.0.1:{free_port()}"), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    assert "cannot reach the MLflow tracking server at http://127.0.0.1:" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
    assert time.monotonic() - started < 60


def test_a_searched_backbone_that_does_not_exist_is_one_sentence_before_ray_starts(
    synth_shards: Path, tmp_path: Path
) -> None:
    """Catches preflight checking the base config's backbone only: a mistyped one among the search's choices
    failed its trial after Ray had started and the sweep's MLflow run was opened."""
    missing = tmp_path / "pretrained" / "typo"
    config = sweep_file(tmp_path, synth_shards, name="choices", epochs=1, workers=1, sweep="{samples: 1}",
                        search=f"model.pretrained: {{choice: ['random:tiny', '{missing}']}}")  # fmt: skip
    store = tmp_path / "mlflow.db"
    proc = subprocess.run([sys.executable, TUNE, "--config", str(config)], capture_output=True, text=True,
                          timeout=300, env=tune_env(f"sqlite:///{store}"), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and f"search.model.pretrained = '{missing}': " in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists() and not store.exists()


def test_resuming_a_sweep_that_does_not_exist_is_refused_and_leaves_the_store_untouched(
    synth_shards: Path, tmp_path: Path
) -> None:
    """Catches the refusal coming after the tracking store was prepared: a mistyped --resume left an experiment and a
    registered model named after the sweep behind."""
    config = sweep_file(tmp_path, synth_shards, name="typo", epochs=1, workers=1, sweep="{samples: 1}",
                        search="optim.lr: {choice: [1.0e-3]}")  # fmt: skip
    store = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{store}").search_experiments()  # the store exists, with nothing in it
    proc = subprocess.run([sys.executable, TUNE, "--config", str(config), "--resume"], capture_output=True, text=True,
                          timeout=300, env=tune_env(f"sqlite:///{store}"), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "there is no sweep named 'typo' to resume" in proc.stderr, proc.stderr
    client = MlflowClient(f"sqlite:///{store}")
    assert client.get_experiment_by_name("typo") is None and client.search_registered_models() == []
