"""The shard format: the only module that knows the tar layout, the PNG bytes and the manifest schema.

A dataset is a folder (or S3 prefix) of WebDataset tars plus ``manifest.json``, specified in ``shards/README.md``:

* shard names ``{split}-{000000}.tar``; inside, each sample is ``{row:06d}.png`` (48x48 8-bit grayscale PNG) and
  ``{row:06d}.cls`` (the class index as ASCII), where ``row`` is the sample's 0-based row in the source;
* ``manifest.json`` is written last and lists every shard with its sample count, bytes and sha256, so a dataset
  without one is by definition incomplete.

PNGs are written here with zlib directly rather than through Pillow or libpng: the bytes then depend only on zlib,
which keeps shards byte-identical across machines and library versions, and a 48x48 image encodes in about half the
time. The pixels sit in uncompressed deflate blocks (see `encode_pngs`), so decoding is a copy; a fast path reads
exactly this layout and any other valid PNG goes through Pillow.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ferdist.constants import (
    FACE_SIDE,
    FER_CLASSES,
    NUM_CLASSES,
    SHARD_FORMAT,
    SHARD_FORMAT_VERSION,
    UNLABELED_SPLIT,
)
from ferdist.data.images import grey_pixels
from ferdist.errors import FerdistError

BadSampleHandler = Callable[[str, str], None]
"""Called as ``on_bad(shard, reason)`` for each sample that cannot be read."""

# --------------------------------------------------------------------------- PNG

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FILTER_NONE, _FILTER_SUB = 0, 1


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header(height: int, width: int) -> bytes:
    # 8-bit depth, colour type 0 (grayscale), deflate, adaptive filtering, no interlace.
    return _PNG_SIGNATURE + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))


_PNG_END = _png_chunk(b"IEND", b"")


def encode_pngs(images: np.ndarray, *, level: int = 0) -> list[bytes]:
    """Encodes a batch of grayscale images ``uint8[n, h, w]`` as PNG files, deterministically.

    ``level=0`` (the default) stores the pixels in uncompressed deflate blocks: still a standard PNG with zlib's
    Adler-32 check, 2.4 kB instead of ~1.9 kB for a 48x48 face, but decoding is a copy instead of a ~13 µs inflate,
    which is most of the per-sample cost of the loader. Any other level uses the Sub filter, the best for faces.
    """
    n, h, w = images.shape
    rows = np.empty((n, h, w + 1), dtype=np.uint8)
    rows[:, :, 1:] = images
    rows[:, :, 0] = _FILTER_NONE
    if level > 0:
        # Sub filter: each byte minus its left neighbour, modulo 256 (uint8 arithmetic wraps).
        rows[:, :, 0] = _FILTER_SUB
        np.subtract(images[:, :, 1:], images[:, :, :-1], out=rows[:, :, 2:])
    header = _png_header(h, w)
    return [header + _png_chunk(b"IDAT", zlib.compress(r.tobytes(), level)) + _PNG_END for r in rows]


def decode_png(data: bytes) -> np.ndarray:
    """Decodes a PNG to ``uint8[h, w]`` grayscale; raises ValueError if it is not a readable grayscale PNG."""
    # Fast path: exactly the layout encode_pngs writes (one IDAT, 8-bit gray, filters None/Sub only).
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) > 45:
        width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
        idat_len = struct.unpack(">I", data[33:37])[0]
        if depth == 8 and colour == 0 and interlace == 0 and data[37:41] == b"IDAT":
            size = height * (width + 1)
            try:
                raw = zlib.decompress(data[41 : 41 + idat_len], 15, size)
            except zlib.error as exn:
                raise ValueError(f"corrupt PNG data ({exn})") from None
            if len(raw) != size:
                raise ValueError(f"truncated PNG ({len(raw)} of {size} bytes)")
            rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, width + 1)
            filters = rows[:, 0]
            if not filters.any():
                return rows[:, 1:]
            if (filters == _FILTER_SUB).all():
                return np.cumsum(rows[:, 1:], axis=1, dtype=np.uint8)  # undo Sub; uint8 wraps modulo 256
    return _decode_png_general(data)


def _decode_png_general(data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return grey_pixels(img, name="the image")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, FerdistError) as exn:
        raise ValueError(f"not a readable image ({exn})") from None


# --------------------------------------------------------------------------- tar


def sample_key(row: int) -> str:
    """The WebDataset key of the sample from source row ``row`` (sortable, and carries the row back)."""
    return f"{row:06d}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def build_shard(rows: Sequence[int], labels: Sequence[int], pngs: Sequence[bytes]) -> bytes:
    """Packs samples into one uncompressed tar, byte-identical for the same inputs (fixed mtime, owner, mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for row, label, png in zip(rows, labels, pngs, strict=True):
            key = sample_key(row)
            for name, payload in ((f"{key}.png", png), (f"{key}.cls", str(int(label)).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(payload), 0, 0o444
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@dataclass(frozen=True)
class Sample:
    """One decoded face: the pixels, the class index and the source row it came from."""

    image: np.ndarray
    label: int
    row: int


def iter_shard(data: bytes, *, shard: str, on_bad: BadSampleHandler) -> Iterator[Sample]:
    """Yields the samples of one shard's bytes, calling ``on_bad(shard, reason)`` for each unreadable one.

    A truncated tar yields what precedes the damage and reports the rest as one bad event.
    """
    key, parts = None, {}
    try:
        for name, payload in _tar_members(data):
            member_key, _, ext = name.rpartition(".")
            if member_key != key:
                # Samples are written contiguously: a new key means the previous sample is complete.
                if key is not None:
                    yield from _decode_sample(key, parts, shard=shard, on_bad=on_bad)
                key, parts = member_key, {}
            parts[ext] = payload
    except (tarfile.TarError, EOFError, OSError) as exn:
        if key is not None:  # the sample before the damage may be whole; _decode_sample reports it if not
            yield from _decode_sample(key, parts, shard=shard, on_bad=on_bad)
        on_bad(shard, f"unreadable tar ({exn}); the rest of the shard was skipped")
        return
    if key is not None:
        yield from _decode_sample(key, parts, shard=shard, on_bad=on_bad)


def _tar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of each regular file in an in-memory tar.

    Plain ustar members (what `build_shard` writes) are parsed directly, about 10x faster than the tarfile module;
    anything else (PAX or GNU long-name headers from other writers) goes through tarfile.
    """
    view, offset, end = memoryview(data), 0, len(data)
    while offset + 512 <= end:
        header = data[offset : offset + 512]
        if header.count(0) == 512:
            return  # end-of-archive marker
        kind = header[156:157]
        if kind not in (b"0", b"\0") or header[257:262] != b"ustar":
            yield from _tar_members_slow(data)
            return
        try:
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
            checksum = int(header[148:156].rstrip(b"\0 "), 8)
        except ValueError:
            raise tarfile.ReadError(f"bad header at byte {offset}") from None
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):
            raise tarfile.ReadError(f"header checksum mismatch at byte {offset}")
        start = offset + 512
        if start + size > end:
            raise tarfile.ReadError(f"member at byte {offset} is truncated")
        prefix = header[345:500].split(b"\0", 1)[0]
        name = header[:100].split(b"\0", 1)[0]
        yield (prefix + b"/" + name if prefix else name).decode(), bytes(view[start : start + size])
        offset = start + (size + 511) // 512 * 512
    if offset < end or end == 0:
        raise tarfile.ReadError("archive ends in the middle of a header" if end else "empty file")


def _tar_members_slow(data: bytes) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for member in tar:
            if member.isreg():
                f = tar.extractfile(member)
                assert f is not None
                payload = f.read()
                if len(payload) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is truncated")
                yield member.name, payload


def _decode_sample(key: str, parts: dict[str, bytes], *, shard: str, on_bad: BadSampleHandler) -> Iterator[Sample]:
    try:
        # Plain ASCII digits only: int() would also read "+3", " 3\n" or "0_3" as numbers.
        if not key.isascii() or not key.isdigit():
            raise ValueError(f"key is not a row number ({key!r})")
        row = int(key)
        cls = parts["cls"]
        if not cls.isdigit():
            raise ValueError(f"label {ascii(cls[:16].decode(errors='replace'))} is not a class index")
        label = int(cls)
        if not 0 <= label < NUM_CLASSES:
            raise ValueError(f"label {label} outside 0-{NUM_CLASSES - 1}")
        image = decode_png(parts["png"])
        if image.shape != (FACE_SIDE, FACE_SIDE):
            raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, expected {FACE_SIDE}x{FACE_SIDE}")
    except (KeyError, ValueError) as exn:
        reason = f"missing .{exn.args[0]}" if isinstance(exn, KeyError) else str(exn)
        on_bad(shard, f"sample {key}: {reason}")
        return
    yield Sample(image=image, label=label, row=row)


@dataclass(frozen=True)
class DecodedShard:
    """A shard as arrays: ``rows`` int64[n], ``labels`` int64[n], ``images`` uint8[n, 48, 48]."""

    rows: np.ndarray
    labels: np.ndarray
    images: np.ndarray

    def __len__(self) -> int:
        return int(self.rows.size)


def decode_shard(data: bytes, *, shard: str, sha256: str | None, on_bad: BadSampleHandler) -> DecodedShard:
    """Decodes a whole shard; damaged samples are reported through ``on_bad`` and left out.

    With the manifest's ``sha256``, bytes that do not match it yield no sample at all (one ``on_bad`` call): a PNG
    check catches a damaged image but not a changed label digit, and a wrong label must never be served. Matching
    bytes in exactly the layout `build_shard` writes are decoded with a handful of numpy operations (~1 µs a sample);
    anything else (``sha256=None``: a shard from elsewhere) sample by sample, checking every header and PNG.
    """
    if sha256 is not None:
        if hashlib.sha256(data).hexdigest() != sha256:
            on_bad(shard, "its bytes do not match the manifest's sha256 (changed or damaged since it was written)")
            return _EMPTY
        fast = _decode_fixed_layout(data)
        if fast is not None:
            return fast
    samples = list(iter_shard(data, shard=shard, on_bad=on_bad))
    if not samples:
        return _EMPTY
    return DecodedShard(
        rows=np.asarray([s.row for s in samples], dtype=np.int64),
        labels=np.asarray([s.label for s in samples], dtype=np.int64),
        images=np.stack([s.image for s in samples]),
    )


_EMPTY = DecodedShard(
    rows=np.empty(0, np.int64), labels=np.empty(0, np.int64), images=np.empty((0, FACE_SIDE, FACE_SIDE), np.uint8)
)


def _fixed_layout() -> tuple[int, bytes, bytes, int]:
    """(bytes per sample, expected PNG member header+prefix, .cls header tail, pixel offset) of `build_shard` output."""
    probe = build_shard([0], [0], encode_pngs(np.zeros((1, FACE_SIDE, FACE_SIDE), np.uint8)))
    png_size = int(probe[124:136].rstrip(b"\0 "), 8)
    png_block = 512 + (png_size + 511) // 512 * 512
    prefix = len(_png_header(FACE_SIDE, FACE_SIDE)) + 8 + 2 + 5  # IDAT length+type, zlib header, stored-block header
    # Header bytes 100-512 minus the checksum (148-156), which depends on the name.
    return (
        png_block + 1024,
        probe[100:148] + probe[156:512],
        probe[png_block + 100 : png_block + 148] + probe[png_block + 156 : png_block + 512],
        prefix,
    )


_FIXED = _fixed_layout()
_PNG_NAME_TAIL = np.frombuffer(b".png".ljust(94, b"\0"), np.uint8)
_CLS_NAME_TAIL = np.frombuffer(b".cls".ljust(94, b"\0"), np.uint8)


def _decode_fixed_layout(data: bytes) -> DecodedShard | None:
    stride, png_header_tail, cls_header_tail, pixel_offset = _FIXED
    # Samples are the leading stride-sized rows with a name; after them only the end-of-archive zeros may follow.
    whole = np.frombuffer(data, dtype=np.uint8, count=len(data) // stride * stride).reshape(-1, stride)
    n = int(np.argmin(whole[:, 0] != 0)) if (whole[:, 0] == 0).any() else whole.shape[0]
    if n == 0:
        return None
    arr = whole[:n]
    png_block = stride - 1024
    expected_png = np.frombuffer(_PNG_SIGNATURE + _png_header(FACE_SIDE, FACE_SIDE)[8:], np.uint8)
    trailer = np.frombuffer(data, dtype=np.uint8, offset=n * stride)
    # Every header field but the name is the same for every member; the name is 6 digits + ".png"/".cls".
    if (
        trailer.any()
        or not (np.hstack([arr[:, 100:148], arr[:, 156:512]]) == np.frombuffer(png_header_tail, np.uint8)).all()
        or not (
            np.hstack([arr[:, png_block + 100 : png_block + 148], arr[:, png_block + 156 : png_block + 512]])
            == np.frombuffer(cls_header_tail, np.uint8)
        ).all()
        or not (arr[:, 512 : 512 + expected_png.size] == expected_png).all()
    ):
        return None
    # Names must be exactly "dddddd.png" and the same "dddddd.cls": a 7-digit key (a source of over a million rows)
    # or a .cls of another sample goes the checked way instead of being read as the wrong row.
    names = arr[:, 0:100]
    cls_names = arr[:, png_block : png_block + 100]
    digits = names[:, 0:6].astype(np.int64) - 48
    labels = arr[:, png_block + 512].astype(np.int64) - 48
    if (
        (digits < 0).any()
        or (digits > 9).any()
        or not (names[:, 6:] == _PNG_NAME_TAIL).all()
        or not (cls_names[:, 6:] == _CLS_NAME_TAIL).all()
        or not (cls_names[:, :6] == names[:, :6]).all()
        or (labels < 0).any()
        or (labels >= NUM_CLASSES).any()
    ):
        return None
    rows = digits @ (10 ** np.arange(5, -1, -1, dtype=np.int64))
    pixels = arr[:, 512 + pixel_offset : 512 + pixel_offset + FACE_SIDE * (FACE_SIDE + 1)]
    pixels = pixels.reshape(n, FACE_SIDE, FACE_SIDE + 1)
    if pixels[:, :, 0].any():  # filter bytes must all be None
        return None
    return DecodedShard(rows=rows, labels=labels, images=np.ascontiguousarray(pixels[:, :, 1:]))


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    samples: int
    class_counts: list[int]
    shards: list[ShardInfo]


@dataclass(frozen=True)
class SourceInfo:
    name: str
    """File or folder name of the source (no directories, which may be private)."""
    kind: str
    """``kaggle-csv``, ``image-folder`` or ``synthetic-csv``."""
    sha256: str
    """sha256 of the source file as given (compressed bytes for .xz/.gz), or of the sorted file list for folders."""
    synthetic: bool = False
    """True for the generated synthetic set: never report its accuracy as FER2013 accuracy."""
    split_options: dict[str, float | int] = field(default_factory=dict)
    """The jobs/shard.py options (``val_fraction``, ``test_fraction``, ``seed``) that carved held-out splits out of an
    image folder's train/, so the command that re-writes a lost shard is exact. Empty, and left out of the manifest,
    for every other source: their manifests (and so their dataset digests) are as before."""


SPLIT_OPTIONS = ("val_fraction", "test_fraction", "seed")
"""The jobs/shard.py options a manifest may keep as ``source.split_options``."""


@dataclass(frozen=True)
class Manifest:
    source: SourceInfo
    splits: dict[str, SplitInfo]
    samples_per_shard: int
    classes: list[str] = field(default_factory=lambda: list(FER_CLASSES))
    format: str = SHARD_FORMAT
    format_version: int = SHARD_FORMAT_VERSION
    image: dict[str, object] = field(default_factory=lambda: {"height": 48, "width": 48, "channels": 1, "type": "png"})

    def to_json(self) -> bytes:
        """Deterministic JSON (sorted keys, no timestamps) so re-running gives an identical manifest."""
        fields = asdict(self)
        if not self.source.split_options:
            del fields["source"]["split_options"]
        return (json.dumps(fields, indent=2, sort_keys=True) + "\n").encode()

    def shard_uris(self, base_uri: str, split: str) -> list[str]:
        """The URIs of a split's shards, resolved against the folder or prefix that holds the manifest."""
        base = base_uri.rstrip("/")
        return [f"{base}/{s.name}" for s in self.split(split, labelled=False).shards]

    def split(self, name: str, *, labelled: bool = True) -> SplitInfo:
        """The split called ``name``; ``labelled`` (every reader but pretraining) refuses the unlabeled split, whose
        shards carry placeholder labels that must never reach a loss or an accuracy."""
        if name == UNLABELED_SPLIT and labelled:
            raise FerdistError(
                f"split '{name}' holds faces without labels, which only MAE pretraining reads (jobs/pretrain.py); "
                "fine-tune and evaluate on train, val or test"
            )
        if name not in self.splits:
            only_unlabeled = list(self.splits) == [UNLABELED_SPLIT]
            raise FerdistError(
                f"the dataset has no '{name}' split (it has: {', '.join(self.splits) or 'none'})"
                + ("; it holds only unlabeled faces, for jobs/pretrain.py (data.manifest or data.extra)"
                   if only_unlabeled and labelled else "")
            )  # fmt: skip
        return self.splits[name]


def manifest_from_json(data: bytes, *, uri: str) -> Manifest:
    """Parses and checks a manifest; an unknown format or version gets a clear error."""
    try:
        raw = json.loads(data)
        fmt, version = raw.get("format"), raw.get("format_version")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exn:
        raise FerdistError(f"'{uri}' is not a ferdist manifest (invalid JSON: {exn})") from None
    if fmt != SHARD_FORMAT:
        raise FerdistError(
            f"'{uri}' is not a ferdist shard manifest (format={fmt!r}); point at one jobs/shard.py wrote"
        )
    if version != SHARD_FORMAT_VERSION:
        raise FerdistError(
            f"'{uri}' has shard format version {version}, this ferdist reads version {SHARD_FORMAT_VERSION}; "
            "re-shard the data with this version's jobs/shard.py"
        )
    try:
        splits = {
            name: SplitInfo(
                samples=s["samples"], class_counts=list(s["class_counts"]), shards=[ShardInfo(**x) for x in s["shards"]]
            )
            for name, s in raw["splits"].items()
        }
        manifest = Manifest(
            source=SourceInfo(**raw["source"]),
            splits=splits,
            samples_per_shard=raw["samples_per_shard"],
            classes=list(raw["classes"]),
            image=dict(raw["image"]),
        )
    except (KeyError, TypeError, AttributeError) as exn:
        raise FerdistError(
            f"'{uri}' is a damaged manifest (missing or bad field {exn}); re-run jobs/shard.py"
        ) from None
    problem = _manifest_problem(manifest)
    if problem:
        raise FerdistError(f"'{uri}' is a damaged manifest ({problem}); re-run jobs/shard.py")
    return manifest


_SHARD_NAME = re.compile(r"[A-Za-z0-9_-]+\.tar")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _manifest_problem(m: Manifest) -> str | None:
    """What is inconsistent in a parsed manifest (counts, names, hashes), or None: nothing read from it is trusted
    until it adds up, because the reader uses the counts to size epochs and the names to build paths."""
    if m.classes != list(FER_CLASSES):
        return f"classes {m.classes} are not FER2013's {list(FER_CLASSES)} in that order"
    if not (_count(m.samples_per_shard) and m.samples_per_shard > 0):
        return f"samples_per_shard is {m.samples_per_shard!r}"
    options = m.source.split_options
    if not isinstance(options, dict) or not all(
        k in SPLIT_OPTIONS and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in options.items()
    ):  # they become a command line
        return f"source.split_options {options!r} are not {', '.join(SPLIT_OPTIONS)} with numbers"
    for name, split in m.splits.items():
        if not _count(split.samples):
            return f"split {name}: samples is {split.samples!r}"
        if len(split.class_counts) != NUM_CLASSES or not all(_count(c) for c in split.class_counts):
            return f"split {name}: class_counts {split.class_counts!r} are not {NUM_CLASSES} counts"
        if name == UNLABELED_SPLIT:
            if any(split.class_counts):
                return f"split {name}: class_counts {split.class_counts!r} are not all zero (its faces have no labels)"
        elif sum(split.class_counts) != split.samples:
            return f"split {name}: class_counts add up to {sum(split.class_counts)}, samples says {split.samples}"
        for shard in split.shards:
            if not isinstance(shard.name, str) or not _SHARD_NAME.fullmatch(shard.name):
                return f"split {name}: shard name {shard.name!r} is not a plain file name ending in .tar"
            if not (_count(shard.samples) and _count(shard.bytes)):
                return f"split {name}: shard {shard.name} has samples {shard.samples!r}, bytes {shard.bytes!r}"
            if not isinstance(shard.sha256, str) or not _SHA256.fullmatch(shard.sha256):
                return f"split {name}: shard {shard.name} has no valid sha256"
        if sum(s.samples for s in split.shards) != split.samples:
            held = sum(s.samples for s in split.shards)
            return f"split {name}: its shards hold {held} samples, it says {split.samples}"
    return None


def split_info(shards: Iterable[ShardInfo], class_counts: Sequence[int]) -> SplitInfo:
    shard_list = list(shards)
    return SplitInfo(samples=sum(s.samples for s in shard_list), class_counts=list(class_counts), shards=shard_list)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
