r"""Image files on disk → a row per face (`jobs/predict.py`): finding the files, classifying them a chunk at a time,
and writing the rows as a table, CSV or JSON.

A file's name is written in every text output (the screen, CSV, JSON, error sentences) by one rule, `shown_name`:
its bytes read as UTF-8; a byte that is not UTF-8 as ``\xNN``; a backslash as ``\\``; newline, tab and carriage
return as ``\n``, ``\t``, ``\r``; the other ASCII control characters as ``\xNN``; the C1 controls, the line and
paragraph separators and the bidirectional controls as ``\uNNNN``. ``\xNN`` is always the byte NN and ``\uNNNN`` the
character U+NNNN, so every name is one line of valid UTF-8 that shows what is in it, the rule can be undone
(`original_name`), and two files never share a spelling.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ferdist.errors import FerdistError

if TYPE_CHECKING:
    from rich.table import Table

    from ferdist.serve.inference import Predictor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
CHUNK = 64
"""Files decoded at a time: a folder of thousands of photos is never held in memory at once."""

_ESCAPED = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\udc80-\udcff]")
"""What `shown_name` escapes: the backslash; C0, DEL and C1 controls; the Arabic letter mark, LRM/RLM, the line and
paragraph separators and the bidi embeddings, overrides and isolates (they break or reorder the line around them on a
screen); and U+DC80–U+DCFF, the bytes that are not UTF-8 (Python's surrogate escapes)."""
_NAMED = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
_UNESCAPE = re.compile(r"\\(\\|n|t|r|x[0-9a-f]{2}|u[0-9a-f]{4})")


def shown_name(path: str | os.PathLike[str]) -> str:
    r"""``path`` as ferdist writes a file name in text (see the module's docstring): ``caf\xe9.jpg`` for a Latin-1
    ``café.jpg``, ``a\nb.jpg`` for a name holding a newline, ``a\\b.jpg`` for one holding a backslash."""
    text = os.fspath(path)
    try:
        raw = os.fsencode(text)  # the bytes on disk, whatever the file system encoding Python decoded them with
    except UnicodeEncodeError:  # a lone surrogate no file name decodes to (a str made in code): its UTF-8-ish bytes
        raw = text.encode("utf-8", "surrogatepass")
    return _ESCAPED.sub(_escape, raw.decode("utf-8", "surrogateescape"))


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, surrogate-escaped by the decode
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"  # \x only for bytes, so \x80 is never U+0080


def original_name(shown: str) -> str:
    """The file name (as Python's `os` functions take it) that `shown_name` wrote as ``shown``: a CSV row back to its
    file."""
    parts, end = [], 0
    for match in _UNESCAPE.finditer(shown):
        parts.append(shown[end : match.start()].encode("utf-8", "surrogateescape"))
        code = match.group(1)
        if code[0] == "x":
            parts.append(bytes([int(code[1:], 16)]))
        elif code[0] == "u":
            parts.append(chr(int(code[1:], 16)).encode())
        else:
            parts.append({"\\": b"\\", "n": b"\n", "t": b"\t", "r": b"\r"}[code])
        end = match.end()
    parts.append(shown[end:].encode("utf-8", "surrogateescape"))
    return os.fsdecode(b"".join(parts))


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Writes ``path`` whole or not at all: ``write`` fills a new hidden file beside it, which replaces ``path``
    (`os.replace`, atomic within a folder) only once it is complete and on disk. When anything fails the hidden file
    is removed and whatever was at ``path`` is left as it was; the error is raised."""
    # A short name of its own (not ``path``'s, which may be 255 bytes already); O_EXCL never takes over a file, and
    # mode 0o666 lets the umask set the permissions, as open() does.
    temp = path.with_name(f".ferdist-{secrets.token_hex(8)}.tmp")
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename, or a crash could leave an empty file in its place
        os.replace(temp, path)
    except BaseException:  # Ctrl-C too: no half-written file is left behind
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def image_files(paths: list[Path]) -> list[Path]:
    """The files named, and the image files under the folders named (suffixes in any case), in a stable order,
    each once however often it is named.

    Raises:
        FerdistError: a path does not exist, or a folder holds no image files.
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FerdistError(f"{shown_name(path)}/ holds no image files (looked for "
                                   f"{', '.join(sorted(IMAGE_SUFFIXES))})")  # fmt: skip
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FerdistError(f"{shown_name(path)} does not exist")
    seen: set[Path] = set()
    unique = []
    for file in files:  # `photos/ photos/a.jpg` names a.jpg twice: one set of rows
        if file.resolve() not in seen:
            seen.add(file.resolve())
            unique.append(file)
    return unique


def check_writable(path: Path, *, what: str, folder: bool) -> None:
    """Fails before any work when ``path`` (a file, or a folder if ``folder``) cannot be written where it is."""
    if folder and path.exists() and not path.is_dir():
        raise FerdistError(f"{what} {shown_name(path)} is a file; name a folder")
    if not folder and path.is_dir():
        raise FerdistError(f"{what} {shown_name(path)} is a folder; name a file")
    parent = path if folder else path.parent
    for above in (parent, *parent.parents):
        if above.exists():
            if not above.is_dir():
                raise FerdistError(f"{what} {shown_name(path)}: {shown_name(above)} is a file, not a folder")
            break


def predict_files(predictor: Predictor, files: list[Path], *, detect: str) -> list[dict[str, Any]]:
    """A row per face (or per photo without one, or per unreadable file, with its ``error``), in file order.
    ``file`` is the path as Python's `os` functions take it (`shown_name` spells it in text); errors name files by
    `shown_name`."""
    from ferdist.serve.inference import classify

    rows: list[dict[str, Any]] = []
    for start in range(0, len(files), CHUNK):
        chunk, data, unreadable = files[start : start + CHUNK], [], {}
        for path in chunk:
            try:
                data.append(path.read_bytes())
            except OSError as exn:
                unreadable[path] = f"cannot read {shown_name(path)} ({exn.strerror})"
        readable = [path for path in chunk if path not in unreadable]
        table = classify(predictor, data, detect=detect, names=[shown_name(path) for path in readable])
        found: dict[int, list[dict[str, Any]]] = {}
        for record in table.to_dict(orient="records"):
            index = record.pop("image")
            row = {"file": str(readable[index]), **record}
            found.setdefault(index, []).append({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
        index_of = {path: index for index, path in enumerate(readable)}
        for path in chunk:
            if path in unreadable:
                rows.append({"file": str(path), "face": -1, "error": unreadable[path]})
            else:
                rows += found[index_of[path]]
    return rows


def output_columns() -> list[str]:
    from ferdist.serve.inference import COLUMNS

    return ["file", *[c for c in COLUMNS if c not in ("image", "error")]]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as UTF-8 CSV or JSON by ``path``'s suffix, written whole or not at all (`write_atomically`): files
    named by `shown_name`, and a photo without a face with empty (CSV) / null (JSON) probabilities."""
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()} for row in rows]
    for row in clean:
        row["file"] = shown_name(row["file"])
    # The whole text is made before any file is touched: nothing that fails here can leave a file behind.
    data = _json_bytes(clean) if path.suffix.lower() == ".json" else _csv_bytes(clean)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda file: file.write(data))
    except OSError as exn:
        why = exn.strerror or exn
        raise FerdistError(f"cannot write {shown_name(path)} ({why}); choose another --output") from None


def _json_bytes(rows: list[dict[str, Any]]) -> bytes:
    return (json.dumps(rows, indent=1, ensure_ascii=False) + "\n").encode("utf-8")  # JSON's own encoding (RFC 8259)


def _csv_bytes(rows: list[dict[str, Any]]) -> bytes:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=output_columns())
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode("utf-8")  # UTF-8 whatever the locale; the naming rule leaves nothing unencodable


def rows_table(rows: list[dict[str, Any]]) -> Table:
    """The rows as a rich table with the CSV's columns, files named by `shown_name` and taken as plain text:
    ``[final].jpg`` is not markup, ``:smile:.jpg`` not an emoji."""
    from rich.table import Table
    from rich.text import Text

    table = Table()
    columns = output_columns()
    for column in columns:
        table.add_column(column, justify="left" if column in ("file", "label") else "right")
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if column == "file":
                cells.append(Text(shown_name(value)))
            elif isinstance(value, float):
                cells.append("" if math.isnan(value) else f"{value:.3f}")
            else:
                cells.append(Text(str(value)))
        table.add_row(*cells)
    return table
