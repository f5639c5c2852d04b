"""The Ray cluster a job runs on: the one RAY_ADDRESS names (set by `ray job submit` inside a job, or by the user),
else a Ray started in this process. A cluster that is down is one sentence before any work is done or any run is
opened, not Ray's connection traceback after the data checks."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from ferdist.errors import FerdistError

CONNECT_TIMEOUT_S = 5.0


def address() -> str | None:
    """RAY_ADDRESS, or None to start Ray in this process."""
    return os.environ.get("RAY_ADDRESS") or None


def check(ray_address: str | None, *, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A cluster at ``ray_address`` accepts connections (nothing to check without one, or for ``auto``/``local``,
    which Ray resolves on this machine).

    Raises:
        FerdistError: the address is a job API's (http), malformed, or nothing accepts connections there.
    """
    if ray_address is None or ray_address in ("auto", "local"):
        return
    fix = "start the cluster (`ray up`, docs/cluster.md) or unset RAY_ADDRESS to run on this machine"
    if ray_address.startswith(("http://", "https://")):
        raise FerdistError(
            f"RAY_ADDRESS={ray_address} is a cluster's job API, which a job cannot join: submit with `ray job submit "
            f"--address {ray_address} --working-dir . -- python jobs/…`, or set RAY_ADDRESS to the head's host:6379"
        )
    parts = urlsplit(ray_address if "://" in ray_address else f"gcs://{ray_address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number
        host = port = None
    if not host or port is None:
        raise FerdistError(f"RAY_ADDRESS={ray_address} is not host:port (e.g. 10.0.0.10:6379 or ray://host:10001)")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except TimeoutError:
        raise FerdistError(f"no Ray cluster answers at RAY_ADDRESS={ray_address} (no answer in {timeout_s:.0f} s); "
                           f"{fix}") from None  # fmt: skip
    except OSError as exn:
        reason = exn.strerror or type(exn).__name__
        raise FerdistError(f"no Ray cluster answers at RAY_ADDRESS={ray_address} ({reason.lower()}); {fix}") from None


def join(ray_address: str | None) -> None:
    """Connects this driver to ``ray_address`` (`check` it first), or starts Ray here when None."""
    import ray

    try:
        ray.init(address=ray_address, configure_logging=False)
    except ConnectionError as exn:  # e.g. "auto" with no cluster on this machine, or the head went down since check
        first = str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__
        raise FerdistError(f"cannot join the Ray cluster at RAY_ADDRESS={ray_address}: {first.rstrip('.')}; "
                           "start it (`ray up`, docs/cluster.md) or unset RAY_ADDRESS") from None  # fmt: skip
