"""Readers for the two layouts FER2013 is distributed in, validated row by row.

* The Kaggle CSV (``emotion,pixels,Usage``; Goodfellow et al. 2013), plain or as ``.gz``, ``.xz``, or the Kaggle
  ``fer2013.tar.gz`` holding ``fer2013/fer2013.csv``. Usage maps Training→train, PublicTest→val, PrivateTest→test.
* Image folders (``train/<class>/*.png|jpg``, ``test/<class>/…``, class names case-insensitive, e.g. the Kaggle
  "msambare/fer2013" version). ``val/`` is used when present; otherwise a seeded, stratified slice of train.
* Unlabeled image folders (``--unlabeled``): every image under the folder, in any sub-folders, as face crops for MAE
  pretraining, centre-cropped to a square and resized to 48x48 grey; they form the ``unlabeled`` split only.

A reader does the cheap structural checks up front (header, Usage, folder names) and returns a `Source`; the
per-row work (parsing 2,304 pixels, decoding a file) happens in `Source.load`, which the shard writer runs in
worker processes. Every problem is a `FerdistError` naming the file and line (CSV lines count the header as line 1).
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import shutil
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ferdist.constants import FACE_PIXELS, FACE_SIDE, FER_CLASSES, KAGGLE_USAGE_TO_SPLIT, NUM_CLASSES, UNLABELED_SPLIT
from ferdist.data.images import grey_pixels
from ferdist.data.shards import SourceInfo
from ferdist.errors import FerdistError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm"}
KAGGLE_COLUMNS = ("emotion", "pixels", "usage")


@dataclass(frozen=True)
class Batch:
    """Validated faces from a source: ``images`` uint8[n, 48, 48] and ``labels`` int64[n] for ``rows``."""

    rows: np.ndarray
    images: np.ndarray
    labels: np.ndarray


class Source:
    """A validated FER source: which rows go to which split, and how to load a set of rows."""

    info: SourceInfo
    splits: dict[str, np.ndarray]
    """Split name → sorted source row indices."""

    def load(self, rows: Sequence[int]) -> Batch:
        raise NotImplementedError


# --------------------------------------------------------------------------- Kaggle CSV


def read_csv_bytes(path: Path) -> bytes:
    """The CSV text of a plain, .gz, .xz or Kaggle .tar.gz FER2013 file."""
    name = path.name.lower()
    try:
        if name.endswith((".tar.gz", ".tgz", ".tar")):
            with tarfile.open(path) as tar:
                members = [m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(".csv")]
                preferred = [m for m in members if m.name.lower().endswith("fer2013.csv")] or members
                if not preferred:
                    raise FerdistError(f"{path}: the archive holds no .csv file; expected fer2013/fer2013.csv")
                f = tar.extractfile(preferred[0])
                assert f is not None
                return f.read()
        if name.endswith(".gz"):
            return gzip.decompress(path.read_bytes())
        if name.endswith(".xz"):
            xz = shutil.which("xz")
            if xz:
                # xz's own multi-threaded decoder is ~2x faster than the lzma module on multi-block files.
                done = subprocess.run([xz, "-dc", "-T0", str(path)], capture_output=True, check=False)
                if done.returncode == 0:
                    return done.stdout
                raise FerdistError(f"{path}: not a valid .xz file ({done.stderr.decode().strip()})")
            return lzma.decompress(path.read_bytes())
        return path.read_bytes()
    except FileNotFoundError:
        raise FerdistError(
            f"{path}: no such file; pass --source a fer2013.csv[.gz|.xz], fer2013.tar.gz or folder"
        ) from None
    except (OSError, EOFError, lzma.LZMAError, tarfile.TarError) as exn:
        raise FerdistError(f"{path}: cannot be read as {name.rsplit('.', 1)[-1]} ({exn})") from None


class KaggleCsv(Source):
    """The Kaggle FER2013 CSV, held in memory as lines (301 MB for the full set)."""

    def __init__(self, text: bytes, *, name: str, info: SourceInfo) -> None:
        self.name, self.info = name, info
        text = _as_utf8(text, name=name)
        if b"\r" in text:
            text = text.replace(b"\r\n", b"\n")
        lines = text.split(b"\n")
        while lines and not lines[-1].strip():
            lines.pop()
        if not lines:
            raise FerdistError(f"{name}: the file is empty; expected the Kaggle header emotion,pixels,Usage and rows")
        header = [c.strip().strip(b'"').decode(errors="replace").strip().lower() for c in lines[0].split(b",")]
        missing = [c for c in KAGGLE_COLUMNS if c not in header]
        if missing:
            shown = ascii(lines[0][:80].decode(errors="replace"))  # invisible characters spelled out
            separator = next((f" (its fields are separated by {sep!r})" for sep in (";", "\t", "|")
                              if sep.encode() in lines[0] and b"," not in lines[0]), "")  # fmt: skip
            raise FerdistError(
                f"{name}: line 1: missing column(s) {', '.join(missing)} in the header {shown}{separator}; "
                "expected the Kaggle layout emotion,pixels,Usage, comma-separated"
            )
        if twice := [c for c in KAGGLE_COLUMNS if header.count(c) > 1]:
            raise FerdistError(f"{name}: line 1: the header names {twice[0]} {header.count(twice[0])} times; keep "
                               "one column of each name (which one holds the data is not for ferdist to guess)")
        self.ncols = len(header)
        self.col = {c: header.index(c) for c in KAGGLE_COLUMNS}
        self.lines = lines[1:]
        if not self.lines:
            raise FerdistError(f"{name}: the file has a header but no rows")
        self.splits = self._split_by_usage()

    def _field(self, line: bytes, col: int) -> bytes:
        # Pixels are the bulk of each line; slicing the short columns avoids copying them.
        if col == self.ncols - 1:
            return line[line.rfind(b",") + 1 :]
        if col == 0:
            return line[: line.find(b",")]
        return line.split(b",")[col]

    def _split_by_usage(self) -> dict[str, np.ndarray]:
        usage_col = self.col["usage"]
        by_split: dict[str, list[int]] = {s: [] for s in KAGGLE_USAGE_TO_SPLIT.values()}
        known = {k.encode(): v for k, v in KAGGLE_USAGE_TO_SPLIT.items()}
        for row, line in enumerate(self.lines):
            usage = self._field(line, usage_col).strip().strip(b'"')
            split = known.get(usage)
            if split is None:
                if line.count(b",") != self.ncols - 1:
                    self._bad(row, f"has {line.count(b',') + 1} fields, expected {self.ncols}")
                self._bad(
                    row,
                    f"unknown Usage '{usage.decode(errors='replace')}' (expected Training, PublicTest or PrivateTest)",
                )
            by_split[split].append(row)
        return {s: np.asarray(r, dtype=np.int64) for s, r in by_split.items() if r}

    def _bad(self, row: int, what: str) -> None:
        raise FerdistError(f"{self.name}: line {row + 2}: {what}; fix or remove that row and re-run")

    def load(self, rows: Sequence[int]) -> Batch:
        images = np.empty((len(rows), FACE_SIDE, FACE_SIDE), dtype=np.uint8)
        labels = np.empty(len(rows), dtype=np.int64)
        c_label, c_pixels = self.col["emotion"], self.col["pixels"]
        for i, row in enumerate(rows):
            fields = self.lines[row].split(b",")
            if len(fields) != self.ncols:
                self._bad(row, f"has {len(fields)} fields, expected {self.ncols}")
            text = fields[c_label].strip().strip(b'"').strip()
            # Only plain ASCII digits: Python's int() would also take "+3", " 3" or "0_3".
            if not (text.isdigit() and len(text) <= 3):
                self._bad(row, f"emotion {ascii(text.decode(errors='replace'))} is not a whole number in 0-6")
            label = int(text)
            if not 0 <= label < NUM_CLASSES:
                self._bad(row, f"emotion {label} is outside 0-{NUM_CLASSES - 1}")
            try:
                images[i] = parse_pixels(fields[c_pixels].strip().strip(b'"')).reshape(FACE_SIDE, FACE_SIDE)
            except ValueError as exn:
                self._bad(row, str(exn))
            labels[i] = label
        return Batch(rows=np.asarray(rows, dtype=np.int64), images=images, labels=labels)


_PIXEL_BYTES = np.zeros(256, dtype=bool)
_PIXEL_BYTES[list(b"0123456789 \t")] = True


def parse_pixels(text: bytes) -> np.ndarray:
    """The 2,304 pixel values of a Kaggle ``pixels`` field, uint8; ValueError naming the first bad value.

    Only whole numbers 0-255 separated by spaces are pixels. The check is vectorised (about 20 µs a row) and done
    before numpy parses the numbers, because numpy's text parser does not agree with itself across releases on bad
    input: 1.26 stops at "12.5" or reads it as 12, 2.3 raises, and an int32 wraps 4294967396 round to 100.
    """
    raw = np.frombuffer(text, dtype=np.uint8)
    is_digit = raw >= ord("0")  # valid only once every byte is known to be a digit or a blank
    edges = np.flatnonzero(np.diff(np.concatenate(([False], is_digit, [False])).astype(np.int8)))
    starts, ends = edges[::2], edges[1::2]
    if not _PIXEL_BYTES[raw].all() or (ends - starts > 3).any():
        tokens = text.split()
        for index, token in enumerate(tokens):
            if not token.isdigit():
                raise ValueError(
                    f"pixel {index + 1} is {ascii(token.decode(errors='replace'))}, not a whole number in 0-255"
                )
            if int(token) > 255:
                raise ValueError(f"pixel {index + 1} is {int(token)}, outside 0-255")
        values = np.asarray([int(t) for t in tokens], dtype=np.int64)  # leading zeros ("0012"): rare, still exact
    elif starts.size == FACE_PIXELS:
        values = np.fromstring(text, dtype=np.int64, sep=" ")  # noqa: NPY201 - text mode, input checked above
    else:
        values = np.empty(starts.size, dtype=np.int64)
    if values.size != FACE_PIXELS:
        raise ValueError(f"has {values.size} pixel values, expected {FACE_PIXELS} (48x48)")
    if values.max() > 255:
        index = int(np.argmax(values > 255))
        raise ValueError(f"pixel {index + 1} is {int(values[index])}, outside 0-255")
    return values.astype(np.uint8)


def _as_utf8(text: bytes, *, name: str) -> bytes:
    """The CSV without the byte-order mark Excel's "CSV UTF-8" writes; UTF-16 ("Unicode text") re-encoded."""
    if text.startswith(b"\xef\xbb\xbf"):
        return text[3:]
    if text.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return text.decode("utf-16").encode()
        except UnicodeDecodeError:
            raise FerdistError(f"{name}: starts like UTF-16 text but is not; save it as CSV UTF-8") from None
    return text


