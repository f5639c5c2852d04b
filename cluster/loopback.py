"""Launch cluster/local.yaml for real on this one machine: two SSH hosts on loopback, `ray up`, then `ray down`.

    python cluster/loopback.py up --state /tmp/ferdist-loopback     # hosts 127.0.0.1 (head) and 127.0.0.2, ray up
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train.py …
    python cluster/loopback.py down --state /tmp/ferdist-loopback   # ray down, then the hosts stop
    python cluster/loopback.py config --state DIR                    # the YAML `up` launches, without launching

Each host is an OpenSSH server (Debian's openssh-server, run as root with a key made for the launch) in its own PID
and mount namespaces, so `ray stop` on one host stops only that host's Ray, as on separate machines, and each host
has its own ~/.bashrc, ~/.ray and /tmp/ray. The cluster file is the shipped cluster/local.yaml with overrides, not
a copy (`loopback_config`): no Docker block (the hosts install ferdist themselves, here by reusing this interpreter's
virtualenv: the setup command skips the install when the venv is there), the two loopback addresses, this user and
key, and each node's address given to `ray start` (two hosts that share one network stack cannot find it by route).
Needs root (namespaces, port 22), /usr/sbin/sshd, rsync, ssh-keygen and unshare.
"""

from __future__ import annotations

import argparse
import copy
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent
SHIPPED = HERE / "local.yaml"
HOSTS = {"head": "127.0.0.1", "worker": "127.0.0.2"}
SSHD = "/usr/sbin/sshd"
RAY = str(Path(sys.executable).with_name("ray"))
# The shipped file's placeholders for where a host keeps the checkout and its virtualenv.
REMOTE_CHECKOUT, REMOTE_VENV = "~/ferdist", "~/ferdist-venv"
BOOTSTRAP_FILES = [Path.home() / "ray_bootstrap_config.yaml", Path.home() / "ray_bootstrap_key.pem"]


class LaunchError(Exception):
    """A launch that cannot go on; its message is one sentence for the user."""


def loopback_config(shipped: dict[str, Any], *, state: Path, venv: Path) -> dict[str, Any]:
    """``shipped`` (cluster/local.yaml) made to run on the two loopback hosts; every command not named here is run
    exactly as shipped."""
    cfg = copy.deepcopy(shipped)
    cfg["cluster_name"] = "ferdist-loopback"
    cfg.pop("docker", None)  # the hosts install ferdist themselves
    cfg["provider"] = {**cfg["provider"], "head_ip": HOSTS["head"], "worker_ips": [HOSTS["worker"]]}
    cfg["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(state / "id_ed25519")}
    cfg["min_workers"] = cfg["max_workers"] = 1

    def placed(text: str) -> str:  # the checkout goes to a folder of this launch; the venv is this interpreter's
        return text.replace(REMOTE_VENV, str(venv)).replace(REMOTE_CHECKOUT, str(state / "checkout"))

    cfg["file_mounts"] = {placed(remote): local for remote, local in cfg["file_mounts"].items()}
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        cfg[key] = [placed(command) for command in cfg[key]]
    cfg["head_start_ray_commands"] = [with_node_ip(c, HOSTS["head"]) for c in cfg["head_start_ray_commands"]]
    cfg["worker_start_ray_commands"] = [with_node_ip(c, HOSTS["worker"]) for c in cfg["worker_start_ray_commands"]]
    return cfg


def with_node_ip(command: str, ip: str) -> str:
    """``command`` with ``--node-ip-address`` after its ``ray start``: on real hosts Ray finds a node's address by
    its route to the head, but two hosts sharing one network stack would both find 127.0.0.1."""
    return command.replace("ray start ", f"ray start --node-ip-address={ip} ", 1)


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise LaunchError("the loopback hosts need root (network ports 22, PID and mount namespaces); run as root")
    for tool in (SSHD, "rsync", "ssh-keygen", "unshare", "ssh"):
        if shutil.which(tool) is None:
            raise LaunchError(f"{tool} is not installed; on Debian: apt-get install openssh-server rsync")
    for name, ip in HOSTS.items():
        with socket.socket() as sock:
            if sock.connect_ex((ip, 22)) == 0:
                raise LaunchError(f"something already listens on {ip}:22 (the {name} host's SSH port); stop it first")
    if busy := busy_head_port():
        raise LaunchError(busy)


HEAD_PORTS = {6379: "GCS", 8265: "dashboard and job API"}
"""The ports cluster/local.yaml's head takes on its address; the hosts share this machine's network."""


def busy_head_port() -> str | None:
    """Why the head cannot start here, if another process (another Ray: one started by ray.init keeps the dashboard's
    8265 while its job runs) already listens on one of its ports; else None."""
    for port, what in HEAD_PORTS.items():
        with socket.socket() as sock:
            if sock.connect_ex((HOSTS["head"], port)) == 0:
                return (f"something already listens on {HOSTS['head']}:{port}, the head's {what} port (another Ray on "
                        "this machine?); stop it first")  # fmt: skip
    return None


def write_host(state: Path, name: str, ip: str) -> Path:
    """The files of one host: its sshd config and host key, and the ~/.bashrc and ~/.ray it sees."""
    host = state / name
    (host / "dotray").mkdir(parents=True, exist_ok=True)
    (host / "bashrc").write_text("")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host / "host_key")], check=True)
    (host / "sshd_config").write_text(
        f"ListenAddress {ip}:22\nHostKey {host / 'host_key'}\nPidFile {host / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {state / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPrintMotd no\n"
        "Subsystem sftp internal-sftp\n"
    )
    return host


