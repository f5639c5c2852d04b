"""Riding out an object-store outage: a run's storage calls are retried with backoff for a bounded time.

Object stores have outages of seconds to minutes: a MinIO or SeaweedFS restart, an S3 brown-out, a network blip.
A run at GPU speed touches storage every few seconds (shard reads, model and resume checkpoints, and Ray's own run
state: the controller's ``checkpoint_manager_snapshot.json``), and one failed call used to end the run with a
traceback; botocore and pyarrow give up on a refused connection within a second or two.

The policy (``checkpoint.outage_s``, default 300 s): a call that fails for a reason that passes (connection refused
or reset, a timeout, HTTP 5xx, throttling) is retried, waiting 1 s and doubling up to 15 s, until ``outage_s`` has
gone by since its first failure. Then it raises `StorageOutage`, one sentence saying what was being written or read
and that re-submitting resumes from the last committed checkpoint. Errors that do not pass (access denied, a
missing bucket or key) are raised at once. Ray's storage is wrapped by `resilient`, so the controller's writes, the
workers' checkpoint uploads and restores all follow the same policy.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs

from ferdist.errors import FerdistError

log = logging.getLogger(__name__)
T = TypeVar("T")

FIRST_WAIT_S = 1.0
MAX_WAIT_S = 15.0
# pyarrow's S3 errors carry the AWS SDK's error type; these pass with time (the rest, e.g. ACCESS_DENIED, do not).
_PYARROW_TRANSIENT = re.compile(
    r"NETWORK_CONNECTION|SERVICE_UNAVAILABLE|SLOW_DOWN|THROTTLING|INTERNAL_FAILURE|REQUEST_TIMEOUT|"
    r"HTTP status 5\d\d|curlCode: (?:6|7|28|52|55|56)\b"
)
_BOTO_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                         "500", "502", "503", "504"}  # fmt: skip


class StorageOutage(FerdistError):
    """The object store stayed unreachable for longer than the outage budget."""

    transient = True


def transient(exn: BaseException) -> bool:
    """Whether ``exn`` is a storage failure that may pass by itself (so retrying it is worth the wait)."""
    if isinstance(exn, (FileNotFoundError, PermissionError, FerdistError)):
        return False
    try:
        from botocore import exceptions as bx
    except ImportError:  # pragma: no cover - boto3 is a dependency
        bx = None
    if bx is not None:
        if isinstance(exn, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                            bx.ConnectionClosedError, bx.IncompleteReadError, bx.ResponseStreamingError)):  # fmt: skip
            return True
        if isinstance(exn, bx.ClientError):
            code = str(exn.response.get("Error", {}).get("Code", ""))
            status = str(exn.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            return code in _BOTO_TRANSIENT_CODES or status.startswith("5")
    if isinstance(exn, (ConnectionError, TimeoutError)):
        return True
    return isinstance(exn, OSError) and bool(_PYARROW_TRANSIENT.search(str(exn)))


def endpoint_base(url: str | None) -> str:
    """``scheme://host:port`` of an endpoint or request URL (botocore reports the whole request URL)."""
    if not url:
        return "the default AWS endpoint"
    parsed = urlparse(url if "://" in url else f"https://{url}")
    return f"{parsed.scheme}://{parsed.netloc}" if parsed.netloc else url


def reason(exn: BaseException) -> str:
    """A short cause for messages: pyarrow's long S3 errors cut to the AWS error and operation."""
    text = str(exn)
    if match := re.search(r"AWS Error (\S+) during (\S+) operation", text):
        return f"{match[1]} during {match[2]}"
    if url := getattr(exn, "kwargs", {}).get("endpoint_url"):  # botocore names the request URL: keep the endpoint
        return f"{type(exn).__name__} at {endpoint_base(url)}"
    return f"{type(exn).__name__}: {text}"[:200]


