"""Streaming the shards to training and evaluation: a WebDataset pipeline per rank and DataLoader worker.

Sharding across ranks is explicit because Ray's ``prepare_data_loader`` does not split ``IterableDataset`` s.

* **Training** (``training=True``): each epoch the shard list is permuted from ``(seed, epoch)`` and dealt to ranks
  round-robin (`shards_for`). Each rank cycles through its shards, shuffles samples in a seeded buffer and stops after
  exactly ``steps_per_epoch`` full batches, the same number on every rank, so DDP's collectives never wait on a rank
  that ran out of data. Restarting at an epoch reproduces that epoch's order exactly.
* **Evaluation** (``training=False``): shards are dealt to ranks and then loader workers without repetition or
  shuffling, and the last batch may be short, so across all ranks every sample is seen exactly once.

Batches are ``uint8`` tensors ``[B, 1, 48, 48]``: augmentation, resizing and normalisation happen on the training
device, so the loader only reads and decodes ~1.5 kB PNGs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import logging
import re
import shlex
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ferdist import storage
from ferdist.config import DataConfig, redact_uri
from ferdist.constants import (
    DEFAULT_SAMPLES_PER_SHARD,
    MANIFEST_NAME,
    PRETRAIN_SPLITS,
    SYNTHETIC_DEFAULT_ROWS,
    UNLABELED_SPLIT,
)
from ferdist.data.shards import DecodedShard, Manifest, decode_shard, manifest_from_json
from ferdist.errors import CorruptDataError, FerdistError, MissingError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRef:
    """One shard a loader reads: where it is, its sample count and sha256 from its manifest, and its dataset."""

    uri: str
    samples: int
    sha256: str
    dataset: str
    """The dataset folder or prefix it belongs to (named when the shard is missing)."""
    remake: str = ""
    """The command that wrote that dataset (`shard_command`), for the sentence when the shard is missing."""


@dataclass(frozen=True)
class DatasetRecord:
    """What a run records of a dataset it read (an MLflow dataset input): enough to tell two runs on different data
    apart and to find the data again, nothing secret."""

    name: str
    """The dataset folder's name (``fer2013``)."""
    source: str
    """Where the shards are: the folder or s3:// prefix, with any password in the URI redacted."""
    digest: str
    """The first 16 hex digits of the manifest's sha256: the manifest lists every shard's sha256, so equal digests
    mean the same samples in the same shards."""
    profile: dict[str, Any]
    """The source file and its sha256, the class names, and each split's sample and class counts."""

    @property
    def source_type(self) -> str:
        return "s3" if self.source.startswith("s3://") else "local"


@dataclass(frozen=True)
class Selection:
    """The shards a loader reads: one split of one dataset, or (pretraining) several splits of several datasets."""

    name: str
    """What it is, for messages: ``split 'train'``, or a list of splits and datasets."""
    shards: tuple[ShardRef, ...]
    class_counts: tuple[int, ...]
    endpoint_url: str | None = None
    outage_s: float = 0.0
    datasets: tuple[DatasetRecord, ...] = ()
    """The datasets it was selected from (pretraining: the records its run logs)."""

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


@dataclass(frozen=True)
class ShardedDataset:
    """A manifest and where its shards live."""

    manifest: Manifest
    base_uri: str
    endpoint_url: str | None = None
    outage_s: float = 0.0
    """How long a shard read waits out an unreachable store (inside a run; 0 fails at once)."""

    def select(self, split: str, *, labelled: bool = True) -> Selection:
        """The shards of ``split``; ``labelled`` refuses the unlabeled split (see `Manifest.split`)."""
        info = self.manifest.split(split, labelled=labelled)
        uris = self.manifest.shard_uris(self.base_uri, split)
        pairs = zip(uris, info.shards, strict=True)
        remake = shard_command(self.base_uri, self.manifest, endpoint_url=self.endpoint_url)
        refs = tuple(ShardRef(uri, s.samples, s.sha256, self.base_uri, remake) for uri, s in pairs)
        return Selection(name=f"split '{split}'", shards=refs, class_counts=tuple(info.class_counts),
                         endpoint_url=self.endpoint_url, outage_s=self.outage_s)  # fmt: skip


