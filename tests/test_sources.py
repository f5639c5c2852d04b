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
from ferdist.errors import FerdistError
from ferdist.sources import ImageFolder, open_source, stratified_split

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
        ([_row(), _row(value=256)], HEADER, "line 3: pixel value 256 is outside 0-255"),
        ([_row(value=-1)], HEADER, "line 2: pixel value -1 is outside 0-255"),
        ([_row(), _row(), _row(label=7)], HEADER, "line 4: emotion 7 is outside 0-6"),
        ([_row(label=-2)], HEADER, "line 2: emotion -2 is outside 0-6"),
        ([_row(), _row(usage="Validation")], HEADER, "line 3: unknown Usage 'Validation'"),
        ([_row()], "emotion,pixels", "line 1: missing column(s) usage"),
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
    batch = open_source(tmp_path, val_fraction=0.0).load([0])
    assert batch.images.shape == (1, 48, 48) and (batch.images == 50).all() and batch.labels.tolist() == [4]


def test_image_folder_non_image_is_named(tmp_path: Path) -> None:
    _face_folder(tmp_path, "train", "fear", 2)
    bad = tmp_path / "train" / "fear" / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(FerdistError, match=re.escape(f"{bad}: not an image file")):
        open_source(tmp_path)


def test_image_folder_corrupt_image_is_named(tmp_path: Path) -> None:
    _face_folder(tmp_path, "train", "fear", 2)
    bad = tmp_path / "train" / "fear" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    src = open_source(tmp_path, val_fraction=0.0)
    with pytest.raises(FerdistError, match=re.escape(f"{bad}: not a readable image")):
        src.load(src.splits["train"])


def test_image_folder_unknown_class(tmp_path: Path) -> None:
    _face_folder(tmp_path, "train", "contempt", 1)
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
