"""jobs/shard.py end to end: local folder and a real S3 server over HTTP, resume, and bad input."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import shard as shard_job  # jobs/shard.py
from conftest import REAL_FER2013, ROOT

from ferdist.config import DataConfig
from ferdist.data.loader import build_loader, open_dataset
from ferdist.errors import FerdistError


def _read_all(uri: str, split: str, endpoint: str | None = None) -> list[tuple[int, int]]:
    ds = open_dataset(uri, endpoint_url=endpoint)
    loader = build_loader(ds, split, DataConfig(loader_workers=0), batch_size=64, training=False)
    return sorted((r, lab) for b in loader for r, lab in zip(b["row"].tolist(), b["label"].tolist(), strict=True))


def test_synthetic_to_local_counts_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert shard_job.main(["--source", "synthetic", "--synthetic-rows", "700", "--dest", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    assert "SYNTHETIC data, not FER2013" in err and "manifest.json" in err
    ds = open_dataset(str(tmp_path / "s"))
    assert {k: v.samples for k, v in ds.manifest.splits.items()} == {"train": 560, "val": 70, "test": 70}
    assert ds.manifest.source.synthetic and ds.manifest.split("val").class_counts == [10] * 7
    assert len(_read_all(str(tmp_path / "s"), "train")) == 560


def test_same_input_gives_byte_identical_shards(synth_csv: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert shard_job.main(["--source", str(synth_csv), "--dest", str(tmp_path / name), "--workers", "2"]) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and "manifest.json" in files
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_bad_row_exits_nonzero_with_one_line_and_no_manifest(synth_csv: Path, tmp_path: Path) -> None:
    lines = synth_csv.read_text().splitlines()
    lines[120] = lines[120].replace(",Training", ",Trainnig")
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    dest = tmp_path / "out"
    # A complete earlier dataset at the destination must survive a failed re-run untouched.
    assert shard_job.main(["--source", str(synth_csv), "--dest", str(dest)]) == 0
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "shard.py"), "--source", str(bad), "--dest", str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip() == f"error: {bad}: line 121: unknown Usage 'Trainnig' (expected Training, PublicTest or "
        "PrivateTest); fix or remove that row and re-run"
    )
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before


def test_interrupted_local_write_is_completed(synth_csv: Path, tmp_path: Path) -> None:
    dest = tmp_path / "d"
    assert shard_job.main(["--source", str(synth_csv), "--dest", str(dest), "--samples-per-shard", "16"]) == 0
    # Simulate a crash mid-way: manifest gone, some shards missing, one half-written.
    (dest / "manifest.json").unlink()
    for name in ("train-000004.tar", "val-000001.tar"):
        (dest / name).unlink()
    (dest / "test-000000.tar").write_bytes((dest / "test-000000.tar").read_bytes()[:1000])
    with pytest.raises(Exception, match="no manifest"):
        open_dataset(str(dest))
    from ferdist.data.sharding import write_shards
    from ferdist.data.sources import open_source

    result = write_shards(open_source(synth_csv), str(dest), samples_per_shard=16, workers=1)
    assert (result.written, result.skipped) == (3, 21)
    assert len(_read_all(str(dest), "test")) == 35


def test_s3_roundtrip_and_resume(synth_csv: Path, object_store: tuple[str, str]) -> None:
    endpoint, bucket = object_store
    uri = f"s3://{bucket}/fer/synth"
    args = ["--source", str(synth_csv), "--dest", uri, "--endpoint-url", endpoint, "--samples-per-shard", "32"]
    assert shard_job.main(args) == 0
    client = boto3.client("s3", endpoint_url=endpoint)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="fer/synth/")["Contents"])
    assert keys[0] == "fer/synth/manifest.json" and len(keys) == 1 + 9 + 2 + 2
    # Catches a read that returns something other than what was written (the old check compared a read with
    # itself): every shard in the bucket is byte for byte the tar the sharder writes locally, and the val samples
    # read back are exactly the CSV's PublicTest rows with their labels.
    local_dir = _local_copy(synth_csv, 32)
    for key in keys[1:]:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert body == (local_dir / key.removeprefix("fer/synth/")).read_bytes(), key
    data_lines = synth_csv.read_text().splitlines()[1:]
    written = [(row, int(line.split(",")[0])) for row, line in enumerate(data_lines) if line.endswith(",PublicTest")]
    local = _read_all(str(local_dir), "val")
    assert _read_all(uri, "val", endpoint) == written == local and len(written) == 35

    # Interrupted upload: manifest and two shards never arrived. Re-running uploads exactly those.
    client.delete_object(Bucket=bucket, Key="fer/synth/manifest.json")
    client.delete_object(Bucket=bucket, Key="fer/synth/train-000003.tar")
    client.delete_object(Bucket=bucket, Key="fer/synth/test-000001.tar")
    from ferdist.data.sharding import write_shards
    from ferdist.data.sources import open_source

    result = write_shards(open_source(synth_csv), uri, samples_per_shard=32, endpoint_url=endpoint)
    assert (result.written, result.skipped) == (2, 11)
    again = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="fer/synth/")["Contents"])
    assert again == keys
    # Training reads from S3 with the same steps as locally.
    ds = open_dataset(uri, endpoint_url=endpoint)
    assert len(list(build_loader(ds, "train", DataConfig(loader_workers=2), batch_size=16, training=True))) == 17


_LOCAL: dict[int, Path] = {}


def _local_copy(synth_csv: Path, per_shard: int) -> Path:
    dest = synth_csv.parent / f"local-{per_shard}"
    if not dest.exists():
        assert (
            shard_job.main(["--source", str(synth_csv), "--dest", str(dest), "--samples-per-shard", str(per_shard)])
            == 0
        )
    return dest


def _shard_cli(
    *args: str, env_extra: dict[str, str] | None = None, drop: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "shard.py"), "--source", "synthetic", "--synthetic-rows", "70", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=120,
    )


def test_s3_missing_bucket(s3: tuple[str, str]) -> None:
    endpoint, _ = s3
    done = _shard_cli("--dest", "s3://no-such-bucket/x", "--endpoint-url", endpoint)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "bucket 'no-such-bucket' does not exist" in done.stderr and "aws s3 mb s3://no-such-bucket" in done.stderr


def test_s3_unreachable_endpoint(s3: tuple[str, str]) -> None:
    import socket

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = _shard_cli("--dest", "s3://bucket/x", "--endpoint-url", f"http://127.0.0.1:{port}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"cannot reach the S3 endpoint http://127.0.0.1:{port}" in done.stderr


def test_s3_missing_credentials(s3: tuple[str, str], tmp_path: Path) -> None:
    endpoint, bucket = s3
    done = _shard_cli(
        "--dest",
        f"s3://{bucket}/x",
        "--endpoint-url",
        endpoint,
        env_extra={
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_EC2_METADATA_DISABLED": "true",
        },
        drop=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"),
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no S3 credentials found" in done.stderr and "AWS_ACCESS_KEY_ID" in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not REAL_FER2013.exists(), reason="real FER2013 not present at ../shared/data/fer2013")
def test_real_fer2013_published_counts(tmp_path: Path) -> None:
    assert shard_job.main(["--source", str(REAL_FER2013), "--dest", str(tmp_path / "fer")]) == 0
    ds = open_dataset(str(tmp_path / "fer"))
    published = {
        "train": [3995, 436, 4097, 7215, 4830, 3171, 4965],
        "val": [467, 56, 496, 895, 653, 415, 607],
        "test": [491, 55, 528, 879, 594, 416, 626],
    }
    assert {k: v.class_counts for k, v in ds.manifest.splits.items()} == published
    assert ds.manifest.source.sha256 == "132ac495f9f910a29e77791545d7e9303619a38b1dd411cc585ce8ee5f6c2554"
    test_rows = _read_all(str(tmp_path / "fer"), "test")
    assert [r for r, _ in test_rows] == list(range(32298, 35887))  # PrivateTest rows, each once
    counts = [0] * 7
    for _, label in test_rows:
        counts[label] += 1
    assert counts == published["test"]


def test_a_bad_row_leaves_no_new_folder_behind(synth_csv: Path, tmp_path: Path) -> None:
    lines = synth_csv.read_text().splitlines()
    lines[7] = lines[7].replace(" ", " 12.5 ", 1)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    dest = tmp_path / "new" / "nested"
    assert shard_job.main(["--source", str(bad), "--dest", str(dest)]) == 2
    assert not (tmp_path / "new").exists()  # the README promises the destination untouched


def test_a_rerun_that_changes_nothing_never_removes_the_manifest(synth_csv: Path, tmp_path: Path) -> None:
    from ferdist.data.sharding import write_shards
    from ferdist.data.sources import open_source

    dest = tmp_path / "d"
    write_shards(open_source(synth_csv), str(dest), samples_per_shard=16, workers=1)
    manifest = dest / "manifest.json"
    before = manifest.stat()
    seen: list[bool] = []
    # Checked between every shard of the re-run: a reader starting then must always find the dataset.
    result = write_shards(open_source(synth_csv), str(dest), samples_per_shard=16, workers=1,
                          on_written=lambda _n: seen.append(manifest.exists()))  # fmt: skip
    assert (result.written, result.skipped) == (0, 24) and seen == [True] * 24
    after = manifest.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_ctrl_c_while_writing_is_one_sentence_and_a_rerun_finishes(synth_csv: Path, tmp_path: Path) -> None:
    from ferdist.data.sharding import write_shards
    from ferdist.data.sources import open_source
    from ferdist.errors import Interrupted

    dest, written = tmp_path / "d", []

    def ctrl_c_after_three(nbytes: int) -> None:
        written.append(nbytes)
        if len(written) == 3:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted) as info:
        write_shards(open_source(synth_csv), str(dest), samples_per_shard=16, workers=1, on_written=ctrl_c_after_three)
    assert str(info.value) == (
        f"interrupted while writing shards to {dest}; manifest.json is not written, so readers see no dataset there "
        "until you re-run the same command (shards already written are kept)"
    )
    assert not (dest / "manifest.json").exists() and len(list(dest.glob("*.tar"))) >= 3
    result = write_shards(open_source(synth_csv), str(dest), samples_per_shard=16, workers=1)
    assert result.written + result.skipped == 24 and result.skipped >= 3
    assert len(_read_all(str(dest), "train")) == 280


def default_signal_handling() -> None:
    """In a child before exec: SIGINT and SIGTERM as a terminal gives them, whatever the test runner ignores."""
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def test_ctrl_c_while_reading_the_source_exits_130_with_one_line(tmp_path: Path) -> None:
    import os
    import signal

    fifo = tmp_path / "fer2013.csv"
    os.mkfifo(fifo)  # the job blocks reading it until this test opens the other end: no timing guesswork
    # Started as `nohup pytest &` or by a CI runner, the suite ignores SIGINT and its children inherit that; the job
    # must get the default handling a terminal gives it. Ignoring SIGINT here, as such a start does, proves it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "shard.py"), "--source", str(fifo), "--dest",
                                str(tmp_path / "out")], stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_signal_handling)  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    with fifo.open("w"):
        job.send_signal(signal.SIGINT)
        _, err = job.communicate(timeout=60)
    assert job.returncode == 130
    assert err.strip() == f"stopped: interrupted while reading {fifo}; nothing was written"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--samples-per-shard", "0"), ("--samples-per-shard", "1e3"), ("--workers", "-1"), ("--val-fraction", "1.5"),
     ("--test-fraction", "abc"), ("--synthetic-rows", "2.5"), ("--seed", "-3")],
)  # fmt: skip
def test_numbers_on_the_command_line_are_read_strictly(
    flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        shard_job.main(["--source", "synthetic", "--dest", str(tmp_path / "s"), flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"error: argument {flag}: '{value}' is not a " in err[-1]
    assert not (tmp_path / "s").exists()


def test_the_command_a_missing_dataset_suggests_is_one_that_writes_it(tmp_path: Path) -> None:
    # The sentence is what a new user copies: it must run as written (jobs/shard.py refuses a call without --source).
    dest = tmp_path / "shards" / "synthetic"
    with pytest.raises(FerdistError) as info:
        open_dataset(str(dest))
    suggested = str(info.value).split("shard the data there first (", 1)[1].split(")", 1)[0]
    assert suggested == f"python jobs/shard.py --source synthetic --dest {dest}"
    assert shard_job.main(shlex.split(suggested)[2:]) == 0
    assert open_dataset(str(dest)).manifest.source.synthetic
    # A shard gone missing: the sentence gives the command that wrote the set, which re-writes that shard alone.
    lost = dest / "train-000003.tar"
    kept = lost.read_bytes()
    lost.unlink()
    with pytest.raises(FerdistError) as info:
        _read_all(str(dest), "train")
    suggested = str(info.value).split("re-create the dataset with ", 1)[1].split(" (it re-writes", 1)[0]
    assert suggested == f"python jobs/shard.py --source synthetic --dest {dest}"
    others = {p.name: p.stat().st_mtime_ns for p in dest.glob("*.tar")}
    assert shard_job.main(shlex.split(suggested)[2:]) == 0
    assert lost.read_bytes() == kept
    assert {p.name: p.stat().st_mtime_ns for p in dest.glob("*.tar") if p != lost} == others
    with pytest.raises(FerdistError, match=r"\(python jobs/shard\.py --source FER2013\.CSV --dest \S*fer2013, "
                                           r"FER2013\.CSV being your fer2013\.csv"):  # fmt: skip
        open_dataset(str(tmp_path / "fer2013"))


def test_a_lost_shard_of_a_carved_image_folder_is_rewritten_by_the_command_suggested(tmp_path: Path) -> None:
    """Catches a manifest that forgets the options which carved val and test out of an image folder's train/: the
    suggested command would then re-shard with the defaults, moving faces between splits (here, test into train)."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "faces"
    for c, cls in enumerate(("happy", "sad")):
        (folder / "train" / cls).mkdir(parents=True)
        for i in range(30):
            Image.fromarray(np.full((48, 48), c * 100 + i, np.uint8)).save(folder / "train" / cls / f"{i:02d}.png")
    dest = tmp_path / "shards"
    carved = ["--val-fraction", "0.2", "--test-fraction", "0.3", "--seed", "7", "--samples-per-shard", "8"]
    assert shard_job.main(["--source", str(folder), "--dest", str(dest), *carved]) == 0
    written = {p.name: p.read_bytes() for p in dest.iterdir()}
    (dest / "test-000001.tar").unlink()
    with pytest.raises(FerdistError) as info:
        _read_all(str(dest), "test")
    suggested = str(info.value).split("re-create the dataset with ", 1)[1].split(", PATH being", 1)[0]
    assert suggested == (f"python jobs/shard.py --source PATH/faces --dest {dest} --seed 7 --test-fraction 0.3 "
                         "--val-fraction 0.2 --samples-per-shard 8")  # fmt: skip
    assert shard_job.main(shlex.split(suggested.replace("PATH/faces", str(folder)))[2:]) == 0
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == written