def union(parts: Sequence[Selection], *, name: str) -> Selection:
    """Several selections read as one (their shards shuffled together each epoch); the first's store settings."""
    if not parts:
        raise ValueError("union of no selections")
    counts = np.sum([p.class_counts for p in parts], axis=0).tolist()
    return Selection(name=name, shards=tuple(ref for p in parts for ref in p.shards), class_counts=tuple(counts),
                     endpoint_url=parts[0].endpoint_url, outage_s=parts[0].outage_s)  # fmt: skip


def dataset_record(dataset: ShardedDataset) -> DatasetRecord:
    manifest = dataset.manifest
    return DatasetRecord(
        name=dataset.base_uri.rstrip("/").rsplit("/", 1)[-1] or dataset.base_uri,
        source=redact_uri(dataset.base_uri),
        digest=hashlib.sha256(manifest.to_json()).hexdigest()[:16],
        profile={"source": manifest.source.name, "source_sha256": manifest.source.sha256,
                 "synthetic": manifest.source.synthetic, "classes": list(manifest.classes),
                 "splits": {name: {"samples": s.samples, "class_counts": list(s.class_counts)}
                            for name, s in sorted(manifest.splits.items())}},
    )  # fmt: skip


def shard_command(dest: str, manifest: Manifest | None = None, *, endpoint_url: str | None = None) -> str:
    """The jobs/shard.py command that writes the dataset at ``dest``, for an error to suggest. With its manifest
    (a shard gone missing) it is the command that wrote it: the same source and options give the same shards, so a
    re-run writes only what is missing. Without one, a guess from the folder's name (jobs/shard.py needs --source)."""
    where = ""
    if manifest is None:
        name = dest.rstrip("/").rsplit("/", 1)[-1].lower()
        source = "synthetic" if "synthetic" in name else "FER2013.CSV"
        if source != "synthetic":
            where = ", FER2013.CSV being your fer2013.csv[.gz|.xz] or 'synthetic'"
        options = []
    elif generated := re.fullmatch(r"synthetic-(\d+)-seed(\d+)\.csv", manifest.source.name):
        source, (rows, seed) = "synthetic", generated.groups()  # the set --source synthetic generates, by its name
        options = [] if int(rows) == SYNTHETIC_DEFAULT_ROWS else ["--synthetic-rows", rows]
        options += [] if seed == "0" else ["--seed", seed]
    else:
        source = f"PATH/{manifest.source.name}"
        where = f", PATH being the folder of the {manifest.source.name} it was sharded from"
        options = ["--unlabeled"] if UNLABELED_SPLIT in manifest.splits else []
        # An image folder's held-out slices depend on the options that carved them out of train/ (none when it
        # has val/ and test/ folders).
        for option, value in sorted(manifest.source.split_options.items()):
            options += [f"--{option.replace('_', '-')}", str(value)]
        if manifest.source.kind == "image-folder" and not manifest.source.split_options:
            # Written before manifests kept them (or from a folder with val/ and test/, where they change nothing).
            where += ", and the --val-fraction, --test-fraction and --seed it was sharded with, if any"
    if manifest is not None and manifest.samples_per_shard != DEFAULT_SAMPLES_PER_SHARD:
        options += ["--samples-per-shard", str(manifest.samples_per_shard)]
    if endpoint_url:
        options += ["--endpoint-url", endpoint_url]
    command = shlex.join(["python", "jobs/shard.py", "--source", source, "--dest", dest, *options])
    return command + where


