"""The path users take, on loopback: `ray start --head` (dashboard on 127.0.0.1), `ray job submit --working-dir .`
of jobs/train.py and jobs/tune.py reading shards from an S3 server, checkpointing to it, tracking to a real
`mlflow server`; the test then checks the job status, the MLflow runs, the checkpoint in S3 and the registry."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from conftest import ROOT, running_ray_head
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray head node started the way a cluster's head is, with its job API on 127.0.0.1 only."""
    with running_ray_head(tmp_path_factory.mktemp("ray")) as address:
        yield address


# Ray 2.60 clusters require their auth token (~/.ray/auth_token, written by `ray start`); clients send it only in
# token mode.
CLIENT_ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "token"}


def submit(address: str, env_vars: dict[str, str], *entrypoint: str) -> subprocess.CompletedProcess:
    """`ray job submit` from the repository root, as the README shows; waits for the job and returns the CLI's run."""
    runtime_env = json.dumps({"env_vars": env_vars})
    return subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env-json", runtime_env, "--",
         "python", *entrypoint],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=CLIENT_ENV,
    )  # fmt: skip


def job_env(endpoint: str, mlflow_uri: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_TRACKING_URI": mlflow_uri}  # fmt: skip


@pytest.fixture
def s3_shards(s3: tuple[str, str]) -> tuple[str, str]:
    from ferdist.data.sharding import write_shards
    from ferdist.data.sources import synthetic_source

    endpoint, bucket = s3
    write_shards(synthetic_source(700, seed=4), f"s3://{bucket}/shards", samples_per_shard=32, endpoint_url=endpoint)
    return endpoint, bucket


def test_train_job_submitted_to_a_ray_head(ray_head: str, s3_shards: tuple[str, str], mlflow_server: str) -> None:
    endpoint, bucket = s3_shards
    proc = submit(ray_head, job_env(endpoint, mlflow_server), "jobs/train.py", "--config",
                  "jobs/configs/quickstart.yaml", "--set", "name=submitted", "--set", f"data.manifest=s3://{bucket}/shards",
                  "--set", f"checkpoint.storage_path=s3://{bucket}/runs", "--set", "loop.epochs=2",
                  "--set", "tracking.experiment=submitted", "--set", "tracking.registered_model=fer-submitted",
                  "--workers", "1", "--cpu")  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (job_id,) = set(re.findall(r"Job '(raysubmit_\w+)' succeeded", proc.stdout + proc.stderr))
    status = subprocess.run([RAY, "job", "status", "--address", ray_head, job_id], capture_output=True, text=True,
                            env=CLIENT_ENV, timeout=120)  # fmt: skip
    plain = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)  # the CLI colours its output
    assert f"Job '{job_id}' succeeded" in plain, plain  # what `ray job status` says of a SUCCEEDED job

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("submitted").experiment_id])
    assert run.data.tags["ferdist.status"] == "completed" and run.data.params["loop.epochs"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [1, 2]
    assert "model_card.md" in {a.path for a in client.list_artifacts(run.info.run_id)}
    version = client.get_model_version_by_alias("fer-submitted", "champion")
    assert version.run_id == run.info.run_id and "## Bias and risks" in version.description
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(
        Bucket=bucket, Prefix="runs/submitted/")["Contents"]]  # fmt: skip
    assert any(k.endswith("/model.pt") and "/model_epoch_" in k for k in keys)  # the best model, self-contained
    assert any(k.endswith("/trained.pt") and "/checkpoint_epoch_" in k for k in keys)  # slim resume state


def test_sweep_job_submitted_to_a_ray_head(ray_head: str, s3_shards: tuple[str, str], mlflow_server: str) -> None:
    endpoint, bucket = s3_shards
    proc = submit(ray_head, job_env(endpoint, mlflow_server), "jobs/tune.py", "--config",
                  "jobs/configs/quickstart-sweep.yaml", "--samples", "2", "--name", "submitted-sweep",
                  "--set", f"data.manifest=s3://{bucket}/shards", "--set", f"checkpoint.storage_path=s3://{bucket}/runs",
                  "--set", "loop.epochs=1", "--set", "sweep.scheduler=fifo",
                  "--set", "tracking.registered_model=fer-submitted-sweep")  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("submitted-sweep").experiment_id
    trials = client.search_runs([experiment], "tags.`mlflow.parentRunId` != ''")
    assert len(trials) == 2 and all(r.data.tags["ferdist.status"] == "completed" for r in trials)
    (parent,) = client.search_runs([experiment], "tags.`ferdist.sweep` = 'submitted-sweep'")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials"] == 2
    champion = client.get_model_version_by_alias("fer-submitted-sweep", "champion")
    assert champion.run_id == parent.data.tags["best_run_id"]