def start_host(host: Path, ip: str) -> int:
    """Starts the host's sshd in new PID and mount namespaces (this script's ``_host`` mode is their PID 1); returns
    the pid to signal at the end. Waits until the SSH port answers."""
    log = open(host / "sshd.log", "ab")  # noqa: SIM115 (the host outlives this process)
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable,
                             __file__, "_host", str(host)], stdout=log, stderr=log, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LaunchError(f"the SSH server for {ip} exited at once; see {host / 'sshd.log'}")
        with socket.socket() as sock:
            if sock.connect_ex((ip, 22)) == 0:
                return proc.pid
        time.sleep(0.1)  # polling a port that is coming up; bounded by the deadline
    raise LaunchError(f"the SSH server for {ip} did not listen within 30 s; see {host / 'sshd.log'}")


def host_main(host: Path) -> int:
    """PID 1 of a host's namespaces: gives the host its own ~/.bashrc, ~/.ray and /tmp/ray (Ray's session folders,
    which the nodes of one machine would otherwise share: a node's clean-up would delete the other's job files), runs
    sshd, and reaps orphans."""
    home = Path.home()
    for source, target in ((host / "bashrc", home / ".bashrc"), (host / "dotray", home / ".ray"),
                           (host / "tmp-ray", Path("/tmp/ray"))):  # fmt: skip
        if source.name == "bashrc":
            target.touch(exist_ok=True)
        else:
            source.mkdir(exist_ok=True)
            target.mkdir(exist_ok=True)
        subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(host / "sshd_config")])
    while True:  # Ray's daemons are orphaned to this process: reap them until sshd itself ends
        pid, status = os.wait()
        if pid == sshd.pid:
            return os.waitstatus_to_exitcode(status)


def up(state: Path) -> dict[str, float]:
    """Starts both hosts and runs `ray up`; returns the wall seconds of `ray up`. The state folder keeps what `down`
    needs."""
    check_prerequisites()
    state.mkdir(parents=True, exist_ok=True)
    if not (state / "id_ed25519").exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(state / "id_ed25519")], check=True)
    shutil.copy(state / "id_ed25519.pub", state / "authorized_keys")
    # The cluster's token (Ray 2.60 turns token authentication on at `ray start --head`): made here once, mounted
    # onto every host by the shipped file_mounts, and sent by `ray job submit` from here.
    subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True)
    config = state / "cluster.yaml"
    config.write_text(yaml.safe_dump(loopback_config(yaml.safe_load(SHIPPED.read_text()), state=state,
                                                     venv=Path(sys.prefix))))  # fmt: skip
    # Ray's launcher leaves its bootstrap files in the head's home (here this user's): removed at `down` unless
    # they were there before.
    ours = [str(f) for f in BOOTSTRAP_FILES if not f.exists()]
    pids = {name: start_host(write_host(state, name, ip), ip) for name, ip in HOSTS.items()}
    started = {name: [pid, process_start(pid)] for name, pid in pids.items()}
    (state / "hosts.json").write_text(json.dumps({"pids": started, "remove": ours}))
    start = time.monotonic()
    # From the checkout, as a user runs it: the shipped file_mounts sync "." (this checkout) to every host.
    done = subprocess.run([RAY, "up", "-y", "--no-config-cache", str(config)], cwd=CHECKOUT, env=launcher_env())
    if done.returncode != 0:
        raise LaunchError(f"`ray up` failed (exit {done.returncode}); its own message is above")
    return {"ray_up_s": round(time.monotonic() - start, 1)}


