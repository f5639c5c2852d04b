"""Real Ray Train runs on a local Ray: 2 CPU workers learn, agree with a 1-process evaluation, survive a killed
worker with no epoch lost or repeated, and `jobs/train.py` runs end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ferdist.config import RunConfig, load_config
from ferdist.data.loader import open_dataset
from ferdist.train.checkpoint import load_classifier, read_history
from ferdist.train.loop import evaluate

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 8


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    # The dashboard serves the state API that the fault test uses to find a worker's process.
    ray.init(num_cpus=4, include_dashboard=True, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shards_1400(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,400 SYNTHETIC faces (1,120 train / 140 val / 140 test), 32 per shard."""
    from ferdist.data.sharding import write_shards
    from ferdist.data.sources import synthetic_source

    dest = tmp_path_factory.mktemp("shards1400") / "synth"
    write_shards(synthetic_source(1400, seed=1), str(dest), samples_per_shard=32, workers=2)
    return dest


def two_worker_run(shards: Path, storage: Path, name: str, *extra: str) -> RunConfig:
    return load_config(
        ROOT / "jobs" / "configs" / "quickstart.yaml",
        [
            f"name={name}",
            f"data.manifest={shards}",
            f"checkpoint.storage_path={storage}",
            f"loop.epochs={EPOCHS}",
            "loop.global_batch_size=32",
            "workers.num_workers=2",
            "tracking.backend=none",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def clean_run(ray_local: None, shards_1400: Path, tmp_path_factory: pytest.TempPathFactory):
    from ferdist.launch import trainer as launch

    cfg = two_worker_run(shards_1400, tmp_path_factory.mktemp("runs"), "clean")
    return cfg, launch.summarize(launch.build_trainer(cfg).fit())


def test_two_workers_learn_and_match_a_single_process_evaluation(clean_run, shards_1400: Path) -> None:
    cfg, summary = clean_run
    last = summary.last_metrics
    assert summary.last_epoch == EPOCHS and last["val/samples"] == 140
    assert last["val/acc"] > 0.35  # chance is 1/7 = 0.143
    assert last["train/loss"] < read_history(latest_checkpoint(Path(summary.run_path))).history[0]["train/loss"]
    # The best epoch's model is kept whether or not it was a resume point, and the newest resume state beside it.
    assert Path(summary.best_checkpoint).name == f"model_epoch_{summary.best_epoch:04d}"
    resume = sorted(p.name for p in Path(summary.run_path).glob("checkpoint_epoch_*"))
    assert resume == [f"checkpoint_epoch_{EPOCHS:04d}"]

    # The same weights evaluated by one process: identical counts, so identical accuracy and macro-F1.
    latest = latest_checkpoint(Path(summary.run_path))
    model, _ = load_classifier(latest)
    single = evaluate(model, open_dataset(str(shards_1400)), load_config(None, [f"data.manifest={shards_1400}",
                      "model.image_size=32", "loop.global_batch_size=32"]), split="val", rank=0, world_size=1,
                      device=torch.device("cpu"))  # fmt: skip
    assert single["acc"] == last["val/acc"] and single["macro_f1"] == last["val/macro_f1"]
    assert single["loss"] == pytest.approx(last["val/loss"], rel=1e-5)


def latest_checkpoint(run_dir: Path) -> Path:
    folders = [p.parent for p in run_dir.glob("checkpoint_*/train_state.pt")]
    return max(folders, key=lambda p: read_history(p).epochs_done)


def _train_worker_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    # This test's cluster, by address: with none the state API refuses a machine where another Ray runs too.
    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])  # fmt: skip
    return [a.pid for a in actors]


