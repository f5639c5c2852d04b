"""FER2013 readers: every layout reads to the same faces, and every kind of bad input names file and line."""

from __future__ import annotations

import gzip
import io
import lzma
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferdist.constants import FER_CLASSES
from ferdist.data.sources import ImageFolder, files_digest, open_source, stratified_split
from ferdist.errors import FerdistError

HEADER = "emotion,pixels,Usage"


def _row(label: int = 3, value: int = 7, usage: str = "Training", count: int = 2304) -> str:
    return f"{label},{' '.join([str(value)] * count)},{usage}"


def _csv(tmp_path: Path, *rows: str, header: str = HEADER, name: str = "f.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_kaggle_csv_splits_labels_and_pixels(tmp_path: Path) -> None:
    path = _csv(tmp_path, _row(0, 1, "Training"), _row(6, 255, "PrivateTest"), _row(3, 0, "PublicTest"))
    src = open_source(path)
    assert {k: v.tolist() for k, v in src.splits.items()} == {"train": [0], "val": [2], "test": [1]}
    batch = src.load([1, 2])
    assert batch.labels.tolist() == [6, 3]
    assert batch.images.shape == (2, 48, 48) and batch.images.dtype == np.uint8
    assert (batch.images[0] == 255).all() and (batch.images[1] == 0).all()


def test_every_compression_reads_the_same(synth_csv: Path, tmp_path: Path) -> None:
    text = synth_csv.read_bytes()
    (tmp_path / "a.csv.gz").write_bytes(gzip.compress(text))
    (tmp_path / "a.csv.xz").write_bytes(lzma.compress(text))
    (tmp_path / "crlf.csv").write_bytes(text.replace(b"\n", b"\r\n"))
    with tarfile.open(tmp_path / "fer2013.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("fer2013/fer2013.csv")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    reference = open_source(synth_csv)
    ref = reference.load(np.arange(20))
    for name in ("a.csv.gz", "a.csv.xz", "crlf.csv", "fer2013.tar.gz"):
        src = open_source(tmp_path / name)
        got = src.load(np.arange(20))
        assert {k: v.tolist() for k, v in src.splits.items()} == {k: v.tolist() for k, v in reference.splits.items()}
        assert (got.images == ref.images).all() and (got.labels == ref.labels).all(), name


def test_header_variants_icml_layout(tmp_path: Path) -> None:
    # icml_face_data.csv from the same Kaggle challenge: other column order, spaces after commas.
    path = _csv(tmp_path, f"4, Training, {' '.join(['9'] * 2304)}", header="emotion, Usage, pixels")
    batch = open_source(path).load([0])
    assert batch.labels.tolist() == [4] and (batch.images == 9).all()


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        ([_row(), _row(count=2303)], HEADER, "line 3: has 2303 pixel values, expected 2304"),
        ([_row(), _row(value=256)], HEADER, "line 3: pixel 1 is 256, outside 0-255"),
        ([_row(value=-1)], HEADER, "line 2: pixel 1 is '-1', not a whole number in 0-255"),
        ([_row(), _row(), _row(label=7)], HEADER, "line 4: emotion 7 is outside 0-6"),
        ([_row(label=-2)], HEADER, "line 2: emotion '-2' is not a whole number in 0-6"),
        ([_row(), _row(usage="Validation")], HEADER, "line 3: unknown Usage 'Validation'"),
        ([_row()], "emotion,pixels", "line 1: missing column(s) usage"),
        ([_row() + ",Training"], HEADER + ",Usage", "line 1: the header names usage 2 times; keep one column"),
        ([_row() + ",3"], HEADER + ",emotion", "line 1: the header names emotion 2 times"),  # the first was used
        ([], HEADER, "has a header but no rows"),
    ],
)
def test_bad_csv_rows_name_file_and_line(tmp_path: Path, rows: list[str], header: str, message: str) -> None:
    path = _csv(tmp_path, *rows, header=header)
    with pytest.raises(FerdistError, match=re.escape(message)) as info:
        src = open_source(path)
        src.load(np.concatenate(list(src.splits.values())))
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(FerdistError, match=r"empty\.csv: the file is empty"):
        open_source(tmp_path / "empty.csv")


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(FerdistError, match="no such file or folder"):
        open_source(tmp_path / "nope.csv")


def _face_folder(root: Path, split: str, cls: str, n: int, *, start: int = 0, size: int = 48) -> None:
    folder = root / split / cls
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size, size), start + i, np.uint8)).save(folder / f"{i:03d}.png")


