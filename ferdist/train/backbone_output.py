"""Where `jobs/pretrain.py` puts its result: a ``save_pretrained`` folder (local or ``s3://``) that a fine-tuning
run's ``model.pretrained=`` loads as it is.

An output is written by one pretraining run: the folder carries `ferdist.train.mae.MARKER_FILE` naming the run. A
re-run of the same run (resumed, or submitted again after it finished) replaces its own output; anything else in
the way (another run's backbone, a downloaded model, unrelated files) is refused before training starts and again
before writing, and is never overwritten.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ferdist import storage
from ferdist.errors import FerdistError, MissingError
from ferdist.train import checkpoint as ckpt
from ferdist.train.mae import MARKER_FILE, write_pretrained


def owner(run: str, storage_path: str) -> dict[str, str]:
    """What a pretraining run writes into `MARKER_FILE`: its name and where its checkpoints are."""
    return {"run": run, "storage_path": storage_path}


def check_output(uri: str, *, mine: dict[str, str], endpoint_url: str | None = None) -> None:
    """``uri`` is empty, absent, or holds this run's own output; and it can be written.

    Raises:
        FerdistError: it holds another model or other files, or it cannot be written; nothing is changed.
    """
    loc = storage.parse_uri(uri)
    if loc.path is not None and loc.path.expanduser().is_file():
        raise FerdistError(f"--output {uri} is a file; give a folder (or an s3:// prefix) for the pretrained model")
    found = storage.list_prefix(uri, endpoint_url=endpoint_url, limit=50)
    if found:
        try:
            marker = json.loads(storage.read_bytes(loc.join(MARKER_FILE).uri, endpoint_url=endpoint_url))
        except (MissingError, ValueError):
            marker = None
        if marker != mine:
            if marker is not None:
                what = f"the backbone of pretraining run '{marker.get('run')}'"
            elif "config.json" in found:
                what = "a model that ferdist pretraining did not write (it has config.json)"
            else:
                what = f"{len(found)}{'+' if len(found) == 50 else ''} files (e.g. {found[0]})"
            raise FerdistError(
                f"--output {uri} already holds {what}; choose an empty or new --output, or remove it first "
                "(nothing was written)"
            )
    storage.check_writable(uri, endpoint_url=endpoint_url)


def publish(checkpoint_dir: Path, uri: str, *, mine: dict[str, str], endpoint_url: str | None = None) -> str:
    """Writes the pretrained model in resume state ``checkpoint_dir`` to ``uri`` as a ``save_pretrained`` folder
    (encoder and decoder, config.json + model.safetensors); returns ``uri``.

    Local folders are written beside and renamed into place (a reader sees the old output or the new one). On S3
    the marker goes first, so an upload cut short is still recognised as this run's and re-running replaces it.
    """
    check_output(uri, mine=mine, endpoint_url=endpoint_url)
    weights = torch.load(checkpoint_dir / ckpt.TRAINED_FILE, map_location="cpu", weights_only=True)
    config: dict[str, Any] = json.loads((checkpoint_dir / ckpt.BACKBONE_FILE).read_text())
    loc = storage.parse_uri(uri)
    if loc.path is not None:
        target = loc.path.expanduser().absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent))
        try:
            write_pretrained(weights, config, staging, marker=mine)
            if target.exists():  # this run's own earlier output (check_output said so)
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                target.rename(old)
                staging.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return str(target)
    with tempfile.TemporaryDirectory(prefix="ferdist-pretrained-") as tmp:
        folder = Path(tmp)
        write_pretrained(weights, config, folder, marker=mine)
        storage.write_bytes(loc.join(MARKER_FILE).uri, (folder / MARKER_FILE).read_bytes(), endpoint_url=endpoint_url)
        for path in sorted(folder.iterdir()):
            if path.name != MARKER_FILE:
                storage.write_bytes(loc.join(path.name).uri, path.read_bytes(), endpoint_url=endpoint_url)
    return uri


def publish_latest(
    run_path: str, uri: str, *, mine: dict[str, str], endpoint_url: str | None = None
) -> tuple[str, int]:
    """Writes the backbone of the run's newest resume checkpoint to ``uri`` (see `publish`), without training: a long
    pretraining's backbone so far, usable while the run is stopped and resumable after. Returns ``uri`` and the epoch.

    Raises:
        FerdistError: the run has no resume checkpoint yet.
    """
    from ferdist.train import runs

    found = runs.checkpoints(run_path, runs.filesystem_for(run_path, endpoint_url=endpoint_url)[0])
    if not found:
        raise FerdistError(f"the run folder {run_path} holds no pretraining checkpoint yet; pretrain at least "
                           "checkpoint.every_epochs epochs before --publish-latest")  # fmt: skip
    latest = found[-1]
    with tempfile.TemporaryDirectory(prefix="ferdist-publish-") as tmp:
        folder = runs.download(latest, Path(tmp) / "checkpoint")
        return publish(folder, uri, mine=mine, endpoint_url=endpoint_url), int(latest.summary["epoch"])