def open_dataset(uri: str, *, endpoint_url: str | None = None, outage_s: float = 0.0) -> ShardedDataset:
    """Reads the manifest at ``uri`` (a dataset folder/prefix, or the manifest.json itself); ``outage_s``: how long
    this and every shard read waits out an unreachable store (see `ferdist.outage`)."""
    base = uri.rstrip("/")
    if not base.endswith(".json") and (local := storage.parse_uri(base).path) is not None and local.is_file():
        raise FerdistError(f"'{uri}' is a file, not a dataset; give the folder jobs/shard.py wrote (the one that holds "
                           "manifest.json), or that manifest.json itself")  # fmt: skip
    if base.endswith(".json"):
        manifest_uri, base = base, base.rsplit("/", 1)[0] if "/" in base else "."
    else:
        manifest_uri = storage.parse_uri(base).join(MANIFEST_NAME).uri
    try:
        data = storage.read_bytes(manifest_uri, endpoint_url=endpoint_url, outage_s=outage_s)
    except MissingError:
        raise FerdistError(
            f"no manifest at '{manifest_uri}'; shard the data there first "
            f"({shard_command(base, endpoint_url=endpoint_url)}) — "
            "a folder of shards without manifest.json is an incomplete dataset"
        ) from None
    return ShardedDataset(manifest=manifest_from_json(data, uri=manifest_uri), base_uri=base, endpoint_url=endpoint_url,
                          outage_s=outage_s)  # fmt: skip


def open_pretraining_data(
    manifest: str, extra: Sequence[str] = (), *, endpoint_url: str | None = None, outage_s: float = 0.0
) -> Selection:
    """What MAE pretraining reads: the train and unlabeled splits of ``manifest`` and of every ``extra`` dataset,
    as one set of shards. Never val or test: they are held out to choose and score the fine-tuned model.

    Raises:
        FerdistError: a dataset cannot be opened, has neither split, or is the same source as another one listed
            (read twice an epoch, its faces would count double).
    """
    parts: list[Selection] = []
    records: list[DatasetRecord] = []
    sources: dict[str, str] = {}
    for i, uri in enumerate((manifest, *extra)):
        where = "data.manifest" if i == 0 else f"data.extra[{i - 1}]"
        try:
            dataset = open_dataset(uri, endpoint_url=endpoint_url, outage_s=outage_s)
        except FerdistError as exn:
            if _is_image_folder(uri):
                raise FerdistError(f"{where}: {uri} is a folder of images, not a sharded dataset; "
                                   f"{_shard_folder_advice(uri)}") from None  # fmt: skip
            raise type(exn)(f"{where}: {exn}") from None
        source = dataset.manifest.source
        if source.sha256 in sources:
            raise FerdistError(
                f"{where} ({uri}) holds the same faces as {sources[source.sha256]} (source {source.name}, sha256 "
                f"{source.sha256[:12]}…); pretraining would read them twice an epoch, so list that dataset once"
            )
        sources[source.sha256] = f"{where} ({uri})"
        splits = [s for s in PRETRAIN_SPLITS if s in dataset.manifest.splits]
        if not splits:
            raise FerdistError(
                f"{where} ({uri}) has no train or unlabeled split (it has: {', '.join(dataset.manifest.splits)}); "
                "pretraining never reads val or test, which are held out for the fine-tuned model"
            )
        parts += [dataset.select(s, labelled=False) for s in splits]
        records.append(dataset_record(dataset))
    name = "the pretraining data (" + ", ".join(f"{p.name} of {p.shards[0].dataset}" for p in parts if p.shards) + ")"
    return dataclasses.replace(union(parts, name=name), datasets=tuple(records))


def _shard_folder_advice(uri: str) -> str:
    """How to shard the image folder at ``uri`` for pretraining: a labelled one (train/, test/, … of classes) as
    itself, so its val and test faces stay held out (pretraining reads only its train split); any other as unlabeled
    faces, every image in it."""
    from ferdist.data.sources import SPLIT_OF_FOLDER

    path = storage.parse_uri(uri).path
    assert path is not None  # `_is_image_folder` said it is a local folder
    name = path.resolve().name
    if any(p.is_dir() and p.name.lower() in SPLIT_OF_FOLDER for p in path.iterdir()):
        command = shlex.join(["python", "jobs/shard.py", "--source", str(path), "--dest", f"shards/{name}"])
        return f"it holds split folders, so shard it as labelled faces ({command}) and list that"
    command = shlex.join(["python", "jobs/shard.py", "--source", str(path), "--unlabeled", "--dest",
                          f"shards/{name}-unlabeled"])  # fmt: skip
    return f"shard it first with {command} and list that"


