"""The shard format: PNG bytes any decoder reads, deterministic tars, fast path equal to the careful path."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ferdist.constants import FER_CLASSES
from ferdist.data.shards import (
    _decode_fixed_layout,
    build_shard,
    decode_png,
    decode_shard,
    encode_pngs,
    iter_shard,
    manifest_from_json,
    sha256_hex,
)
from ferdist.errors import FerdistError


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
    # Without a manifest hash (a shard from elsewhere) the careful path keeps every sample it can check.
    shard = decode_shard(bytes(data), shard="x.tar", sha256=None, on_bad=lambda s, r: bad.append((s, r)))
    assert shard.rows.tolist() == [0, 1, 3, 4]
    assert (shard.images == faces[[0, 1, 3, 4]]).all()
    assert len(bad) == 1 and bad[0][0] == "x.tar" and "sample 000002" in bad[0][1]
    # Against the manifest's hash, changed bytes yield nothing: one report for the whole shard.
    bad.clear()
    sha = sha256_hex(build_shard(rows, labels, encode_pngs(faces)))
    shard = decode_shard(bytes(data), shard="x.tar", sha256=sha, on_bad=lambda s, r: bad.append((s, r)))
    assert len(shard) == 0 and len(bad) == 1 and "do not match the manifest's sha256" in bad[0][1]


def test_a_changed_label_is_never_served() -> None:
    faces, rows, labels = _faces(4), [0, 1, 2, 3], [1, 2, 3, 4]
    good = build_shard(rows, labels, encode_pngs(faces))
    data = bytearray(good)
    data[3 * 4096 - 512] = ord("6")  # sample 0's .cls payload: every PNG stays valid
    assert bytes(data) != good and data.count(b"6") > good.count(b"6")
    bad: list[str] = []
    shard = decode_shard(bytes(data), shard="x.tar", sha256=sha256_hex(good), on_bad=lambda s, r: bad.append(r))
    assert len(shard) == 0 and len(bad) == 1


@pytest.mark.parametrize(
    ("cls", "key", "reason"),
    [(b"+3", "000001", "label '+3'"), (b" 3\n", "000001", "label"), (b"0_3", "000001", "label"),
     (b"3", "1_000", "key is not a row number")],
)  # fmt: skip
def test_labels_and_keys_are_plain_digits(cls: bytes, key: str, reason: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in ((f"{key}.png", encode_pngs(_faces(1))[0]), (f"{key}.cls", cls)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    bad: list[str] = []
    shard = decode_shard(buf.getvalue(), shard="x.tar", sha256=None, on_bad=lambda s, r: bad.append(r))
    assert len(shard) == 0 and len(bad) == 1 and reason in bad[0]


def test_rows_past_a_million_keep_every_digit() -> None:
    # Keys are zero-padded to 6 digits; row 1,234,567 has 7. The fast reader used to read it as 123456.
    faces, rows, labels = _faces(3), [999_999, 1_000_000, 1_234_567], [0, 1, 2]
    data = build_shard(rows, labels, encode_pngs(faces))
    shard = decode_shard(data, shard="big.tar", sha256=sha256_hex(data), on_bad=lambda s, r: pytest.fail(r))
    assert shard.rows.tolist() == rows and shard.labels.tolist() == labels and (shard.images == faces).all()


def test_truncated_shard_yields_what_precedes_the_damage() -> None:
    faces = _faces(6)
    data = build_shard(list(range(6)), [0] * 6, encode_pngs(faces))
    bad: list[str] = []
    shard = decode_shard(data[: 3 * 4096 + 700], shard="t.tar", sha256=None, on_bad=lambda s, r: bad.append(r))
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


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda m: m["splits"]["train"].update(samples="280"), "split train: samples is '280'"),
        (lambda m: m["splits"]["train"].update(samples=281), "class_counts add up to 280, samples says 281"),
        (lambda m: m["splits"]["val"]["class_counts"].append(0), "are not 7 counts"),
        (lambda m: m["splits"]["val"]["shards"][0].update(name="../../etc/passwd.tar"), "not a plain file name"),
        (lambda m: m["splits"]["val"]["shards"][0].update(samples=True), "has samples True"),
        (lambda m: m["splits"]["val"]["shards"][0].update(sha256="abc"), "has no valid sha256"),
        (lambda m: m.update(classes=list(reversed(m["classes"]))), "are not FER2013's"),
        (lambda m: m["splits"]["test"]["shards"].pop(), "its shards hold"),
        (lambda m: m["source"].update(split_options={"seed": "7; rm -rf ~"}), "source.split_options {'seed': '7;"),
        (lambda m: m["source"].update(split_options={"dest": 1}), "are not val_fraction, test_fraction, seed with"),
    ],
)
def test_manifest_numbers_and_names_must_add_up(synth_shards: Path, change: Any, problem: str) -> None:
    raw = json.loads((synth_shards / "manifest.json").read_bytes())
    change(raw)
    with pytest.raises(FerdistError, match=re.escape(problem)) as info:
        manifest_from_json(json.dumps(raw).encode(), uri="m.json")
    assert str(info.value).startswith("'m.json' is a damaged manifest (") and "re-run jobs/shard.py" in str(info.value)


def test_the_plain_webdataset_snippet_in_shards_readme_reads_grey_faces_without_warnings(synth_shards: Path) -> None:
    import warnings

    text = (Path(__file__).resolve().parents[2] / "shards" / "README.md").read_text()
    snippet = text.split("## Reading the shards without ferdist", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    count = len(list(synth_shards.glob("train-*.tar")))
    snippet = snippet.replace('"shards/fer2013/train-{000000..000448}.tar"',
                              repr(f"{synth_shards}/train-{{000000..{count - 1:06d}}}.tar"))  # fmt: skip
    snippet = snippet.replace("    ...  #", "    seen.append((face, label, key))  #")
    seen: list[tuple[Any, Any, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # webdataset's shardshuffle warning would fail here
        exec(compile(snippet, "shards/README.md", "exec"), {"seen": seen})
    manifest = json.loads((synth_shards / "manifest.json").read_bytes())
    assert len(seen) == manifest["splits"]["train"]["samples"] == 280
    face, label, key = seen[0]
    assert isinstance(face, np.ndarray) and face.shape == (48, 48) and face.dtype == np.uint8
    assert isinstance(label, int) and 0 <= label < 7 and key.isdigit()
    assert np.bincount([lab for _, lab, _ in seen], minlength=7).tolist() == manifest["splits"]["train"]["class_counts"]