# --------------------------------------------------------------------------- image folders


# Top-level folder names an image-folder source may use for each split (case-insensitive).
SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
SPLIT_OF_FOLDER = {alias: split for split, aliases in SPLIT_FOLDERS.items() for alias in aliases}
"""A top-level folder's name (lower case) → the split it holds."""


class ImageFolder(Source):
    """``train/<class>/*`` and ``test/<class>/*`` (and optionally ``val/<class>/*``) under one root.

    Every top-level folder must be a known split (`SPLIT_FOLDERS`), and a test split must exist: a folder with its
    test faces under an unexpected name would otherwise shard without one, and the user would find out at evaluation.
    Without ``test/``, ``test_fraction`` holds out a seeded, stratified slice of train as test (as ``val_fraction``
    does for val).
    """

    def __init__(self, root: Path, *, val_fraction: float, seed: int, test_fraction: float | None = None) -> None:
        self.root = root
        folders = self._split_folders(root)
        if "test" not in folders and not test_fraction:
            found = ", ".join(f"{f.name}/" for f in folders.values()) or "nothing"
            raise FerdistError(
                f"{root}: no test/ folder (found {found}); put the held-out faces in test/<class>/, or pass "
                "--test-fraction 0.1 to hold out a stratified slice of train as the test split"
            )
        files: list[tuple[str, Path, int]] = []  # (split, path, label)
        for split_dir, folder in sorted(folders.items(), key=lambda item: list(SPLIT_FOLDERS).index(item[0])):
            for class_dir in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
                if not class_dir.is_dir():
                    raise FerdistError(
                        f"{class_dir}: expected only class folders in {folder} ({', '.join(FER_CLASSES)})"
                    )
                label = _class_index(class_dir)
                for path in sorted(class_dir.rglob("*")):
                    if path.name.startswith(".") or path.is_dir():
                        continue
                    if path.suffix.lower() not in IMAGE_SUFFIXES:
                        raise FerdistError(f"{path}: not an image file; remove it or move it out of {root}")
                    files.append((split_dir, path, label))
        if not any(s == "train" for s, _, _ in files):
            raise FerdistError(f"{root}: no images under train/<class>/; expected train/ and test/ folders of classes")
        if "test" in folders and not any(s == "test" for s, _, _ in files):
            raise FerdistError(f"{folders['test']}: no images under its class folders; put the test faces there")
        self.paths = [p for _, p, _ in files]
        self.labels = np.asarray([lab for _, _, lab in files], dtype=np.int64)
        digest = files_digest(root, self.paths)
        if test_fraction and "test" not in folders:
            # Part of the source's identity: the same folder split another way is another dataset.
            digest.update(f"test_fraction={test_fraction}".encode())
        split_of = np.asarray([s for s, _, _ in files])
        train = np.flatnonzero(split_of == "train")
        self.splits = {}
        options: dict[str, float | int] = {}  # the ones that decided which faces are held out
        if "test" in folders:
            self.splits["test"] = np.flatnonzero(split_of == "test")
        else:
            # Test is carved first (seed + 1), so changing val_fraction never moves a face into or out of test.
            train, self.splits["test"] = stratified_split(train, self.labels[train], test_fraction or 0.0, seed + 1)
            options |= {"test_fraction": test_fraction or 0.0, "seed": seed}
        if (split_of == "val").any():
            self.splits["val"] = np.flatnonzero(split_of == "val")
        else:
            train, self.splits["val"] = stratified_split(train, self.labels[train], val_fraction, seed)
            options |= {"val_fraction": val_fraction, "seed": seed}
        carved = (("test", "--test-fraction", test_fraction), ("val", "--val-fraction", val_fraction))
        for split, flag, fraction in carved:
            if split not in folders and fraction and not self.splits[split].size:
                raise FerdistError(f"{root}: {flag} {fraction} holds out no face of train/ (every class rounds to 0 "
                                   f"faces); raise it, add a {split}/ folder, or add faces")  # fmt: skip
        self.info = SourceInfo(name=root.name, kind="image-folder", sha256=digest.hexdigest(), split_options=options)
        self.splits["train"] = train
        self.splits = {k: self.splits[k] for k in ("train", "val", "test") if self.splits[k].size}

    @staticmethod
    def _split_folders(root: Path) -> dict[str, Path]:
        """Split name → its folder under ``root``; any other top-level folder is an error (one sentence)."""
        folders: dict[str, Path] = {}
        for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            split = SPLIT_OF_FOLDER.get(child.name.lower())
            if split is None:
                expected = ", ".join(f"{a[0]}/" for a in SPLIT_FOLDERS.values())
                raise FerdistError(
                    f"{child}: unknown split folder '{child.name}'; expected {expected} (also "
                    "training/, validation/, testing/) directly under the source folder"
                )
            if split in folders:
                raise FerdistError(
                    f"{root}: both {folders[split].name}/ and {child.name}/ hold the {split} split; merge them into one"
                )
            folders[split] = child
        return folders

    def load(self, rows: Sequence[int]) -> Batch:
        rows_arr = np.asarray(rows, dtype=np.int64)
        images = load_faces([self.paths[r] for r in rows], centre_crop=False)
        return Batch(rows=rows_arr, images=images, labels=self.labels[rows_arr])


