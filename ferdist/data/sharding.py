"""Source → WebDataset shards + manifest, on a local folder or S3, reproducibly and without half-written states.

Order of work, and why:

1. Check the destination is writable (bad bucket, endpoint or credentials fail before minutes of encoding).
2. Parse, validate and encode every shard in worker processes and hold the tars in memory (~145 MB for FER2013):
   a bad row anywhere stops the job before anything at the destination has been touched.
3. Find the shards already there with the same sha256 (an interrupted upload, or a re-run of the same source).
4. If any shard must be written: delete the old manifest, write those shards, then ``manifest.json`` last; its
   presence is what makes the dataset complete. If none must, the manifest is only replaced (atomically) when it
   differs, so a re-run that changes nothing never leaves readers a moment without a dataset.
5. Ctrl-C stops with one sentence saying what state the destination is in; re-running finishes the job.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ferdist import storage
from ferdist.constants import DEFAULT_SAMPLES_PER_SHARD, MANIFEST_NAME, NUM_CLASSES, SPLITS, UNLABELED_SPLIT
from ferdist.data.shards import Manifest, ShardInfo, build_shard, encode_pngs, sha256_hex, shard_name, split_info
from ferdist.data.sources import Source
from ferdist.errors import Interrupted, MissingError

ProgressFn = Callable[[int], None]
"""Called with the number of samples (encode phase) or bytes (write phase) just finished."""


@dataclass(frozen=True)
class EncodedShard:
    split: str
    index: int
    data: bytes
    samples: int
    class_counts: np.ndarray

    @property
    def info(self) -> ShardInfo:
        return ShardInfo(
            name=shard_name(self.split, self.index),
            samples=self.samples,
            bytes=len(self.data),
            sha256=sha256_hex(self.data),
        )


@dataclass(frozen=True)
class ShardingResult:
    manifest: Manifest
    dest: str
    written: int
    """Shards written in this run."""
    skipped: int
    """Shards already at the destination with the right sha256 (an earlier, interrupted run)."""
    seconds_encode: float
    seconds_write: float


def plan_shards(source: Source, samples_per_shard: int) -> list[tuple[str, int, np.ndarray]]:
    """(split, shard index, source rows) for every shard, in a fixed order."""
    tasks = []
    for split in (*SPLITS, UNLABELED_SPLIT):
        rows = source.splits.get(split)
        if rows is None:
            continue
        for index, start in enumerate(range(0, rows.size, samples_per_shard)):
            tasks.append((split, index, rows[start : start + samples_per_shard]))
    return tasks


# Worker processes are forked after the source is loaded, so they read it from inherited memory instead of
# receiving 300 MB of CSV text through a pipe.
_SOURCE: Source | None = None


def _encode_task(task: tuple[str, int, np.ndarray]) -> EncodedShard:
    split, index, rows = task
    assert _SOURCE is not None
    batch = _SOURCE.load(rows)
    data = build_shard(batch.rows.tolist(), batch.labels.tolist(), encode_pngs(batch.images))
    # Unlabeled faces carry placeholder labels in their shards; the manifest counts none of them as a class.
    counts = np.bincount(batch.labels, minlength=NUM_CLASSES) * (split != UNLABELED_SPLIT)
    return EncodedShard(split=split, index=index, data=data, samples=len(rows), class_counts=counts)


def encode_all(source: Source, *, samples_per_shard: int, workers: int, progress: ProgressFn) -> list[EncodedShard]:
    """Validates and encodes every shard; raises the first `FerdistError` and writes nothing."""
    global _SOURCE
    tasks = plan_shards(source, samples_per_shard)
    # Never more processes than shards, nor than cores: more only fork copies of the source that wait for a core.
    workers = min(workers, len(tasks), os.cpu_count() or 1)
    _SOURCE = source
    try:
        results: Iterator[EncodedShard]
        if workers <= 1 or "fork" not in mp.get_all_start_methods():
            results = map(_encode_task, tasks)
            return [_tick(r, progress) for r in results]
        # Workers ignore Ctrl-C: the main process handles it once, instead of every worker printing a traceback.
        ignore_ctrl_c = (signal.SIGINT, signal.SIG_IGN)
        with mp.get_context("fork").Pool(workers, initializer=signal.signal, initargs=ignore_ctrl_c) as pool:
            return [_tick(r, progress) for r in pool.imap(_encode_task, tasks, chunksize=4)]
    finally:
        _SOURCE = None


def _tick(shard: EncodedShard, progress: ProgressFn) -> EncodedShard:
    progress(shard.samples)
    return shard


def _run_threads(
    fn: Callable[[Any], Any], items: list[Any], *, threads: int, what: str, on_done: Callable[[Any], None] | None = None
) -> list[Any]:
    """``[fn(item) for item in items]`` on a thread pool, ``on_done(result)`` called on this thread as each finishes;
    Ctrl-C cancels what has not started and says ``what``."""
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        results = []
        for result in pool.map(fn, items):
            results.append(result)
            if on_done is not None:
                on_done(result)
    except KeyboardInterrupt:
        pool.shutdown(wait=True, cancel_futures=True)  # lets started writes finish: no half-written object
        raise Interrupted(f"interrupted while {what}") from None
    pool.shutdown()
    return results


def _read_or_none(uri: str, *, endpoint_url: str | None) -> bytes | None:
    try:
        return storage.read_bytes(uri, endpoint_url=endpoint_url)
    except MissingError:
        return None


def write_shards(
    source: Source,
    dest: str,
    *,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    workers: int | None = None,
    endpoint_url: str | None = None,
    on_encoded: ProgressFn = lambda n: None,
    on_written: ProgressFn = lambda n: None,
) -> ShardingResult:
    """Writes ``source`` as WebDataset shards and a manifest under ``dest`` (a folder or ``s3://bucket/prefix``)."""
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be at least 1")
    dest_loc = storage.parse_uri(dest)
    storage.check_writable(dest, endpoint_url=endpoint_url)

    t0 = time.perf_counter()
    try:
        shards = encode_all(
            source, samples_per_shard=samples_per_shard, workers=workers or os.cpu_count() or 1, progress=on_encoded
        )
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while encoding; nothing was written to {dest}") from None
    t1 = time.perf_counter()

    infos = [s.info for s in shards]
    splits = {}
    for split in (*SPLITS, UNLABELED_SPLIT):
        members = [(s, i) for s, i in zip(shards, infos, strict=True) if s.split == split]
        if members:
            counts = np.sum([s.class_counts for s, _ in members], axis=0)
            splits[split] = split_info((i for _, i in members), counts.tolist())
    manifest = Manifest(source=source.info, splits=splits, samples_per_shard=samples_per_shard)
    manifest_uri = dest_loc.join(MANIFEST_NAME).uri

    # Uploads are latency-bound small objects: a few threads keep the connection busy.
    threads = 8 if dest_loc.is_s3 else 2
    present = _run_threads(
        lambda info: storage.object_sha256(dest_loc.join(info.name).uri, endpoint_url=endpoint_url) == info.sha256,
        infos,
        threads=threads,
        what=f"checking what is already at {dest}; nothing was changed there",
    )
    todo = [(shard, info) for shard, info, ok in zip(shards, infos, present, strict=True) if not ok]
    for info, ok in zip(infos, present, strict=True):
        if ok:
            on_written(info.bytes)
    if todo:
        # Shards are about to change: readers must not see the old manifest over new shards in between.
        storage.delete(manifest_uri, endpoint_url=endpoint_url)

        def put(item: tuple[EncodedShard, ShardInfo]) -> int:
            shard, info = item
            storage.write_bytes(dest_loc.join(info.name).uri, shard.data, endpoint_url=endpoint_url)
            return info.bytes

        _run_threads(
            put,
            todo,
            on_done=on_written,
            threads=threads,
            what=f"writing shards to {dest}; manifest.json is not written, so readers see no dataset there until "
            "you re-run the same command (shards already written are kept)",
        )
        storage.write_bytes(manifest_uri, manifest.to_json(), endpoint_url=endpoint_url)
    elif _read_or_none(manifest_uri, endpoint_url=endpoint_url) != manifest.to_json():
        storage.write_bytes(manifest_uri, manifest.to_json(), endpoint_url=endpoint_url)  # atomic: no gap
    t2 = time.perf_counter()
    return ShardingResult(
        manifest=manifest,
        dest=dest,
        written=len(todo),
        skipped=len(shards) - len(todo),
        seconds_encode=t1 - t0,
        seconds_write=t2 - t1,
    )