def _is_image_folder(uri: str) -> bool:
    """``uri`` is a local folder holding image files (and no manifest)."""
    from ferdist.data.sources import IMAGE_SUFFIXES

    path = storage.parse_uri(uri).path
    if path is None or not path.is_dir():
        return False
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in itertools.islice(path.rglob("*"), 10_000))


def shards_for(urls: Sequence[str], *, rank: int, world_size: int, epoch: int, seed: int, shuffle: bool) -> list[str]:
    """The shards rank ``rank`` reads in ``epoch``: a seeded per-epoch permutation (if shuffling) dealt round-robin."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    order = np.random.default_rng([seed, epoch]).permutation(len(urls)) if shuffle else np.arange(len(urls))
    return [urls[i] for i in order[rank::world_size]]


def steps_per_epoch(num_samples: int, *, batch_size: int, world_size: int) -> int:
    """Optimizer steps per epoch: full global batches only, identical on every rank."""
    return num_samples // (batch_size * world_size)


class _BadSampleGuard:
    """Counts unreadable samples in one loader process and stops the epoch past the threshold."""

    def __init__(self, limit: int) -> None:
        self.limit, self.count = limit, 0

    def lost(self, shard: str, missing: int, reason: str) -> None:
        self.count += missing
        log.warning("skipped %d unreadable sample(s) in %s: %s", missing, shard, reason)
        if self.count > self.limit:
            raise CorruptDataError(
                f"{self.count} unreadable samples so far (limit data.max_bad_samples={self.limit}), the latest in "
                f"shard {shard}: {reason}; re-create the shards with jobs/shard.py or raise the limit"
            )


class _ShardStream(IterableDataset):
    """The samples one loader worker of one rank reads in one epoch."""

    def __init__(
        self,
        selection: Selection,
        cfg: DataConfig,
        *,
        rank: int,
        world_size: int,
        epoch: int,
        seed: int,
        training: bool,
        batch_size: int,
    ) -> None:
        super().__init__()
        self.selection, self.cfg = selection, cfg
        self.counts = {ref.uri: ref.samples for ref in selection.shards}
        self.rank, self.world_size, self.epoch, self.seed = rank, world_size, epoch, seed
        self.training, self.batch_size = training, batch_size

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _my_shards(self) -> Iterator[tuple[str, int] | None]:
        """This loader worker's shards and their sample counts; in training, cycled, with one None where the
        worker's first pass over the shards it holds ends (`FIRST_PASS_END`)."""
        counts = self.counts
        mine = shards_for(
            list(counts),
            rank=self.rank,
            world_size=self.world_size,
            epoch=self.epoch,
            seed=self.seed,
            shuffle=self.training,
        )
        worker, workers = self._worker()
        # Training cycles so every rank fills its quota of batches whatever its share of shards; evaluation reads
        # each shard once.
        seq = itertools.cycle(mine) if self.training else iter(mine)
        held = len(mine[worker::workers])
        for i, url in enumerate(itertools.islice(seq, worker, None, workers)):
            if self.training and i == held:
                yield FIRST_PASS_END
            yield url, counts[url]

    def _decoded_shards(self) -> Iterator[DecodedShard]:
        guard = _BadSampleGuard(self.cfg.max_bad_samples)
        refs = {ref.uri: ref for ref in self.selection.shards}
        damaged: set[str] = set()
        for item in self._my_shards():
            if item is FIRST_PASS_END:
                yield FIRST_PASS_END
                continue
            url, expected = item
            reasons: list[str] = []
            try:
                data = storage.read_bytes(url, endpoint_url=self.selection.endpoint_url,
                                          outage_s=self.selection.outage_s)  # fmt: skip
            except MissingError:
                raise FerdistError(
                    f"shard '{url}' is listed in the manifest but missing; re-create the dataset with "
                    f"{refs[url].remake} (it re-writes only what is missing)"
                ) from None
            shard = decode_shard(data, shard=url, sha256=refs[url].sha256,
                                 on_bad=lambda _s, why, r=reasons: r.append(why))  # fmt: skip
            # A training worker cycles its shards: a damaged one is counted (and logged) the first time only.
            if (len(shard) < expected or reasons) and url not in damaged:
                damaged.add(url)
                guard.lost(url, max(expected - len(shard), len(reasons)), "; ".join(reasons) or "samples missing")
            yield shard

    def quota(self) -> int | None:
        """Samples this loader worker yields in a training epoch (None in evaluation: all of its shards)."""
        if not self.training:
            return None
        steps = steps_per_epoch(self.selection.samples, batch_size=self.batch_size, world_size=self.world_size)
        counts = self.counts
        mine = shards_for(
            list(counts), rank=self.rank, world_size=self.world_size, epoch=self.epoch, seed=self.seed, shuffle=True
        )
        worker, workers = self._worker()
        available = [sum(counts[u] for u in mine[w::workers]) for w in range(workers)]
        return worker_batches(available, steps=steps, batch_size=self.batch_size)[worker] * self.batch_size

    def class_weights(self) -> np.ndarray | None:
        """Per-class draw weights for class-balanced training (inverse class frequency), else None."""
        if not self.training or self.cfg.sampling != "class_balanced":
            return None
        counts = np.asarray(self.selection.class_counts, dtype=np.float64)
        return np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if get_worker_info() is None:
            return self._batches()
        return _errors_as_items(self._batches())

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, _ = self._worker()
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker]) if self.training else None
        pipeline = wds.DataPipeline(
            self._decoded_shards,
            functools.partial(
                batches,
                batch_size=self.batch_size,
                buffer=self.cfg.shuffle_buffer,
                rng=rng,
                limit=self.quota(),
                class_weights=self.class_weights(),
            ),
        )
        return iter(pipeline)


