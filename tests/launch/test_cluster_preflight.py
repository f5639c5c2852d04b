"""A job pointed at a Ray cluster that is down (RAY_ADDRESS) says so in one sentence, before any data check, any
MLflow run or any Ray process: train.py, tune.py and pretrain.py alike."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pretrain as pretrain_job
import pytest
import train as train_job
import tune as tune_job

from ferdist.errors import FerdistError
from ferdist.launch import cluster

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
JOBS = {
    "train": (train_job, ["--config", str(CONFIGS / "quickstart.yaml")]),
    "tune": (tune_job, ["--config", str(CONFIGS / "quickstart-sweep.yaml"), "--samples", "1"]),
    "pretrain": (pretrain_job, ["--config", str(CONFIGS / "pretrain-quickstart.yaml")]),
}
FIX = "start the cluster (`ray up`, docs/cluster.md) or unset RAY_ADDRESS to run on this machine"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("job", sorted(JOBS))
def test_a_job_sent_to_a_cluster_that_is_down_is_one_sentence_and_writes_nothing(
    job: str, synth_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Catches a cluster check placed after the data checks or the MLflow run (files in the working folder), a
    traceback from Ray's own connection error, or a Ray started anyway."""
    import ray

    module, args = JOBS[job]
    port = closed_port()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    assert module.main([*args, "--set", f"data.manifest={synth_shards}"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no Ray cluster answers at RAY_ADDRESS=127.0.0.1:{port} (connection refused); {FIX}"]
    assert "Traceback" not in err and not ray.is_initialized()
    assert os.listdir(tmp_path) == []  # no mlflow.db, no runs/ folder: nothing was opened


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("http://127.0.0.1:8265", "RAY_ADDRESS=http://127.0.0.1:8265 is a cluster's job API, which a job cannot join: "
                                  "submit with `ray job submit --address http://127.0.0.1:8265"),
        ("head-without-port", "RAY_ADDRESS=head-without-port is not host:port (e.g. 10.0.0.10:6379"),
        ("10.0.0.10:sixty", "RAY_ADDRESS=10.0.0.10:sixty is not host:port"),
        ("ray://nohost.invalid:10001", "no Ray cluster answers at RAY_ADDRESS=ray://nohost.invalid:10001 ("),
    ],
)  # fmt: skip
def test_addresses_that_cannot_be_joined(address: str, message: str) -> None:
    with pytest.raises(FerdistError) as caught:
        cluster.check(address)
    assert str(caught.value).startswith(message)


def test_a_listening_cluster_and_no_address_pass() -> None:
    """The check passes what it must: no RAY_ADDRESS (Ray starts here), Ray's own 'auto', and a port that answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        cluster.check(f"127.0.0.1:{port}")
        cluster.check(f"ray://127.0.0.1:{port}")
    cluster.check(None)
    cluster.check("auto")
