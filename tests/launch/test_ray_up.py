"""cluster/local.yaml launched for real: `ray up` over SSH onto two loopback hosts (cluster/loopback.py), the quick
start submitted with `ray job submit` and trained across both nodes, `ray status`, then `ray down` leaving no Ray
process on either host. Needs root, Debian's openssh-server and rsync (`.ci/run` installs them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(ROOT / "cluster"))
import loopback  # noqa: E402

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
CLIENT_ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "token"}
JOBS = "http://127.0.0.1:8265"


def missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "the loopback hosts need root (port 22, namespaces)"
    for tool in (loopback.SSHD, "rsync", "unshare", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install openssh-server rsync; .ci/run does)"
    return loopback.busy_head_port()  # e.g. a training job beside the suite holds the dashboard's port


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`python cluster/loopback.py up`, as the docs run it; `down` afterwards whatever happened."""
    if reason := missing_prerequisite():
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("loopback")
    try:
        up = subprocess.run([sys.executable, str(ROOT / "cluster" / "loopback.py"), "up", "--state", str(state)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert up.returncode == 0, (up.stdout + up.stderr)[-6000:]
        (state / "up.json").write_text(up.stdout.strip().splitlines()[-1])
        yield state
    finally:
        loopback.down(state)


def alive_nodes() -> list[dict]:
    listed = subprocess.run([RAY, "list", "nodes", "--address", JOBS, "--format", "json", "--filter", "state=ALIVE"],
                            capture_output=True, text=True, env=CLIENT_ENV, timeout=120)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def cluster_status() -> str:
    status = subprocess.run([RAY, "status", "--address", "127.0.0.1:6379", "-v"], capture_output=True, text=True,
                            env=CLIENT_ENV, timeout=120)  # fmt: skip
    return status.stdout


def host_processes() -> list[str]:
    """Command lines of the processes in other PID namespaces than this one's (the loopback hosts'), other than each
    host's own init and SSH server."""
    mine = os.readlink("/proc/self/ns/pid")
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "ns" / "pid") != mine:
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip())
        except OSError:  # the process ended while being read
            continue
    return [c for c in found if c and "loopback.py _host" not in c and not c.startswith(("/usr/sbin/sshd", "sshd"))]


def test_ray_up_submit_status_and_down_on_two_loopback_hosts(cluster: Path, synth_shards: Path, mlflow_server: str,
                                                              tmp_path: Path) -> None:  # fmt: skip
    derived = yaml.safe_load((cluster / "cluster.yaml").read_text())
    shipped = yaml.safe_load(loopback.SHIPPED.read_text())
    # The launched file is the shipped one with the stated overrides: the stop commands and the rest of every start
    # command exactly as shipped.
    assert "docker" in shipped and "docker" not in derived
    assert derived["worker_start_ray_commands"][0] == shipped["worker_start_ray_commands"][0] == "ray stop"
    assert derived["head_start_ray_commands"][1].replace("--node-ip-address=127.0.0.1 ", "") == \
        shipped["head_start_ray_commands"][1]  # fmt: skip

    # The autoscaler brings the worker up after `ray up` returns, and `ray status` reports it a few seconds after
    # it joined: wait for both (bounded; each look is a round trip to the cluster).
    deadline = time.monotonic() + 240
    while (len(nodes := alive_nodes()) < 2 or "Node: 127.0.0.2" not in (status := cluster_status())) and \
            time.monotonic() < deadline:  # fmt: skip
        pass
    assert len(nodes) == 2 and "127.0.0.2" in {n["node_ip"] for n in nodes}, nodes
    assert "Node: 127.0.0.2" in status and status.count("\nNode: ") == 2, status  # the worker and the head

    # Two workers of 2 CPUs each cannot share one 2-CPU node: the job succeeds only by training across both hosts.
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server}})
    job = subprocess.run(
        [RAY, "job", "submit", "--address", JOBS, "--working-dir", ".", "--runtime-env-json", runtime_env, "--",
         "python", "jobs/train.py", "--config", "jobs/configs/quickstart.yaml", "--set", "name=on-ray-up",
         "--set", f"data.manifest={synth_shards}", "--set", f"checkpoint.storage_path={tmp_path / 'runs'}",
         "--set", "loop.epochs=2", "--set", "workers.cpus_per_worker=2", "--set", "data.loader_workers=0",
         "--set", "tracking.experiment=ray-up", "--set", "tracking.registered_model=fer-ray-up", "--workers", "2",
         "--cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=CLIENT_ENV,
    )  # fmt: skip
    assert job.returncode == 0, re.sub(r"\n.*(INFO|packaging).*", "", job.stdout + job.stderr)[-12000:]
    (job_id,) = set(re.findall(r"Job '(raysubmit_\w+)' succeeded", job.stdout + job.stderr))
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("ray-up").experiment_id])
    assert run.data.tags["ferdist.status"] == "completed" and run.data.params["workers.num_workers"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [1, 2]
    assert client.get_model_version_by_alias("fer-ray-up", "champion").run_id == run.info.run_id
    assert json.loads((cluster / "up.json").read_text())["ray_up_s"] > 0
    print(f"ray up {json.loads((cluster / 'up.json').read_text())['ray_up_s']} s; job {job_id}")

    down = subprocess.run([sys.executable, str(ROOT / "cluster" / "loopback.py"), "down", "--state", str(cluster),
                           "--keep-hosts"], cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert down.returncode == 0, down.stderr[-4000:]
    assert host_processes() == []  # `ray down` stopped every Ray process on both hosts, which are still up