FIRST_PASS_END = None
"""In a training worker's stream of shards: its first pass over the shards it holds ends here (what follows is
re-read to fill its quota)."""

_ERROR_KEY = "ferdist_error"


def _errors_as_items(batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """In a loader worker process: a `FerdistError` becomes a last item carrying its class and sentence.

    PyTorch re-raises a worker's exception in the main process with the worker's whole traceback pasted into the
    message ("Caught FerdistError in DataLoader worker process 0 …"); passed as an item, it arrives as sent and
    `ShardLoader` raises it there as the same one sentence.
    """
    try:
        yield from batches
    except FerdistError as exn:
        yield {_ERROR_KEY: (type(exn), str(exn))}


class ShardLoader(DataLoader):
    """A DataLoader whose loader-worker errors surface as the worker's own `FerdistError`, one sentence."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:  # type: ignore[override]
        for batch in super().__iter__():
            if _ERROR_KEY in batch:
                kind, message = batch[_ERROR_KEY]
                raise kind(message)
            yield batch


def worker_batches(available: Sequence[int], *, steps: int, batch_size: int) -> list[int]:
    """Splits a rank's ``steps`` batches over its loader workers by the samples each holds.

    Workers only wrap around their shards (re-reading samples) when the rank as a whole is short of samples.
    """
    share = [a // batch_size for a in available]
    while sum(share) > steps:
        share[share.index(max(share))] -= 1
    by_remainder = sorted(range(len(available)), key=lambda w: (-(available[w] - share[w] * batch_size), w))
    for i in range(steps - sum(share)):
        share[by_remainder[i % len(share)]] += 1
    return share


def batches(
    shards: Iterable[DecodedShard | None],
    *,
    batch_size: int,
    buffer: int,
    rng: np.random.Generator | None,
    limit: int | None,
    class_weights: np.ndarray | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches from decoded shards: shuffled in blocks of >= ``buffer`` samples when ``rng`` is given, else in order.

    With ``limit`` (training) only full batches are emitted, up to ``limit`` samples; without it (evaluation) every
    sample is emitted exactly once and the last batch may be short. With ``class_weights`` (and ``rng``) each block is
    re-drawn with replacement, a sample's chance proportional to its class's weight: class-balanced sampling within
    the shuffle buffer.
    """
    emitted = 0
    leftover: DecodedShard | None = None
    for block in _blocks(shards, min_size=buffer if rng is not None else batch_size):
        if rng is not None and class_weights is not None:
            p = class_weights[block.labels]
            block = _take(block, rng.choice(len(block), size=len(block), p=p / p.sum()))
        elif rng is not None:
            block = _take(block, rng.permutation(len(block)))
        if leftover is not None:
            # Leftovers were shuffled already and go first, so a worker that wraps around its shards repeats as few
            # samples as it needs to fill its last batch.
            block = _concat([leftover, block])
        full = len(block) // batch_size * batch_size
        for start in range(0, full, batch_size):
            if limit is not None and emitted >= limit:
                return
            yield as_batch(_take(block, slice(start, start + batch_size)))
            emitted += batch_size
        leftover = _take(block, slice(full, len(block)))
    if limit is None and leftover is not None and len(leftover):
        yield as_batch(leftover)


def _blocks(shards: Iterable[DecodedShard | None], *, min_size: int) -> Iterator[DecodedShard]:
    """Consecutive shards joined into blocks of at least ``min_size`` samples (the last may be smaller). A block
    ends early at `FIRST_PASS_END`: shuffled with re-read samples, a worker's unread ones could be pushed past its
    quota and never seen, while re-read ones take their place."""
    pending: list[DecodedShard] = []
    for shard in shards:
        if shard is FIRST_PASS_END:
            if pending:
                yield _concat(pending)
                pending = []
            continue
        pending.append(shard)
        if sum(len(p) for p in pending) >= min_size:
            yield _concat(pending)
            pending = []
    if pending:
        yield _concat(pending)


def _concat(parts: list[DecodedShard]) -> DecodedShard:
    if len(parts) == 1:
        return parts[0]
    return DecodedShard(
        rows=np.concatenate([p.rows for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        images=np.concatenate([p.images for p in parts]),
    )


def _take(block: DecodedShard, index: np.ndarray | slice) -> DecodedShard:
    return DecodedShard(rows=block.rows[index], labels=block.labels[index], images=block.images[index])


def as_batch(block: DecodedShard) -> dict[str, torch.Tensor]:
    """A batch: ``image`` uint8 [B, 1, 48, 48], ``label`` int64 [B], ``row`` int64 [B] (source row indices)."""
    return {
        "image": torch.from_numpy(np.ascontiguousarray(block.images[:, None])),
        "label": torch.from_numpy(np.ascontiguousarray(block.labels)),
        "row": torch.from_numpy(np.ascontiguousarray(block.rows)),
    }


def build_loader(
    dataset: ShardedDataset | Selection,
    split: str | None,
    cfg: DataConfig,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed: int = 0,
    training: bool,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over one rank's share of ``split`` of ``dataset`` (or of a `Selection`; ``split`` is then
    None) for ``epoch`` (see the module docstring for the contract)."""
    if isinstance(dataset, Selection):
        selection = dataset
    elif split is None:
        raise ValueError("build_loader needs a split of a ShardedDataset")
    else:
        selection = dataset.select(split)
    num_shards = len(selection.shards)
    if training:
        if steps_per_epoch(selection.samples, batch_size=batch_size, world_size=world_size) < 1:
            raise FerdistError(
                f"{selection.name} has {selection.samples} samples, fewer than one global batch "
                f"({batch_size} x {world_size} workers); lower the batch size"
            )
        if num_shards < world_size:
            raise FerdistError(
                f"{selection.name} has {num_shards} shards for {world_size} workers; re-shard with a smaller "
                "--samples-per-shard so every worker reads its own shards"
            )
    rank_shards = len(range(rank, num_shards, world_size))
    # More loader workers than shards would leave some idle (evaluation) or re-read shards (training).
    workers = min(cfg.loader_workers, rank_shards)
    stream = _ShardStream(
        selection,
        cfg,
        rank=rank,
        world_size=world_size,
        epoch=epoch,
        seed=seed,
        training=training,
        batch_size=batch_size,
    )
    # pin_memory (for CUDA): page-locked batches copy to the GPU asynchronously (see ferdist.train.loop.on_device).
    return ShardLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
                       pin_memory=pin_memory)  # fmt: skip