def retried(call: Callable[[], T], *, budget_s: float, what: str) -> T:
    """``call()``, retried with backoff while it fails transiently, for up to ``budget_s`` after the first failure.

    Raises:
        StorageOutage: still failing after ``budget_s``.
    """
    first_failure: float | None = None
    wait = FIRST_WAIT_S
    while True:
        try:
            result = call()
        except Exception as exn:
            if not transient(exn):
                raise
            now = time.monotonic()
            if first_failure is None:
                first_failure = now
                if budget_s > 0:
                    log.warning("object store unavailable while %s (%s); retrying for up to %.0f s",
                                what, reason(exn), budget_s)  # fmt: skip
            if now - first_failure >= budget_s:
                raise StorageOutage(
                    f"the object store did not answer for {budget_s:.0f} s (checkpoint.outage_s) while {what} "
                    f"({reason(exn)}); what was committed before is intact: re-submit the same command once the "
                    "store is back and the run resumes from its last checkpoint"
                ) from None
            time.sleep(min(wait, max(0.0, budget_s - (now - first_failure))))
            wait = min(wait * 2, MAX_WAIT_S)
            continue
        if first_failure is not None:
            log.warning("object store back after %.0f s (%s)", time.monotonic() - first_failure, what)
        return result


class RetryingHandler(pyarrow.fs.FileSystemHandler):
    """A pyarrow filesystem handler that forwards every call to ``inner`` under `retried`."""

    def __init__(self, inner: pyarrow.fs.FileSystem, budget_s: float) -> None:
        self.inner, self.budget_s = inner, budget_s

    def __reduce__(self) -> tuple[Any, ...]:  # Ray ships the filesystem to its controller and workers
        return RetryingHandler, (self.inner, self.budget_s)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RetryingHandler) and other.inner.equals(self.inner)

    def _call(self, what: str, call: Callable[[], T]) -> T:
        return retried(call, budget_s=self.budget_s, what=what)

    def get_type_name(self) -> str:
        return self.inner.type_name

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pyarrow.fs.FileInfo]:
        what = f"looking up {paths[0] if len(paths) == 1 else paths}"
        return self._call(what, lambda: self.inner.get_file_info(paths))

    def get_file_info_selector(self, selector: pyarrow.fs.FileSelector) -> list[pyarrow.fs.FileInfo]:
        return self._call(f"listing {selector.base_dir}", lambda: self.inner.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._call(f"creating {path}", lambda: self.inner.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._call(f"deleting {path}", lambda: self.inner.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._call(f"emptying {path}", lambda: self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self) -> None:
        self._call("emptying the root", lambda: self.inner.delete_dir_contents("/", accept_root_dir=True))

    def delete_file(self, path: str) -> None:
        self._call(f"deleting {path}", lambda: self.inner.delete_file(path))

    def move(self, src: str, dest: str) -> None:
        self._call(f"moving {src}", lambda: self.inner.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self._call(f"copying {src}", lambda: self.inner.copy_file(src, dest))

    def _read_whole(self, path: str) -> pa.NativeFile:
        # Read whole under the retry (small JSON, or one checkpoint file that is loaded whole anyway): a stream cut
        # half-way by an outage is read again instead of failing the restore.
        def read() -> bytes:
            with self.inner.open_input_stream(path) as stream:
                return stream.read()

        return pa.BufferReader(self._call(f"reading {path}", read))

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self._read_whole(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self._read_whole(path)

    def open_output_stream(self, path: str, metadata: dict[str, str] | None) -> pa.NativeFile:
        # Opening is retried (on S3 it starts the upload, so a store that is down fails here). The stream itself is
        # pyarrow's own: a Python stream's close() error is lost when pyarrow's C++ copy_files closes it, so
        # a failure while writing surfaces as a plain OSError, and callers that copy whole folders retry the copy
        # (`retried` with `budget_of`).
        return self._call(f"writing {path}", lambda: self.inner.open_output_stream(path, metadata=metadata))

    def open_append_stream(self, path: str, metadata: dict[str, str] | None) -> pa.NativeFile:
        return self._call(f"appending to {path}", lambda: self.inner.open_append_stream(path, metadata=metadata))


def budget_of(filesystem: pyarrow.fs.FileSystem | None) -> float:
    """The outage budget a filesystem made by `resilient` carries (0 for any other)."""
    handler = getattr(filesystem, "handler", None)
    return handler.budget_s if isinstance(handler, RetryingHandler) else 0.0


def resilient(filesystem: pyarrow.fs.FileSystem, *, budget_s: float) -> pyarrow.fs.FileSystem:
    """``filesystem`` with every call retried through an outage of up to ``budget_s`` seconds."""
    return pyarrow.fs.PyFileSystem(RetryingHandler(filesystem, budget_s))