def files_digest(root: Path, paths: Sequence[Path], *, kind: bytes = b"") -> Any:
    """sha256 over each file's path under ``root`` and its bytes: the identity of a folder source."""
    digest = hashlib.sha256(kind)
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exn:
            raise FerdistError(f"{path}: cannot be read ({exn.strerror}); fix or remove it") from None
        # os.fsencode: the name's own bytes, also for one that is not UTF-8 (str.encode refuses its surrogates).
        digest.update(os.fsencode(path.relative_to(root)) + b"\0" + data)
    return digest


def load_faces(paths: Sequence[Path], *, centre_crop: bool) -> np.ndarray:
    """uint8 [n, 48, 48] grey faces from image files: resized to 48x48 as they are (a FER folder's are square
    already), or first centre-cropped to a square (faces from elsewhere, which a resize would squash)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    images = np.empty((len(paths), FACE_SIDE, FACE_SIDE), dtype=np.uint8)
    size, bilinear = (FACE_SIDE, FACE_SIDE), Image.Resampling.BILINEAR
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                gray = Image.fromarray(grey_pixels(img, name=str(path)))
                if centre_crop:
                    gray = ImageOps.fit(gray, size, method=bilinear)
                elif gray.size != size:
                    gray = gray.resize(size, bilinear)
                images[i] = np.asarray(gray)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exn:
            raise FerdistError(f"{path}: not a readable image ({exn}); remove or replace it and re-run") from None
    return images


class UnlabeledFolder(Source):
    """Every image under ``root`` (sub-folders included, hidden files skipped) as the ``unlabeled`` split.

    Faces from elsewhere come in any size and shape: each is centre-cropped to a square (a face is not squashed into
    one) and resized to 48x48. Their labels are placeholders (0) that the manifest counts as no class.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths = []
        for path in sorted(root.rglob("*")):
            if path.is_dir() or any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise FerdistError(
                    f"{path}: not an image file ({', '.join(sorted(IMAGE_SUFFIXES))}); remove it or move it out of "
                    f"{root}"
                )
            self.paths.append(path)
        if not self.paths:
            raise FerdistError(f"{root}: no image files under it; put the face crops (PNG, JPEG, …) there")
        digest = files_digest(root, self.paths, kind=b"unlabeled\0")
        self.info = SourceInfo(name=root.name, kind="unlabeled-folder", sha256=digest.hexdigest())
        self.splits = {UNLABELED_SPLIT: np.arange(len(self.paths))}

    def load(self, rows: Sequence[int]) -> Batch:
        images = load_faces([self.paths[r] for r in rows], centre_crop=True)
        return Batch(rows=np.asarray(rows, dtype=np.int64), images=images, labels=np.zeros(len(rows), dtype=np.int64))


