r"""Files named by users, for every job: how a file's name is written in text, whether a path can be written before
any work starts, and writing a file whole or not at all.

A file's name is written in every text output (the screen, CSV, JSON, error sentences) by one rule, `shown_name`:
its bytes read as UTF-8; a byte that is not UTF-8 as ``\xNN``; a backslash as ``\\``; newline, tab and carriage
return as ``\n``, ``\t``, ``\r``; the other ASCII control characters as ``\xNN``; the C1 controls, the line and
paragraph separators and the bidirectional controls as ``\uNNNN``. ``\xNN`` is always the byte NN and ``\uNNNN`` the
character U+NNNN, so every name is one line of valid UTF-8 that shows what is in it, the rule can be undone
(`original_name`), and two files never share a spelling.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO

from ferdist.errors import FerdistError

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