def test_image_folder_case_insensitive_with_stratified_val(tmp_path: Path) -> None:
    for c, cls in enumerate(FER_CLASSES):
        _face_folder(tmp_path, "train", cls.upper() if c % 2 else cls.lower(), 10, start=c * 10)
        _face_folder(tmp_path, "test", cls.lower(), 2, start=200 + c)
    (tmp_path / "train" / "angry" / ".DS_Store").write_bytes(b"junk")  # hidden files are ignored
    src = open_source(tmp_path, val_fraction=0.2, seed=0)
    assert isinstance(src, ImageFolder)
    sizes = {k: v.size for k, v in src.splits.items()}
    assert sizes == {"train": 56, "val": 14, "test": 14}
    val = src.load(src.splits["val"])
    assert np.bincount(val.labels, minlength=7).tolist() == [2] * 7  # stratified: 20 % of each class
    assert not set(src.splits["val"]) & set(src.splits["train"])
    # Pixel values encode class and index, so every loaded face can be checked against its label.
    assert all(int(img[0, 0]) // 10 == lab for img, lab in zip(val.images, val.labels, strict=True))
    again = open_source(tmp_path, val_fraction=0.2, seed=0)
    assert again.splits["val"].tolist() == src.splits["val"].tolist()


def test_image_folder_resizes_other_sizes(tmp_path: Path) -> None:
    _face_folder(tmp_path, "train", "sad", 1, size=96, start=50)
    _face_folder(tmp_path, "test", "sad", 1)
    batch = open_source(tmp_path, val_fraction=0.0).load([0])
    assert batch.images.shape == (1, 48, 48) and (batch.images == 50).all() and batch.labels.tolist() == [4]


def test_image_folder_non_image_is_named(tmp_path: Path) -> None:
    _face_folder(tmp_path, "train", "fear", 2)
    _face_folder(tmp_path, "test", "fear", 1)
    bad = tmp_path / "train" / "fear" / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(FerdistError, match=re.escape(f"{bad}: not an image file")):
        open_source(tmp_path)


def test_image_folder_corrupt_image_is_named(tmp_path: Path) -> None:
    _face_folder(tmp_path, "train", "fear", 2)
    _face_folder(tmp_path, "test", "fear", 1)
    bad = tmp_path / "train" / "fear" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    src = open_source(tmp_path, val_fraction=0.0)
    with pytest.raises(FerdistError, match=re.escape(f"{bad}: not a readable image")):
        src.load(src.splits["train"])


def test_image_folder_unknown_class(tmp_path: Path) -> None:
    _face_folder(tmp_path, "train", "contempt", 1)
    _face_folder(tmp_path, "test", "fear", 1)
    with pytest.raises(FerdistError, match="unknown class folder 'contempt'; expected one of Angry"):
        open_source(tmp_path)


def test_stratified_split_is_disjoint_covering_and_seeded() -> None:
    rows = np.arange(700)
    labels = rows % 7
    train, val = stratified_split(rows, labels, 0.1, seed=3)
    assert sorted(np.concatenate([train, val]).tolist()) == rows.tolist()
    assert np.bincount(labels[val], minlength=7).tolist() == [10] * 7
    assert stratified_split(rows, labels, 0.1, seed=3)[1].tolist() == val.tolist()
    assert stratified_split(rows, labels, 0.1, seed=4)[1].tolist() != val.tolist()


# ---------------------------------------------------------------- bad data, round 2: every number read from text


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("12.5", "line 2: pixel 5 is '12.5', not a whole number in 0-255"),
        ("1e2", "line 2: pixel 5 is '1e2', not a whole number in 0-255"),
        ("abc", "line 2: pixel 5 is 'abc', not a whole number in 0-255"),
        ("4294967396", "line 2: pixel 5 is 4294967396, outside 0-255"),  # wrapped to 100 by an int32 parser
        ("0x10", "line 2: pixel 5 is '0x10', not a whole number in 0-255"),
        ("+7", "line 2: pixel 5 is '+7', not a whole number in 0-255"),
        ("\u0667", "line 2: pixel 5 is '\\u0667', not a whole number in 0-255"),  # an Arabic-Indic digit
    ],
)
def test_a_pixel_that_is_not_a_whole_number_names_file_line_and_value(tmp_path: Path, bad: str, message: str) -> None:
    values = ["7"] * 2304
    values[4] = bad
    path = tmp_path / "f.csv"
    path.write_bytes(f"{HEADER}\n3,{' '.join(values)},Training\n".encode())
    with pytest.raises(FerdistError, match=re.escape(message)) as info:
        open_source(path).load([0])
    assert str(info.value) == f"{path}: {message}; fix or remove that row and re-run"