def _committed_epoch(run_dir: Path) -> int:
    """The epoch of the newest checkpoint Ray Train has registered (what a restarted worker group resumes from), read
    from the checkpoint manager's snapshot that Ray writes to the run folder after each registration; 0 if none."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or caught mid-write
        return 0
    latest = snapshot.get("latest_checkpoint_result")
    return int(latest["metrics"]["epoch"]) if latest else 0


def test_a_killed_worker_resumes_from_the_last_checkpoint(clean_run, shards_1400: Path, tmp_path: Path) -> None:
    from ferdist.launch import trainer as launch

    cfg = two_worker_run(shards_1400, tmp_path, "fault", "checkpoint.max_failures=2")
    outcome: dict[str, object] = {}
    runner = threading.Thread(target=lambda: outcome.update(result=launch.build_trainer(cfg).fit()), daemon=True)
    runner.start()
    run_dir = tmp_path / "fault"
    deadline = time.monotonic() + 300
    # Wait until Ray has committed a checkpoint, then kill a training worker process mid-run. A checkpoint folder on
    # disk is not enough: Ray resumes from the checkpoints its controller has registered, and on a loaded machine
    # the controller can poll the workers' reports seconds after the folders are written (CI once killed a worker
    # after two folders but before any registration, and the run rightly restarted from epoch 1).
    while _committed_epoch(run_dir) < 1:
        assert runner.is_alive() and time.monotonic() < deadline, "the run ended before Ray committed a checkpoint"
        time.sleep(0.05)
    pids = _train_worker_pids()
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)
    runner.join(timeout=600)

    summary = launch.summarize(outcome["result"])
    latest = latest_checkpoint(run_dir)
    state = read_history(latest)
    # Resumed once, from the last checkpoint Ray had committed (the newest folder may still have been uploading).
    assert len(state.resumed_at) == 1 and 1 <= state.resumed_at[0] < EPOCHS
    assert [m["epoch"] for m in state.history] == list(range(1, EPOCHS + 1))  # no epoch lost or repeated
    # Resuming changes nothing: the run ends exactly where the uninterrupted one did.
    _, clean = clean_run
    assert summary.last_metrics["val/acc"] == clean.last_metrics["val/acc"]
    assert summary.last_metrics["val/loss"] == pytest.approx(clean.last_metrics["val/loss"], rel=1e-6)


def test_train_job_end_to_end_on_s3(tmp_path: Path, s3: tuple[str, str]) -> None:
    """jobs/train.py as a user runs it (its own in-process Ray, one worker) with shards and checkpoints on S3."""
    import boto3

    from ferdist.data.sharding import write_shards
    from ferdist.data.sources import synthetic_source

    endpoint, bucket = s3
    write_shards(synthetic_source(700, seed=2), f"s3://{bucket}/shards", samples_per_shard=32, endpoint_url=endpoint)
    # No MLFLOW_TRACKING_URI: the run must land in the embedded default, ./mlflow.db.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {"AWS_ENDPOINT_URL": endpoint}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(ROOT / "jobs/configs/quickstart.yaml"),
         "--set", f"data.manifest=s3://{bucket}/shards", "--set", f"checkpoint.storage_path=s3://{bucket}/runs",
         "--set", "loop.epochs=2", "--workers", "1", "--cpu"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "quickstart: 2 epochs; best epoch" in proc.stderr
    assert "randomly initialised, not pretrained" in proc.stderr
    checkpoint = proc.stderr.split("best checkpoint: ")[1].split()[0]
    assert checkpoint.startswith(f"s3://{bucket}/runs/quickstart/model_epoch_")
    key = checkpoint.removeprefix(f"s3://{bucket}/") + "/model.pt"
    assert boto3.client("s3", endpoint_url=endpoint).head_object(Bucket=bucket, Key=key)["ContentLength"] > 100_000
    # Tracked like a sweep trial, in the embedded default store (./mlflow.db): reports, status, registered model.
    from mlflow.tracking import MlflowClient

    assert "registered fer-vitmae v1 (val acc" in proc.stderr and "now @champion" in proc.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ferdist").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["ferdist.status"] == "completed"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [1, 2]
    reports = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert reports == {"reports/class_report.md", "reports/confusion_matrix.png", "reports/learning_curves.png"}
    champion = client.get_model_version_by_alias("fer-vitmae", "champion")
    assert str(champion.version) == "1" and champion.run_id == run.info.run_id
