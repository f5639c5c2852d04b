"""Source → WebDataset shards + manifest, on a local folder or S3, reproducibly and without half-written states.

Order of work, and why:

1. Check the destination is writable (bad bucket, endpoint or credentials fail before minutes of encoding).
2. Parse, validate and encode every shard in worker processes and hold the tars in memory (~145 MB for FER2013):
   a bad row anywhere stops the job before anything at the destination has been touched.
3. Delete the old manifest, then write shards, skipping any already there with the same sha256: re-running after an
   interrupted upload finishes it without rewriting or duplicating (names are deterministic).
4. Write ``manifest.json`` last; its presence is what makes the dataset complete.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ferdist import storage
from ferdist.constants import MANIFEST_NAME, NUM_CLASSES, SPLITS
from ferdist.shards import Manifest, ShardInfo, build_shard, encode_pngs, sha256_hex, shard_name, split_info
from ferdist.sources import Source

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
    for split in SPLITS:
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
    counts = np.bincount(batch.labels, minlength=NUM_CLASSES)
    return EncodedShard(split=split, index=index, data=data, samples=len(rows), class_counts=counts)


def encode_all(source: Source, *, samples_per_shard: int, workers: int, progress: ProgressFn) -> list[EncodedShard]:
    """Validates and encodes every shard; raises the first `FerdistError` and writes nothing."""
    global _SOURCE
    tasks = plan_shards(source, samples_per_shard)
    _SOURCE = source
    try:
        results: Iterator[EncodedShard]
        if workers <= 1 or "fork" not in mp.get_all_start_methods():
            results = map(_encode_task, tasks)
            return [_tick(r, progress) for r in results]
        with mp.get_context("fork").Pool(workers) as pool:
            return [_tick(r, progress) for r in pool.imap(_encode_task, tasks, chunksize=4)]
    finally:
        _SOURCE = None


def _tick(shard: EncodedShard, progress: ProgressFn) -> EncodedShard:
    progress(shard.samples)
    return shard


def write_shards(
    source: Source,
    dest: str,
    *,
    samples_per_shard: int = 64,
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
    shards = encode_all(
        source, samples_per_shard=samples_per_shard, workers=workers or os.cpu_count() or 1, progress=on_encoded
    )
    t1 = time.perf_counter()

    manifest_uri = dest_loc.join(MANIFEST_NAME).uri
    storage.delete(manifest_uri, endpoint_url=endpoint_url)

    infos = [s.info for s in shards]

    def put(item: tuple[EncodedShard, ShardInfo]) -> bool:
        shard, info = item
        uri = dest_loc.join(info.name).uri
        if storage.object_sha256(uri, endpoint_url=endpoint_url) == info.sha256:
            on_written(info.bytes)
            return False
        storage.write_bytes(uri, shard.data, endpoint_url=endpoint_url)
        on_written(info.bytes)
        return True

    # Uploads are latency-bound small objects: a few threads keep the connection busy.
    with ThreadPoolExecutor(max_workers=8 if dest_loc.is_s3 else 2) as pool:
        wrote = list(pool.map(put, zip(shards, infos, strict=True)))

    splits = {}
    for split in SPLITS:
        members = [(s, i) for s, i in zip(shards, infos, strict=True) if s.split == split]
        if members:
            counts = np.sum([s.class_counts for s, _ in members], axis=0)
            splits[split] = split_info((i for _, i in members), counts.tolist())
    manifest = Manifest(source=source.info, splits=splits, samples_per_shard=samples_per_shard)
    storage.write_bytes(manifest_uri, manifest.to_json(), endpoint_url=endpoint_url)
    t2 = time.perf_counter()
    return ShardingResult(
        manifest=manifest,
        dest=dest,
        written=sum(wrote),
        skipped=len(wrote) - sum(wrote),
        seconds_encode=t1 - t0,
        seconds_write=t2 - t1,
    )