@pytest.mark.parametrize("label", ["3.0", "+3", "0_3", " ", "3 3", "\u0663"])
def test_an_emotion_that_is_not_a_plain_whole_number_is_refused(tmp_path: Path, label: str) -> None:
    path = tmp_path / "f.csv"
    path.write_bytes(f"{HEADER}\n{label},{' '.join(['7'] * 2304)},Training\n".encode())
    with pytest.raises(FerdistError, match=r"f\.csv: line 2: emotion '.*' is not a whole number in 0-6"):
        open_source(path).load([0])


def test_pixels_with_leading_zeros_or_tabs_are_still_exact(tmp_path: Path) -> None:
    values = [str(i % 256) for i in range(2304)]
    values[0], values[1] = "007", "0255"
    path = tmp_path / "f.csv"
    path.write_bytes(f"{HEADER}\n3,{chr(9).join(values)},Training\n".encode())
    face = open_source(path).load([0]).images[0].ravel()
    assert face[:3].tolist() == [7, 255, 2] and face.tolist()[2:] == [i % 256 for i in range(2, 2304)]


def test_excel_csv_utf8_and_utf16_read_like_the_plain_file(synth_csv: Path, tmp_path: Path) -> None:
    text = synth_csv.read_text()
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "utf16.csv").write_bytes(text.encode("utf-16"))  # with its own byte-order mark
    ref = open_source(synth_csv)
    for name in ("bom.csv", "utf16.csv"):
        src = open_source(tmp_path / name)
        assert {k: v.tolist() for k, v in src.splits.items()} == {k: v.tolist() for k, v in ref.splits.items()}
        assert (src.load(np.arange(30)).images == ref.load(np.arange(30)).images).all()


def test_a_header_that_is_not_comma_separated_says_so(tmp_path: Path) -> None:
    path = tmp_path / "semi.csv"
    path.write_text(f"emotion;pixels;Usage\n3;{' '.join(['7'] * 2304)};Training\n")
    with pytest.raises(FerdistError) as info:
        open_source(path)
    assert str(info.value) == (
        f"{path}: line 1: missing column(s) emotion, pixels, usage in the header 'emotion;pixels;Usage' (its fields "
        "are separated by ';'); expected the Kaggle layout emotion,pixels,Usage, comma-separated"
    )


def test_a_16_bit_png_is_scaled_not_clipped_to_white(tmp_path: Path) -> None:
    ramp = (np.arange(48 * 48, dtype=np.uint32).reshape(48, 48) * 28).astype(np.uint16)  # 0 .. 64484
    for split in ("train", "test"):
        folder = tmp_path / split / "happy"
        folder.mkdir(parents=True)
        Image.fromarray(ramp).save(folder / "deep.png")
    assert Image.open(tmp_path / "train" / "happy" / "deep.png").mode.startswith("I")
    src = open_source(tmp_path, val_fraction=0.0)
    face = src.load(src.splits["train"]).images[0].astype(int)
    assert np.abs(face - np.rint(ramp / 257.0)).max() <= 1  # the same picture in 8 bits
    assert face.min() == 0 and face.max() == 251


def test_a_float_image_outside_any_range_is_named(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / split / "sad").mkdir(parents=True)
    Image.fromarray(np.full((48, 48), 300.5, np.float32)).save(tmp_path / "train" / "sad" / "f.tif")
    Image.fromarray(np.full((48, 48), 0.5, np.float32)).save(tmp_path / "test" / "sad" / "half.tif")
    src = open_source(tmp_path, val_fraction=0.0)
    assert (src.load(src.splits["test"]).images == 128).all()  # floats in 0-1 are scaled
    with pytest.raises(FerdistError, match=r"f\.tif has floating-point pixels from 300\.5 to 300\.5, outside 0-1 and"):
        src.load(src.splits["train"])


def test_an_image_folder_without_test_is_refused_with_the_fix(tmp_path: Path) -> None:
    _face_folder(tmp_path, "train", "fear", 20)
    with pytest.raises(FerdistError) as info:
        open_source(tmp_path)
    assert str(info.value) == (
        f"{tmp_path}: no test/ folder (found train/); put the held-out faces in test/<class>/, or pass "
        "--test-fraction 0.1 to hold out a stratified slice of train as the test split"
    )
    src = open_source(tmp_path, val_fraction=0.1, test_fraction=0.2)
    sizes = {k: v.size for k, v in src.splits.items()}
    assert sizes == {"train": 14, "val": 2, "test": 4}
    assert sorted(np.concatenate(list(src.splits.values())).tolist()) == list(range(20))


