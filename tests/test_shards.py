"""The shard format: PNG bytes any decoder reads, deterministic tars, fast path equal to the careful path."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ferdist.constants import FER_CLASSES
from ferdist.errors import FerdistError
from ferdist.shards import (
    _decode_fixed_layout,
    build_shard,
    decode_png,
    decode_shard,
    encode_pngs,
    iter_shard,
    manifest_from_json,
    sha256_hex,
)


def _faces(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 48), dtype=np.uint8)


@pytest.mark.parametrize("level", [0, 6])
def test_png_roundtrip_through_pillow_and_ours(level: int) -> None:
    faces = _faces(5)
    for face, png in zip(faces, encode_pngs(faces, level=level), strict=True):
        assert (np.asarray(Image.open(io.BytesIO(png))) == face).all()
        assert (decode_png(png) == face).all()


def test_decode_png_written_by_pillow_rgb() -> None:
    # A PNG from another tool (RGB, libpng filters) goes through the general decoder and is converted to gray.
    rgb = np.zeros((48, 48, 3), np.uint8)
    rgb[..., 1] = 200
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    gray = decode_png(buf.getvalue())
    assert gray.shape == (48, 48) and abs(int(gray[0, 0]) - round(0.587 * 200)) <= 2


def test_decode_png_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not a readable image"):
        decode_png(b"definitely not a png")
    png = encode_pngs(_faces(1))[0]
    with pytest.raises(ValueError):
        decode_png(png[:60])


def test_build_shard_is_deterministic_and_readable_by_webdataset(tmp_path: Path) -> None:
    faces, rows, labels = _faces(4), [10, 11, 12, 35886], [0, 3, 6, 1]
    data = build_shard(rows, labels, encode_pngs(faces))
    assert data == build_shard(rows, labels, encode_pngs(faces))
    # WebDataset itself (not our reader) sees the same keys and labels.
    (tmp_path / "s.tar").write_bytes(data)
    samples = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["000010", "000011", "000012", "035886"]
    assert [int(s["cls"]) for s in samples] == labels
    assert (np.asarray(Image.open(io.BytesIO(samples[3]["png"]))) == faces[3]).all()


def test_fast_path_equals_careful_path() -> None:
    faces, rows, labels = _faces(37, seed=2), list(range(100, 137)), [i % 7 for i in range(37)]
    data = build_shard(rows, labels, encode_pngs(faces))
    fast = _decode_fixed_layout(data)
    assert fast is not None
    careful = list(iter_shard(data, shard="s", on_bad=lambda s, r: pytest.fail(r)))
    assert fast.rows.tolist() == [s.row for s in careful] == rows
    assert fast.labels.tolist() == [s.label for s in careful] == labels
    assert (fast.images == np.stack([s.image for s in careful])).all() and (fast.images == faces).all()
    # A compressed shard (not the fixed layout) decodes to the same arrays through the careful path.
    slow = decode_shard(
        build_shard(rows, labels, encode_pngs(faces, level=6)),
        shard="s",
        sha256=None,
        on_bad=lambda s, r: pytest.fail(r),
    )
    assert (slow.images == faces).all() and slow.labels.tolist() == labels


def test_corrupt_sample_is_skipped_and_reported() -> None:
    faces, rows, labels = _faces(5), [0, 1, 2, 3, 4], [1, 2, 3, 4, 5]
    data = bytearray(build_shard(rows, labels, encode_pngs(faces)))
    # Flip pixel bytes inside sample 2's PNG: the PNG's zlib checksum no longer matches.
    offset = 2 * 4096 + 512 + 100
    data[offset : offset + 8] = bytes(8)
    bad: list[tuple[str, str]] = []
    shard = decode_shard(
        bytes(data),
        shard="x.tar",
        sha256=sha256_hex(build_shard(rows, labels, encode_pngs(faces))),
        on_bad=lambda s, r: bad.append((s, r)),
    )
    assert shard.rows.tolist() == [0, 1, 3, 4]
    assert (shard.images == faces[[0, 1, 3, 4]]).all()
    assert len(bad) == 1 and bad[0][0] == "x.tar" and "sample 000002" in bad[0][1]


def test_truncated_shard_yields_what_precedes_the_damage() -> None:
    faces = _faces(6)
    data = build_shard(list(range(6)), [0] * 6, encode_pngs(faces))
    bad: list[str] = []
    shard = decode_shard(data[: 3 * 4096 + 700], shard="t.tar", sha256="0" * 64, on_bad=lambda s, r: bad.append(r))
    assert shard.rows.tolist() == [0, 1, 2]
    assert len(bad) == 1 and "truncated" in bad[0]


def test_tar_from_another_writer_reads(tmp_path: Path) -> None:
    # GNU/PAX tar headers (what `tar` or wds.TarWriter may produce) fall back to the tarfile module.
    faces = _faces(3)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, png in enumerate(encode_pngs(faces, level=9)):
            for name, payload in ((f"{i:06d}.png", png), (f"{i:06d}.cls", b"5")):
                info = tarfile.TarInfo(name)
                info.size, info.pax_headers = len(payload), {"comment": "x" * 200}
                tar.addfile(info, io.BytesIO(payload))
    shard = decode_shard(buf.getvalue(), shard="p", sha256=None, on_bad=lambda s, r: pytest.fail(r))
    assert shard.labels.tolist() == [5, 5, 5] and (shard.images == faces).all()


def test_manifest_rejects_other_format_or_version(synth_shards: Path) -> None:
    raw = json.loads((synth_shards / "manifest.json").read_bytes())
    assert raw["classes"] == list(FER_CLASSES)
    m = manifest_from_json(json.dumps(raw).encode(), uri="m")
    assert m.split("train").samples == 280 and sum(m.split("train").class_counts) == 280
    raw["format_version"] = 99
    with pytest.raises(FerdistError, match="shard format version 99, this ferdist reads version 1; re-shard"):
        manifest_from_json(json.dumps(raw).encode(), uri="m")
    with pytest.raises(FerdistError, match="is not a ferdist shard manifest"):
        manifest_from_json(b'{"format": "something-else"}', uri="m")
    with pytest.raises(FerdistError, match="invalid JSON"):
        manifest_from_json(b"{", uri="m")
