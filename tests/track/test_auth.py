"""A team tracking server with logins: MLflow's basic-auth app, a real `mlflow server --app-name basic-auth` on
loopback. Who is refused is told in one sentence before Ray starts; the training login trains and registers; the
reading login loads @champion and predicts; no password reaches a log, a param, a tag, an artefact or a checkpoint."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import AUTH_ADMIN_PASSWORD
from mlflow.tracking import MlflowClient
from PIL import Image

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "jobs" / "configs" / "quickstart.yaml"
# Drawn per run, so no file of the repository (which `ray job submit --working-dir .` copies onto the node) holds them.
TRAINER, READER = ("trainer", f"trainer-{secrets.token_hex(8)}"), ("reader", f"reader-{secrets.token_hex(8)}")


def as_login(login: tuple[str, str] | None) -> dict[str, str]:
    """The environment of a job run as ``login`` (MLflow's own variables), or with no login at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "RAY_ADDRESS"))}
    if login:
        env |= {"MLFLOW_TRACKING_USERNAME": login[0], "MLFLOW_TRACKING_PASSWORD": login[1]}
    return env


def job(script: str, *args: str, login: tuple[str, str] | None, cwd: Path, uri: str | None = None
        ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = as_login(login) | ({"MLFLOW_TRACKING_URI": uri} if uri else {})
    return subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=900, check=False)  # fmt: skip


ADMIN = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": AUTH_ADMIN_PASSWORD}


def test_logins_permissions_and_no_secret_anywhere(
    auth_mlflow_server: str, synth_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.server.auth.client import AuthServiceClient

    uri = auth_mlflow_server
    for key, value in ADMIN.items():
        monkeypatch.setenv(key, value)
    # The jobs' Ray sessions in a folder of this test's own (short: Ray's socket paths must fit 107 bytes), so the
    # logs searched for passwords below are theirs, not those of whichever Ray on this machine started last.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    accounts = AuthServiceClient(uri)
    for name, password in (TRAINER, READER):
        accounts.create_user(name, password)
    train = ["--config", str(QUICKSTART), "--set", f"data.manifest={synth_shards}",
             "--set", f"tracking.tracking_uri={uri}", "--set", "tracking.experiment=team",
             "--set", "tracking.registered_model=fer-team", "--set", f"checkpoint.storage_path={tmp_path / 'runs'}",
             "--set", "loop.epochs=2"]  # fmt: skip
    outputs: list[str] = []

    def refused(login: tuple[str, str] | None, sentence: str, *extra: str) -> None:
        done = job("train.py", *train, *extra, login=login, cwd=tmp_path)
        outputs.append(done.stdout + done.stderr)
        last = [line for line in done.stderr.splitlines() if line.strip()][-1]
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert last == f"error: {sentence}"
        assert "worker(s)" not in done.stderr  # nothing past the preflight: Ray never started

    where = f"the MLflow server at {uri}"
    refused(None, f"{where} asks for a login and none was given; set MLFLOW_TRACKING_USERNAME and "
                  "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account on it")  # fmt: skip
    refused((TRAINER[0], "not-the-password"), f"{where} refused user 'trainer' (a wrong password, or no such "
            "account); check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
    assert not (tmp_path / "runs").exists()

    # The training login: trains, logs and registers (a new model and experiment are its own).
    done = job("train.py", *train, login=TRAINER, cwd=tmp_path)
    outputs.append(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "registered fer-team v1" in done.stderr and "now @champion" in done.stderr, done.stderr[-3000:]

    # The reading login: READ on the experiment and the model, nothing more.
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("team")
    accounts.grant_user_permission(READER[0], "experiment", experiment.experiment_id, "READ")
    accounts.grant_user_permission(READER[0], "registered_model", "fer-team", "READ")
    refused(READER, f"user 'reader' may not register versions of model 'fer-team' on {where} (permission denied); "
                    "ask its admin for EDIT on registered model 'fer-team'", "--set", "name=reader-run")  # fmt: skip
    refused(READER, f"user 'reader' may not log runs in experiment 'team' on {where} (permission denied); ask its "
                    "admin for EDIT on experiment 'team'", "--set", "name=reader-run",
            "--set", "tracking.registered_model=")  # fmt: skip
    face = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8)).save(face)
    done = job("predict.py", str(face), "--model", "models:/fer-team@champion", "--detect", "off", login=READER,
               cwd=tmp_path, uri=uri)  # fmt: skip
    outputs.append(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    shown = done.stdout + done.stderr
    assert any(label in shown for label in ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"))
    accounts.create_user("nobody", "nobody-Secret-1234")
    done = job("predict.py", str(face), "--model", "models:/fer-team@champion", "--detect", "off",
               login=("nobody", "nobody-Secret-1234"), cwd=tmp_path, uri=uri)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: user 'nobody' may not read models:/fer-team@champion on {where} (permission denied); ask its admin "
        "for READ on registered model 'fer-team'")  # fmt: skip

    # No password anywhere: job output, the run's params and tags, its artefacts, the checkpoints, Ray's logs.
    secrets = [TRAINER[1], READER[1], AUTH_ADMIN_PASSWORD]
    (run,) = client.search_runs([experiment.experiment_id])
    texts = [*outputs, *run.data.params.values(), *run.data.tags.values()]
    artefacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artefacts")))
    logs = [f for session in (ray_tmp / "ray").glob("session_2*") for f in (session / "logs").rglob("*")]
    files = [*artefacts.rglob("*"), *(tmp_path / "runs").rglob("*"), *logs]
    blobs = [f.read_bytes() for f in files if f.is_file() and not f.is_symlink()]
    assert len(blobs) > 10 and sum(f.is_file() for f in logs) > 5
    for secret in secrets:
        assert not any(secret in text for text in texts), secret
        assert not any(secret.encode() in blob for blob in blobs), secret
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_submitted_job_logs_in_with_the_nodes_login_and_the_job_record_holds_no_secret(
    auth_mlflow_server: str, synth_shards: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cluster setup docs/tracking-and-serving.md gives: the login is in the nodes' environment (loaded by the
    command that starts Ray), the job carries only MLFLOW_TRACKING_URI. The job trains and registers; neither the
    CLI's output, the job's record (`ray job list`, what the dashboard shows) nor Ray's logs hold the password."""
    import json

    from conftest import RAY, running_ray_head
    from mlflow.server.auth.client import AuthServiceClient

    uri, login = auth_mlflow_server, ("cluster", f"cluster-{secrets.token_hex(8)}")
    for key, value in ADMIN.items():
        monkeypatch.setenv(key, value)
    AuthServiceClient(uri).create_user(*login)
    client_env = {k: v for k, v in as_login(None).items()} | {"RAY_AUTH_MODE": "token"}
    node_env = {"MLFLOW_TRACKING_USERNAME": login[0], "MLFLOW_TRACKING_PASSWORD": login[1]}
    ray_dir = tmp_path_factory.mktemp("ray")  # short: Ray's socket paths must stay under 108 bytes
    with running_ray_head(ray_dir, node_env) as address:
        submitted = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env-json",
             json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": uri}}), "--", "python", "jobs/train.py",
             "--config", "jobs/configs/quickstart.yaml", "--set", f"data.manifest={synth_shards}",
             "--set", f"checkpoint.storage_path={tmp_path / 'runs'}", "--set", "loop.epochs=1",
             "--set", "tracking.experiment=cluster", "--set", "tracking.registered_model=fer-cluster",
             "--workers", "1", "--cpu"],
            cwd=ROOT, capture_output=True, text=True, timeout=900, env=client_env,
        )  # fmt: skip
        record = subprocess.run([RAY, "job", "list", "--address", address], capture_output=True, text=True,
                                timeout=120, env=client_env)  # fmt: skip
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-4000:]
    assert "registered fer-cluster v1" in submitted.stdout + submitted.stderr
    assert record.returncode == 0 and "MLFLOW_TRACKING_URI" in record.stdout  # the job's record was read
    logs = [f.read_bytes() for f in ray_dir.rglob("*") if f.is_file() and not f.is_symlink()]
    assert len(logs) > 10
    assert login[1] not in submitted.stdout + submitted.stderr + record.stdout
    assert not any(login[1].encode() in blob for blob in logs)