def test_split_folders_under_other_names(tmp_path: Path) -> None:
    _face_folder(tmp_path, "Training", "fear", 3)
    _face_folder(tmp_path, "testing", "happy", 2, start=100)
    _face_folder(tmp_path, "validation", "sad", 1, start=200)
    src = open_source(tmp_path)
    assert {k: v.size for k, v in src.splits.items()} == {"train": 3, "val": 1, "test": 2}
    assert (src.load(src.splits["test"]).labels == 3).all()
    _face_folder(tmp_path, "test", "happy", 1)
    with pytest.raises(FerdistError, match="both test/ and testing/ hold the test split; merge them into one"):
        open_source(tmp_path)


def test_an_unknown_split_folder_is_named(tmp_path: Path) -> None:
    _face_folder(tmp_path, "train", "fear", 3)
    _face_folder(tmp_path, "test", "fear", 1)
    _face_folder(tmp_path, "holdout", "fear", 1)
    with pytest.raises(FerdistError, match=re.escape(f"{tmp_path / 'holdout'}: unknown split folder 'holdout'")):
        open_source(tmp_path)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_fractions_outside_0_to_1_are_refused(tmp_path: Path, fraction: float) -> None:
    _face_folder(tmp_path, "train", "fear", 3)
    with pytest.raises(FerdistError, match="is not a fraction from 0 up to 1"):
        open_source(tmp_path, val_fraction=fraction)


def test_an_unreadable_image_file_is_named(tmp_path: Path) -> None:
    _face_folder(tmp_path, "train", "fear", 2)
    _face_folder(tmp_path, "test", "fear", 1)
    dangling = tmp_path / "train" / "fear" / "moved.png"
    dangling.symlink_to(tmp_path / "elsewhere.png")  # a link whose target was moved away
    with pytest.raises(FerdistError, match=re.escape(f"{dangling}: cannot be read (No such file or directory)")):
        open_source(tmp_path)


def test_a_file_name_that_is_not_utf8_is_read_and_named(tmp_path: Path) -> None:
    """Catches a face whose file name is not UTF-8 (a Latin-1 `café.png` from an old archive) stopping the shard
    job with a UnicodeEncodeError from the folder's digest; a UTF-8 name's digest stays what it was."""
    import hashlib
    import os

    _face_folder(tmp_path, "train", "happy", 2)
    _face_folder(tmp_path, "test", "happy", 1)
    latin = os.fsdecode(bytes(tmp_path / "train" / "happy") + "/caf\xe9.png".encode("latin-1"))
    Image.fromarray(np.full((48, 48), 99, np.uint8)).save(latin)
    src = open_source(tmp_path, val_fraction=0.0)
    assert sorted(src.load(src.splits["train"]).images[:, 0, 0].tolist()) == [0, 1, 99]
    utf8 = tmp_path / "utf8"
    _face_folder(utf8, "train", "happy", 1)
    (utf8 / "train" / "happy" / "000.png").rename(face := utf8 / "train" / "happy" / "sourire-é.png")
    expected = hashlib.sha256("train/happy/sourire-é.png".encode() + b"\0" + face.read_bytes())
    assert files_digest(utf8, [face]).hexdigest() == expected.hexdigest()


def test_a_fraction_that_holds_out_no_face_is_refused(tmp_path: Path) -> None:
    """Catches a small folder sharded with the default --val-fraction 0.1 getting no val split at all (4 faces a
    class round to 0), silently: fine-tuning then had nothing to pick its epoch on."""
    _face_folder(tmp_path, "train", "happy", 4)
    _face_folder(tmp_path, "test", "happy", 2)
    with pytest.raises(FerdistError, match=re.escape(f"{tmp_path}: --val-fraction 0.1 holds out no face of train/ "
                                                     "(every class rounds to 0 faces); raise it, add a val/ folder")):
        open_source(tmp_path, val_fraction=0.1)
    assert {k: v.size for k, v in open_source(tmp_path, val_fraction=0.25).splits.items()} == {
        "train": 3, "val": 1, "test": 2}  # fmt: skip
    assert "val" not in open_source(tmp_path, val_fraction=0.0).splits  # asked for: none
