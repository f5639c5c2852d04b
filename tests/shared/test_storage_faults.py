"""Storage faults met before and around a run, against real S3 servers on loopback: the checkpoint store checked
before Ray starts, a hung endpoint named in seconds, one endpoint setting for every client, the outage budget, and
the leftovers of a failed attempt. (Outages during real runs, on SeaweedFS: tests/test_object_store.py.)"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pyarrow.fs
import pytest
from conftest import free_port

from ferdist import outage
from ferdist.config import RunConfig, load_config
from ferdist.errors import FerdistError
from ferdist.launch import preflight
from ferdist.launch import trainer as launch
from ferdist.train import runs
from ferdist.train.checkpoint import ModelStore, discard_after

QUICKSTART = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "quickstart.yaml"


def run_config(manifest: str, *extra: str) -> RunConfig:
    return load_config(QUICKSTART, [f"data.manifest={manifest}", "tracking.backend=none", *extra])


@pytest.fixture
def hung_endpoint() -> Iterator[str]:
    """A server that accepts TCP connections and never answers (a wedged proxy or gateway)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ("s3://no-such-bucket/runs", "checkpoint.storage_path: bucket 'no-such-bucket' does not exist"),
        ("s3://{bucket}/runs", "checkpoint.storage_path: cannot reach the S3 endpoint http://127.0.0.1:{port} (for 's3://"),
    ],
    ids=["missing-bucket", "server-down"],
)
def test_checkpoint_store_is_checked_before_ray_starts(
    storage: str, message: str, s3: tuple[str, str], synth_shards: Path
) -> None:
    endpoint, bucket = s3
    port = free_port()  # nobody listens there
    where = endpoint if "no-such-bucket" in storage else f"http://127.0.0.1:{port}"
    cfg = run_config(str(synth_shards), f"checkpoint.storage_path={storage.format(bucket=bucket)}",
                     f"checkpoint.endpoint_url={where}")  # fmt: skip
    with pytest.raises(FerdistError) as caught:
        preflight.prepare(cfg)
    assert message.format(port=port) in str(caught.value)
    assert "allow_bucket_creation" not in str(caught.value)