def launcher_env() -> dict[str, str]:
    """The environment `ray up` and `ray down` run in: Ray 2.60's v2 autoscaler (its default for `ray up`) starts
    only the head with the local provider, counting the head as the one node of the type the workers share; the v1
    autoscaler starts the workers."""
    return {**os.environ, "RAY_UP_enable_autoscaler_v2": "0"}


def down(state: Path, *, keep_hosts: bool = False) -> int:
    """`ray down`, then `ray stop` on every worker, then (unless ``keep_hosts``) the hosts stop: their namespaces end,
    with anything still running in them. Returns the first failing exit status, else 0.

    Ray 2.60's `ray down` runs `ray stop` on the head only; without Docker (whose containers it stops on every node)
    an on-prem worker's Ray goes on running (its raylet exits about 80 s after the head's GCS is gone, its log monitor
    stays), so each worker is stopped over SSH, as docs/cluster.md tells on-prem users to."""
    config = state / "cluster.yaml"
    try:
        if not config.exists():
            return 0
        codes = [subprocess.run([RAY, "down", "-y", str(config)], cwd=CHECKOUT, env=launcher_env(),
                                timeout=300).returncode]  # fmt: skip
        cfg = yaml.safe_load(config.read_text())
        for ip in cfg["provider"]["worker_ips"]:
            codes.append(ssh(cfg["auth"], ip, "ray stop").returncode)
        return next((code for code in codes if code != 0), 0)
    finally:
        if not keep_hosts:
            stop_hosts(state)


def ssh(auth: dict[str, str], ip: str, command: str) -> subprocess.CompletedProcess:
    """``command`` on host ``ip`` in a login shell, as Ray's launcher runs its commands (the host's ~/.bashrc puts
    ferdist's venv on the PATH)."""
    return subprocess.run(["ssh", "-i", auth["ssh_private_key"], "-o", "StrictHostKeyChecking=no", "-o",
                           "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
                           f"{auth['ssh_user']}@{ip}", f"bash --login -c -i 'source ~/.bashrc; {command}'"],
                          timeout=120)  # fmt: skip


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat's 22nd field), or None if it is gone: a
    pid with the same start is the same process, where a pid alone may since have been given to another."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # the fields after the command name, which may hold spaces


def stop_hosts(state: Path) -> None:
    """Stops the hosts `up` started: only processes still the ones it recorded (after a reboot, or once they ended,
    their pids may belong to anything else of the user's)."""
    hosts = state / "hosts.json"
    if not hosts.exists():
        return
    started = json.loads(hosts.read_text())
    for saved in started["pids"].values():
        pid, start = saved if isinstance(saved, list) else (saved, None)  # an older up saved the pid alone
        if start is not None and process_start(pid) != start:
            continue
        try:
            os.killpg(pid, signal.SIGTERM)  # unshare --kill-child takes the host's PID 1, and so its namespace, along
        except ProcessLookupError:
            pass
    for name in started["remove"]:
        Path(name).unlink(missing_ok=True)
    hosts.unlink()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "down", "config", "_host"])
    p.add_argument("folder", nargs="?", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--keep-hosts", action="store_true", help="down: `ray down` only; the SSH hosts stay up")
    p.add_argument("--state", type=Path, default=Path("/tmp/ferdist-loopback"),
                   help="folder for the keys, host files and derived cluster YAML (default: %(default)s)")  # fmt: skip
    args = p.parse_args(argv)
    if args.action == "_host":
        return host_main(args.folder)
    try:
        if args.action == "config":
            print(yaml.safe_dump(loopback_config(yaml.safe_load(SHIPPED.read_text()), state=args.state.resolve(),
                                                 venv=Path(sys.prefix))), end="")  # fmt: skip
        elif args.action == "up":
            try:
                print(json.dumps(up(args.state.resolve())))
            except BaseException:
                if (args.state / "hosts.json").exists():
                    down(args.state.resolve())  # nothing half-started is left behind
                raise
        else:
            return 0 if down(args.state.resolve(), keep_hosts=args.keep_hosts) == 0 else 1
    except LaunchError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