def _child_ci(folder: Path, name: str) -> Path | None:
    """The sub-folder of ``folder`` called ``name``, ignoring case."""
    for child in folder.iterdir():
        if child.is_dir() and child.name.lower() == name:
            return child
    return None


def _class_index(class_dir: Path) -> int:
    names = [c.lower() for c in FER_CLASSES]
    name = class_dir.name.lower()
    if name.isdigit() and int(name) < NUM_CLASSES:
        return int(name)
    if name not in names:
        raise FerdistError(
            f"{class_dir}: unknown class folder '{class_dir.name}'; expected one of {', '.join(FER_CLASSES)}"
        )
    return names.index(name)


def stratified_split(rows: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits ``rows`` into (train, val) with ``fraction`` of every class in val, reproducibly for a seed."""
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for label in range(NUM_CLASSES):
        members = rows[labels == label]
        take = int(round(fraction * members.size))
        val.append(rng.permutation(members)[:take])
    val_rows = np.sort(np.concatenate(val)) if val else np.empty(0, np.int64)
    return np.setdiff1d(rows, val_rows), val_rows


# --------------------------------------------------------------------------- entry point


def open_source(
    source: str | Path,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    test_fraction: float | None = None,
    unlabeled: bool = False,
) -> Source:
    """Opens a FER2013 source: a Kaggle CSV (plain/.gz/.xz/.tar.gz) or an image folder root; with ``unlabeled``, a
    folder of unlabeled face images (`UnlabeledFolder`).

    ``val_fraction`` and ``test_fraction`` only apply to image folders without ``val/`` or ``test/``.
    """
    if unlabeled:
        path = Path(source)
        if not path.is_dir():
            raise FerdistError(
                f"{path}: --unlabeled takes a folder of face images"
                + (", and this is a file" if path.exists() else ", and there is no such folder")
            )
        return UnlabeledFolder(path)
    for flag, value in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if value is not None and not 0 <= value < 1:  # NaN fails this too
            raise FerdistError(f"{flag} {value:g} is not a fraction from 0 up to 1 (e.g. 0.1)")
    path = Path(source)
    if path.is_dir():
        return ImageFolder(path, val_fraction=val_fraction, seed=seed, test_fraction=test_fraction)
    if not path.exists():
        raise FerdistError(
            f"{path}: no such file or folder; pass --source a fer2013.csv[.gz|.xz], fer2013.tar.gz or image folder"
        )
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    except OSError as exn:
        raise FerdistError(f"{path}: cannot be read ({exn.strerror}); check its permissions") from None
    info = SourceInfo(name=path.name, kind="kaggle-csv", sha256=digest.hexdigest())
    return KaggleCsv(read_csv_bytes(path), name=str(path), info=info)


def synthetic_source(rows: int = 3000, *, seed: int = 0) -> KaggleCsv:
    """The SYNTHETIC set (`ferdist.data.synth`) as a CSV source, marked synthetic in its manifest."""
    from ferdist.data.synth import make_synthetic_csv

    text = make_synthetic_csv(rows, seed=seed)
    name = f"synthetic-{rows}-seed{seed}.csv"
    info = SourceInfo(name=name, kind="synthetic-csv", sha256=hashlib.sha256(text).hexdigest(), synthetic=True)
    return KaggleCsv(text, name=name, info=info)
