"""What a Ray Train run left in storage (a local folder or s3://): its checkpoints and their ``summary.json``.

The driver reads only these small JSON files to pick the best epoch and draw reports; it downloads one checkpoint
folder, the best, when a model is published. Storage is reached through pyarrow's filesystems, as Ray writes it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs

from ferdist import storage
from ferdist.errors import FerdistError

SUMMARY_FILE = "summary.json"
"""Written last in every checkpoint folder: a folder without one is an interrupted write."""
RESUME_PREFIX, MODEL_PREFIX = "checkpoint_epoch_", "model_epoch_"
"""Ray's resume-state folders and ferdist's model folders in a run's storage."""


@dataclass(frozen=True)
class StoredCheckpoint:
    path: str
    """The checkpoint folder, as a path on ``filesystem``."""
    summary: dict[str, Any]
    """Its summary.json: epoch, metrics, confusion, history."""
    filesystem: pyarrow.fs.FileSystem


def s3_filesystem(endpoint_url: str | None = None, *, bucket: str | None = None) -> pyarrow.fs.S3FileSystem:
    """pyarrow's S3 filesystem for ``endpoint_url`` (else AWS_ENDPOINT_URL(_S3), else AWS itself), with bounded
    timeouts; ``bucket`` finds the region on AWS when none is configured."""
    from ferdist.storage import resolve_endpoint

    # Writes in the calling thread: Ray copies with use_threads only for a bare S3FileSystem, and pyarrow's background
    # writes from inside its own I/O threads can starve them (apache/arrow#32372).
    options: dict[str, Any] = {"connect_timeout": 5, "request_timeout": 30, "background_writes": False}
    if (endpoint := resolve_endpoint(endpoint_url)) is not None:
        scheme, sep, host = endpoint.partition("://")
        return pyarrow.fs.S3FileSystem(endpoint_override=host if sep else endpoint, scheme=scheme if sep else "https",
                                       **options)  # fmt: skip
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region is None and bucket:
        try:
            region = pyarrow.fs.resolve_s3_region(bucket)
        except OSError:
            region = None  # the SDK's default; the first request then says what is wrong
    return pyarrow.fs.S3FileSystem(region=region, **options) if region else pyarrow.fs.S3FileSystem(**options)


def filesystem_for(
    path: str, filesystem: pyarrow.fs.FileSystem | None = None, *, endpoint_url: str | None = None
) -> tuple[pyarrow.fs.FileSystem, str]:
    """``(filesystem, path on it)`` for a local path or an s3:// URI, unless ``filesystem`` is given."""
    if filesystem is not None:
        return filesystem, path.removeprefix("s3://")
    if path.startswith("s3://"):
        storage.parse_uri(path)  # one sentence for a URI no S3 client reads (no bucket, credentials in it)
        bare = path[len("s3://") :]
        return s3_filesystem(endpoint_url, bucket=bare.split("/", 1)[0]), bare
    return pyarrow.fs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def _listed(run_path: str, filesystem: pyarrow.fs.FileSystem | None, prefix: str) -> list[StoredCheckpoint]:
    fs, root = filesystem_for(run_path, filesystem)
    try:
        entries = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except OSError as exn:
        raise FerdistError(f"cannot list the run folder {run_path} ({exn})") from None
    found = []
    for entry in entries:
        if entry.type != pyarrow.fs.FileType.Directory or not entry.base_name.startswith(prefix):
            continue
        summary_path = f"{entry.path}/{SUMMARY_FILE}"
        if fs.get_file_info(summary_path).type != pyarrow.fs.FileType.File:
            continue  # a write cut short by a crash: summary.json is written last
        with fs.open_input_stream(summary_path) as stream:
            found.append(StoredCheckpoint(entry.path, json.loads(stream.read()), fs))
    return sorted(found, key=lambda c: c.summary["epoch"])


def checkpoints(run_path: str, filesystem: pyarrow.fs.FileSystem | None = None) -> list[StoredCheckpoint]:
    """The run's resume checkpoints (Ray's ``checkpoint_*`` folders) that hold a summary, oldest epoch first."""
    return _listed(run_path, filesystem, "checkpoint_")


def models(run_path: str, filesystem: pyarrow.fs.FileSystem | None = None) -> list[StoredCheckpoint]:
    """The run's best-model checkpoints (``model_epoch_*``) that hold a summary, oldest epoch first."""
    return _listed(run_path, filesystem, MODEL_PREFIX)


def best_and_last(
    run_path: str, filesystem: pyarrow.fs.FileSystem | None = None, *, select_by: str = "val/acc"
) -> tuple[StoredCheckpoint, StoredCheckpoint]:
    """The best model checkpoint by ``select_by`` (earliest on ties), and the newest checkpoint of either kind
    (whose summary holds the history).

    Runs from before model checkpoints existed pick the best among their resume checkpoints.

    Raises:
        FerdistError: the run has no checkpoint yet.
    """
    resume, kept = checkpoints(run_path, filesystem), models(run_path, filesystem)
    candidates = kept or resume
    if not candidates:
        raise FerdistError(f"the run folder {run_path} holds no checkpoint with a {SUMMARY_FILE}")
    scored = [c for c in candidates if select_by in c.summary["metrics"]] or candidates
    best = max(scored, key=lambda c: (c.summary["metrics"].get(select_by, float("-inf")), -c.summary["epoch"]))
    # The newest summary has the longest history: the last resume state, or a later model (a trial that ASHA
    # stopped between resume points has only models after its last one, or no resume state at all).
    last = max([*resume, *kept], key=lambda c: (c.summary["epoch"], c in resume))
    return best, last


def download(checkpoint: StoredCheckpoint, dest: Path) -> Path:
    """Copies the checkpoint folder to the local folder ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(checkpoint.path, str(dest), source_filesystem=checkpoint.filesystem,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())  # fmt: skip
    return dest
