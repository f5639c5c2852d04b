"""cluster/loopback.py's bookkeeping, without the hosts (tests/launch/test_ray_up.py launches them for real)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

sys.path.insert(0, str(ROOT / "cluster"))
import loopback  # noqa: E402


def test_down_signals_only_the_processes_up_started(tmp_path: Path) -> None:
    """Catches `down` signalling the pids in its state file whoever has them now: after a reboot, or once the hosts
    ended, a saved pid can be another process of the user's, which it would kill with its whole group."""
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)  # a group of its own, like a host
    try:
        hosts = tmp_path / "hosts.json"
        leftover = tmp_path / "authorized_keys.copy"
        leftover.write_text("key")
        hosts.write_text(json.dumps({"pids": {"head": [other.pid, "1"]}, "remove": [str(leftover)]}))
        loopback.stop_hosts(tmp_path)  # the saved pid started at tick 1: not this process
        assert other.poll() is None
        assert not hosts.exists() and not leftover.exists()
        hosts.write_text(json.dumps({"pids": {"head": [other.pid, loopback.process_start(other.pid)]}, "remove": []}))
        loopback.stop_hosts(tmp_path)
        assert other.wait(timeout=30) == -signal.SIGTERM
        assert loopback.process_start(other.pid) is None
    finally:
        other.kill()
        other.wait()
