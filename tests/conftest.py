"""Shared fixtures: a small SYNTHETIC FER set, its shards, and a real S3-compatible server on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))

REAL_FER2013 = ROOT.parent / "shared" / "data" / "fer2013" / "fer2013.csv.xz"


@pytest.fixture(scope="session")
def synth_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """350 SYNTHETIC faces in the Kaggle CSV layout (280 train / 35 val / 35 test)."""
    from ferdist.synth import make_synthetic_csv

    path = tmp_path_factory.mktemp("synth") / "synth.csv"
    path.write_bytes(make_synthetic_csv(350, seed=1))
    return path


@pytest.fixture(scope="session")
def synth_shards(synth_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic CSV sharded 16 samples a shard (18 train, 3 val, 3 test shards)."""
    from ferdist.sharding import write_shards
    from ferdist.sources import open_source

    dest = tmp_path_factory.mktemp("shards") / "synth"
    write_shards(open_source(synth_csv), str(dest), samples_per_shard=16, workers=2)
    return dest


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 endpoint (moto's server, spoken to over HTTP) on an ephemeral loopback port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(endpoint, bucket): a fresh bucket on the S3 server, with test credentials in the environment."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    bucket = "b-" + request.node.name.lower().replace("_", "-")[:50]
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    yield s3_server, bucket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` process on an ephemeral loopback port: SQLite store, artefacts proxied over HTTP."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:  # wait for the server to answer its health check
        try:
            if requests.get(f"{uri}/health", timeout=2).ok:
                break
        except requests.ConnectionError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
        time.sleep(0.2)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)