@pytest.mark.slow
def test_rejected_credentials_at_the_checkpoint_store_are_named(
    seaweed_s3: tuple[str, str], synth_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SeaweedFS checks credentials (moto does not)."""
    from ferdist import storage

    endpoint, bucket = seaweed_s3
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage._s3_client.cache_clear()  # clients made with the right key earlier in this process
    try:
        cfg = run_config(str(synth_shards), f"checkpoint.storage_path=s3://{bucket}/runs",
                         f"checkpoint.endpoint_url={endpoint}")  # fmt: skip
        with pytest.raises(FerdistError) as caught:
            preflight.prepare(cfg)
    finally:
        storage._s3_client.cache_clear()
    expected = f"checkpoint.storage_path: S3 refused access to 's3://{bucket}/runs' at {endpoint}"
    assert str(caught.value).startswith(expected)
    assert "not-the-secret" not in str(caught.value)


def test_a_checkpoint_store_that_cannot_be_created_is_named(synth_shards: Path, tmp_path: Path) -> None:
    (tmp_path / "runs").write_text("a file where the folder should be")
    cfg = run_config(str(synth_shards), f"checkpoint.storage_path={tmp_path / 'runs' / 'fer'}")
    with pytest.raises(FerdistError, match=r"checkpoint.storage_path: cannot create the folder .* is a file"):
        preflight.prepare(cfg)


def test_a_missing_data_bucket_is_named_as_such(object_store: tuple[str, str]) -> None:
    endpoint, _ = object_store
    cfg = run_config("s3://no-such-data/shards", f"data.endpoint_url={endpoint}")
    with pytest.raises(FerdistError) as caught:
        preflight.prepare(cfg)
    assert "bucket 'no-such-data' does not exist" in str(caught.value) and "no manifest" not in str(caught.value)


@pytest.mark.parametrize("where", ["data", "checkpoint"])
def test_a_hung_endpoint_is_named_within_seconds(where: str, hung_endpoint: str, s3: tuple[str, str],
                                                 synth_shards: Path) -> None:  # fmt: skip
    endpoint, bucket = s3
    if where == "data":
        cfg = run_config("s3://shards/fer", f"data.endpoint_url={hung_endpoint}")
    else:
        cfg = run_config(str(synth_shards), f"checkpoint.storage_path=s3://{bucket}/runs",
                         f"checkpoint.endpoint_url={hung_endpoint}")  # fmt: skip
    started = time.monotonic()
    with pytest.raises(FerdistError) as caught:
        preflight.prepare(cfg)
    # Bounded by the quick client's timeouts (3 s connect, 5 s read, 2 attempts), not by minutes of retries.
    assert time.monotonic() - started < 30
    assert f"the S3 endpoint {hung_endpoint} accepts connections but does not answer" in str(caught.value)
    assert f"{hung_endpoint}/" not in str(caught.value)  # the endpoint, not the request URL


def test_one_endpoint_setting_reaches_every_client_ray_included(s3: tuple[str, str]) -> None:
    """data.endpoint_url alone (no AWS_ENDPOINT_URL) sends checkpoints to the same store, through the filesystem Ray
    is given; checkpoint.endpoint_url overrides it for checkpoints only."""
    endpoint, bucket = s3
    cfg = run_config(f"s3://{bucket}/shards", f"data.endpoint_url={endpoint}", f"checkpoint.storage_path=s3://{bucket}/runs")
    storage_path, filesystem = launch.storage_target(cfg)
    assert storage_path == f"{bucket}/runs" and outage.budget_of(filesystem) == 300
    with filesystem.open_output_stream(f"{storage_path}/probe.txt") as out:
        out.write(b"here")
    body = boto3.client("s3", endpoint_url=endpoint).get_object(Bucket=bucket, Key="runs/probe.txt")["Body"].read()
    assert body == b"here"
    elsewhere = run_config(f"s3://{bucket}/shards", f"data.endpoint_url={endpoint}",
                           f"checkpoint.storage_path=s3://{bucket}/runs", f"checkpoint.endpoint_url=http://127.0.0.1:{free_port()}",
                           "checkpoint.outage_s=0")  # fmt: skip
    _, other = launch.storage_target(elsewhere)
    with pytest.raises(FerdistError, match="did not answer for 0 s"):
        other.get_file_info(f"{bucket}/runs/probe.txt")


class Flaky:
    """Fails the way a store that is down does (a refused connection), ``failures`` times, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0
        self.down = pyarrow.fs.S3FileSystem(endpoint_override=f"127.0.0.1:{free_port()}", scheme="http",
                                            connect_timeout=1, request_timeout=1)  # fmt: skip

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            self.down.get_file_info("bucket/key")  # raises pyarrow's NETWORK_CONNECTION OSError
        return "answered"


def test_transient_failures_are_retried_within_the_budget_and_others_are_not() -> None:
    flaky = Flaky(failures=2)
    assert outage.retried(flaky, budget_s=60, what="reading x") == "answered" and flaky.calls == 3

    with pytest.raises(outage.StorageOutage, match=r"did not answer for 2 s \(checkpoint.outage_s\) while reading x "
                       r"\(NETWORK_CONNECTION during HeadObject\).*re-submit the same command"):  # fmt: skip
        outage.retried(Flaky(failures=1000), budget_s=2, what="reading x")

    calls = []

    def denied() -> None:
        calls.append(1)
        raise OSError("AWS Error ACCESS_DENIED during PutObject operation: Access Denied")

    with pytest.raises(OSError, match="ACCESS_DENIED"):
        outage.retried(denied, budget_s=60, what="writing x")
    assert calls == [1]  # not worth waiting for


def test_leftovers_of_a_failed_attempt_are_removed_on_resume(tmp_path: Path) -> None:
    """An attempt wrote epoch 4's folders but failed before Ray registered them; the next attempt resumes from epoch
    2's state, so epoch 4's folders are from a timeline it re-trains and must not be taken for the best or latest."""
    import json

    for name, epoch, acc in [("model_epoch_0002", 2, 0.4), ("checkpoint_epoch_0002", 2, 0.4),
                             ("model_epoch_0004", 4, 0.9), ("checkpoint_epoch_0004", 4, 0.9)]:  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"epoch": epoch, "metrics": {"val/acc": acc}}))
    (tmp_path / "model_epoch_0005").mkdir()  # cut short: no summary.json yet
    store = ModelStore(pyarrow.fs.LocalFileSystem(), str(tmp_path))

    removed = discard_after(store, 2)
    assert removed == ["checkpoint_epoch_0004", "model_epoch_0004", "model_epoch_0005"]
    best, last = runs.best_and_last(str(tmp_path))
    assert best.summary["epoch"] == 2 and last.summary["epoch"] == 2
    assert discard_after(store, 2) == []
