"""The shard reader's contract: exactly-once evaluation, equal steps per rank, reproducible epochs, bad data counted."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ferdist.config import DataConfig
from ferdist.data.loader import build_loader, open_dataset, shards_for, steps_per_epoch
from ferdist.errors import CorruptDataError, FerdistError


def _rows(loader) -> list[int]:
    return [r for batch in loader for r in batch["row"].tolist()]


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("epoch", [0, 7])
def test_shards_for_is_disjoint_and_covering(world_size: int, epoch: int) -> None:
    urls = [f"train-{i:06d}.tar" for i in range(23)]
    parts = [
        shards_for(urls, rank=r, world_size=world_size, epoch=epoch, seed=1, shuffle=True) for r in range(world_size)
    ]
    assert sorted(sum(parts, [])) == urls
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == [
        shards_for(urls, rank=r, world_size=world_size, epoch=epoch, seed=1, shuffle=True) for r in range(world_size)
    ]
    other = [
        shards_for(urls, rank=r, world_size=world_size, epoch=epoch + 1, seed=1, shuffle=True)
        for r in range(world_size)
    ]
    assert other != parts or world_size == 1 and sorted(other[0]) == sorted(parts[0])


@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize(("world_size", "workers"), [(1, 0), (1, 2), (2, 2), (3, 1), (4, 3)])
def test_evaluation_sees_every_sample_exactly_once(
    synth_shards: Path, split: str, world_size: int, workers: int
) -> None:
    ds = open_dataset(str(synth_shards))
    cfg = DataConfig(manifest=str(synth_shards), loader_workers=workers)
    rows = []
    for rank in range(world_size):
        rows += _rows(build_loader(ds, split, cfg, batch_size=8, rank=rank, world_size=world_size, training=False))
    expected = ds.manifest.split(split).samples
    assert len(rows) == expected and len(set(rows)) == expected


def test_evaluation_labels_match_the_source(synth_shards: Path, synth_csv: Path) -> None:
    from ferdist.data.sources import open_source

    src = open_source(synth_csv)
    ds = open_dataset(str(synth_shards))
    for batch in build_loader(ds, "test", DataConfig(loader_workers=0), batch_size=7, training=False):
        truth = src.load(batch["row"].tolist())
        assert batch["label"].tolist() == truth.labels.tolist()
        assert (batch["image"][:, 0].numpy() == truth.images).all()
        assert batch["image"].dtype.is_floating_point is False and batch["image"].shape[1:] == (1, 48, 48)


# The loader's contract (ferdist/data/loader.py): every rank yields exactly steps_per_epoch full batches; ranks read
# disjoint shards, so no sample reaches two ranks; a loader worker reads each of its own shards once and wraps around
# only for the batches its quota (worker_batches) has beyond its samples, repeating exactly that many samples (the
# shuffled leftovers go first). So an epoch repeats sum(max(0, quota - held)) samples over all workers, no more.
# With a shuffle buffer larger than a shard (64 here, 16 a shard), a worker's last block of its first pass used to
# be filled with re-read shards before it was shuffled, so re-read samples displaced unread ones (51 repeats instead
# of 6 for 3 ranks x 2 workers, batch 10): the buffer=64 cases catch that.
@pytest.mark.parametrize("buffer", [1, 64])
@pytest.mark.parametrize(("world_size", "workers", "batch"), [(1, 0, 16), (2, 2, 16), (3, 2, 10), (4, 1, 8)])
def test_training_gives_every_rank_the_same_full_batches(
    synth_shards: Path, world_size: int, workers: int, batch: int, buffer: int
) -> None:
    """Catches repeats beyond what a worker's quota needs (e.g. leftovers not going first, or a worker wrapping
    around while it still holds unread samples), samples shared by two ranks, and ranks with unequal steps."""
    from ferdist.data.loader import worker_batches

    ds = open_dataset(str(synth_shards))
    cfg = DataConfig(loader_workers=workers, shuffle_buffer=buffer)
    steps = steps_per_epoch(280, batch_size=batch, world_size=world_size)
    counts = {ref.uri: ref.samples for ref in ds.select("train").shards}
    per_rank, must_repeat = [], 0
    for rank in range(world_size):
        batches = list(
            build_loader(
                ds, "train", cfg, batch_size=batch, rank=rank, world_size=world_size, epoch=2, seed=5, training=True
            )
        )
        assert all(len(b["label"]) == batch for b in batches)
        per_rank.append([r for b in batches for r in b["row"].tolist()])
        mine = shards_for(list(counts), rank=rank, world_size=world_size, epoch=2, seed=5, shuffle=True)
        held = [sum(counts[u] for u in mine[w :: max(workers, 1)]) for w in range(max(workers, 1))]
        quota = [n * batch for n in worker_batches(held, steps=steps, batch_size=batch)]
        must_repeat += sum(max(0, q - h) for q, h in zip(quota, held, strict=True))
    assert [len(p) // batch for p in per_rank] == [steps] * world_size
    for a in range(world_size):  # no sample reaches two ranks
        for b in range(a + 1, world_size):
            assert not set(per_rank[a]) & set(per_rank[b])
    seen = sum(per_rank, [])
    assert must_repeat < 10 and len(seen) == steps * batch * world_size
    assert len(seen) - len(set(seen)) == must_repeat  # repeats: only what quotas beyond the samples held need
    assert len(set(seen)) == len(seen) - must_repeat <= 280


@pytest.mark.parametrize(
    ("available", "steps", "expected"),
    [([80, 64], 8, [4, 4]), ([48, 48], 9, [5, 4]), ([100], 3, [3]), ([10, 30, 60], 10, [1, 3, 6]), ([5, 5], 2, [1, 1])],
)
def test_worker_batches_follow_the_samples_each_worker_holds(
    available: list[int], steps: int, expected: list[int]
) -> None:
    from ferdist.data.loader import worker_batches

    assert worker_batches(available, steps=steps, batch_size=10) == expected


def test_training_order_is_a_function_of_seed_and_epoch(synth_shards: Path) -> None:
    ds = open_dataset(str(synth_shards))
    cfg = DataConfig(loader_workers=2, shuffle_buffer=64)

    def order(epoch: int, seed: int) -> list[int]:
        return _rows(build_loader(ds, "train", cfg, batch_size=16, epoch=epoch, seed=seed, training=True))

    assert order(3, 0) == order(3, 0)
    assert order(3, 0) != order(4, 0)
    assert order(3, 0) != order(3, 1)
    assert sorted(order(3, 0)) != order(3, 0)  # actually shuffled


def _corrupt(src: Path, dest: Path, names: list[str], how: str) -> None:
    shutil.copytree(src, dest)
    for name in names:
        data = bytearray((dest / name).read_bytes())
        if how == "truncate":
            (dest / name).write_bytes(bytes(data[: len(data) // 3]))
        else:
            data[512 + 100 : 512 + 140] = bytes(40)  # inside the first sample's pixels
            (dest / name).write_bytes(bytes(data))


def test_a_changed_shard_is_skipped_whole_counted_and_logged(
    synth_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dest = tmp_path / "d"
    _corrupt(synth_shards, dest, ["val-000000.tar"], how="flip")
    ds = open_dataset(str(dest))
    rows = _rows(build_loader(ds, "val", DataConfig(loader_workers=0), batch_size=8, training=False))
    val_rows = ds.manifest.split("val").samples
    assert len(rows) == val_rows - 16 and len(set(rows)) == len(rows)
    assert "skipped 16 unreadable sample(s)" in caplog.text and "val-000000.tar" in caplog.text
    assert "do not match the manifest's sha256" in caplog.text


def test_a_changed_label_digit_is_never_served(synth_shards: Path, tmp_path: Path) -> None:
    # The PNGs stay valid, so only the manifest's sha256 can tell: the old reader served the new, wrong label.
    dest = tmp_path / "d"
    shutil.copytree(synth_shards, dest)
    shard = dest / "val-000001.tar"
    data = bytearray(shard.read_bytes())
    cls_at = data.index(b".cls\0") - 6  # the first sample's .cls member header
    payload = cls_at + 512
    truth = {int(r): int(lab) for r, lab in _labels(build_loader(open_dataset(str(synth_shards)), "val",
                                                                 DataConfig(loader_workers=0), batch_size=64,
                                                                 training=False))}  # fmt: skip
    data[payload] = ord("0") + (data[payload] - ord("0") + 1) % 7
    shard.write_bytes(bytes(data))
    for workers in (0, 1):
        got = _labels(build_loader(open_dataset(str(dest)), "val", DataConfig(loader_workers=workers), batch_size=64,
                                   training=False))  # fmt: skip
        assert got and all(truth[r] == lab for r, lab in got)
        assert len(got) == len(truth) - 16


def _labels(loader: Any) -> list[tuple[int, int]]:
    return [(int(r), int(lab)) for b in loader for r, lab in zip(b["row"], b["label"], strict=True)]


def test_too_many_bad_samples_stop_naming_the_shard(synth_shards: Path, tmp_path: Path) -> None:
    dest = tmp_path / "d"
    _corrupt(synth_shards, dest, ["train-000003.tar"], how="truncate")
    ds = open_dataset(str(dest))
    cfg = DataConfig(loader_workers=0, max_bad_samples=5)
    with pytest.raises(CorruptDataError, match=r"limit data.max_bad_samples=5\), the latest in shard .*train-000003"):
        for _ in build_loader(ds, "train", cfg, batch_size=16, training=True):
            pass
    # Under the threshold the same damage is tolerated.
    tolerant = DataConfig(loader_workers=0, max_bad_samples=16)  # the shard counts once though the epoch cycles it
    assert len(list(build_loader(ds, "train", tolerant, batch_size=16, training=True))) == 17


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_worker_errors_are_the_one_sentence(synth_shards: Path, tmp_path: Path, workers: int) -> None:
    # With loader processes PyTorch pastes the worker's traceback into the message; the user must get the sentence.
    dest = tmp_path / "d"
    _corrupt(synth_shards, dest, ["train-000003.tar"], how="truncate")
    (dest / "train-000005.tar").unlink()
    ds = open_dataset(str(dest))
    missing = DataConfig(loader_workers=workers, max_bad_samples=1000)
    with pytest.raises(FerdistError) as info:
        for _ in build_loader(ds, "train", missing, batch_size=16, training=True):
            pass
    message = str(info.value)
    assert message.startswith(f"shard '{dest / 'train-000005.tar'}' is listed in the manifest but missing; ")
    remake = f"python jobs/shard.py --source PATH/synth.csv --dest {dest} --samples-per-shard 16"
    assert (f"re-create the dataset with {remake}, PATH being the folder of the synth.csv it was sharded from (it "
            "re-writes only what is missing)") in message  # fmt: skip
    assert "\n" not in message and "Traceback" not in message
    (dest / "train-000005.tar").write_bytes((synth_shards / "train-000005.tar").read_bytes())
    strict = DataConfig(loader_workers=workers, max_bad_samples=3)
    with pytest.raises(CorruptDataError) as info:
        for _ in build_loader(ds, "train", strict, batch_size=16, training=True):
            pass
    assert str(info.value).startswith("16 unreadable samples so far (limit data.max_bad_samples=3)")
    assert "\n" not in str(info.value) and "DataLoader worker" not in str(info.value)


def test_missing_manifest_is_a_clear_error(synth_shards: Path, tmp_path: Path) -> None:
    partial = tmp_path / "half"
    shutil.copytree(synth_shards, partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(FerdistError, match="no manifest at .*manifest.json'; shard the data there first"):
        open_dataset(str(partial))


def test_too_few_shards_or_samples_for_the_world(synth_shards: Path) -> None:
    ds = open_dataset(str(synth_shards / "manifest.json"))
    with pytest.raises(FerdistError, match="split 'val' has 3 shards for 4 workers"):
        build_loader(ds, "val", DataConfig(), batch_size=1, world_size=4, training=True)
    with pytest.raises(FerdistError, match="fewer than one global batch"):
        build_loader(ds, "train", DataConfig(), batch_size=100, world_size=3, training=True)
    with pytest.raises(FerdistError, match="no 'holdout' split"):
        build_loader(ds, "holdout", DataConfig(), batch_size=1, training=False)


def test_steps_per_epoch() -> None:
    assert steps_per_epoch(28709, batch_size=64, world_size=8) == 56
    assert steps_per_epoch(511, batch_size=64, world_size=8) == 0
    assert np.array_equal([steps_per_epoch(n, batch_size=10, world_size=1) for n in (9, 10, 19, 20)], [0, 1, 1, 2])


def test_a_dataset_path_that_is_a_file_is_one_sentence(tmp_path: Path) -> None:
    """Catches a file given where a dataset folder goes (data.manifest, --manifest, --evaluate): a traceback of
    NotADirectoryError from reading FILE/manifest.json."""
    photo = tmp_path / "face.png"
    photo.write_bytes(b"png")
    said = f"'{photo}' is a file, not a dataset; give the folder jobs/shard.py wrote (the one that holds manifest.json)"
    with pytest.raises(FerdistError, match=re.escape(said)):
        open_dataset(str(photo))
    with pytest.raises(FerdistError, match=re.escape(f"cannot exist: {photo} is not a folder")):
        open_dataset(str(photo / "shards"))
