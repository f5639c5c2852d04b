"""A lost node: two Ray nodes on this machine (a head and a worker node, each with its own CPU budget), a 2-worker
run spread one worker per node, and the worker node killed mid-run, as when a spot instance is reclaimed. The run
waits for capacity, goes on from its last checkpoint once a node joins again, records every epoch exactly once and
ends as succeeded."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port, stop_process_group
from mlflow.tracking import MlflowClient

from ferdist.train.checkpoint import read_history

pytestmark = pytest.mark.slow
EPOCHS = 6


def committed_epoch(run_dir: Path) -> int:
    try:
        latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text()).get("latest_checkpoint_result")
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or caught mid-write
        return 0
    return int(latest["metrics"]["epoch"]) if latest else 0


# Asks the cluster, once per line read, how many nodes are alive and how many Ray Train workers run. In its own
# process: this one imported Ray before the cluster's token mode was set, and Ray reads it at import.
OBSERVER = """
import sys, ray
from ray.util.state import list_actors
ray.init(address=sys.argv[1], configure_logging=False, logging_level="ERROR", log_to_driver=False)
for _ in sys.stdin:
    # This cluster's, by address: with none the state API refuses a machine where another Ray runs too.
    workers = list_actors(address=sys.argv[1], filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    print("answer:", sum(1 for n in ray.nodes() if n["Alive"]), len(workers), flush=True)
"""


class Observer:
    def __init__(self, gcs: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", OBSERVER, gcs], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)  # fmt: skip

    def ask(self) -> tuple[int, int]:
        """(alive nodes, alive Ray Train workers)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("?\n")
        self.proc.stdin.flush()
        while not (line := self.proc.stdout.readline()).startswith("answer:"):  # Ray may print warnings too
            assert line, "the observer process ended"
        _, nodes, workers = line.split()
        return int(nodes), int(workers)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


RAY = str(Path(sys.executable).with_name("ray"))


def node_ports() -> list[str]:
    """Ports of one node's own services: two nodes on one machine must not share them."""
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]  # fmt: skip


def start_worker_node(gcs: str, env: dict[str, str]) -> subprocess.Popen:
    """`ray start --address` for a node with one CPU, in its own process group (so it can be killed whole)."""
    return subprocess.Popen(
        [RAY, "start", f"--address={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--block",
         "--disable-usage-stats", *node_ports()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip


def wait_until(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = 600) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"the run ended early: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout:.0f} s"
        time.sleep(0.2)


def test_a_reclaimed_worker_node_is_replaced_and_the_run_finishes(
    synth_shards: Path, tmp_path: Path
) -> None:
    port = free_port()
    gcs = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    # Ray 2.60 clusters require their auth token (~/.ray/auth_token, written by `ray start`); clients send it only in
    # token mode. A job's `python` is this environment's.
    env |= {"RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths under it must fit 107 bytes
    head = subprocess.Popen(
        [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1", "--num-gpus=0",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
         f"--ray-client-server-port={free_port()}", "--disable-usage-stats", f"--temp-dir={temp}",
         *node_ports()],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    nodes: list[subprocess.Popen] = []
    observer: Observer | None = None
    try:
        output, _ = head.communicate(timeout=180)
        assert head.returncode == 0, output.decode(errors="replace")
        nodes.append(start_worker_node(gcs, env))
        observer = Observer(gcs, env)
        wait_until(lambda: observer.ask()[0] == 2, "the worker node joining")
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(ROOT / "jobs/configs/quickstart.yaml"),
             "--set", f"data.manifest={synth_shards}", "--set", f"checkpoint.storage_path={tmp_path / 'runs'}",
             "--set", f"loop.epochs={EPOCHS}", "--set", "checkpoint.every_epochs=1", "--set", "data.loader_workers=0",
             "--set", "loop.global_batch_size=32", "--workers", "2", "--cpu"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env | {"RAY_ADDRESS": gcs}, cwd=tmp_path,
        )  # fmt: skip
        run_dir = tmp_path / "runs" / "quickstart"
        wait_until(lambda: committed_epoch(run_dir) >= 2, "a committed checkpoint", proc)
        assert observer.ask() == (2, 2)  # one worker on each node: each node has one CPU, each worker needs one

        os.killpg(nodes[0].pid, signal.SIGKILL)  # the worker node's raylet and every process on it, at once
        wait_until(lambda: observer.ask()[1] < 2 and observer.ask()[0] == 1, "Ray noticing the lost node", proc)
        nodes.append(start_worker_node(gcs, env))  # capacity returns: a replacement instance joins

        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        assert f"quickstart: {EPOCHS} epochs; best epoch" in err
    finally:
        if observer is not None:
            observer.close()
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
        stop_process_group(head)  # this head only: `ray stop` would end every Ray of the user on the machine
        shutil.rmtree(temp, ignore_errors=True)
    state = read_history(max(run_dir.glob("checkpoint_epoch_*")))
    assert [int(h["epoch"]) for h in state.history] == list(range(1, EPOCHS + 1))
    assert len(state.resumed_at) == 1 and 2 <= state.resumed_at[0] < EPOCHS
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ferdist").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == list(range(1, EPOCHS + 1))
    assert run.data.tags["ferdist.status"] == "completed"
