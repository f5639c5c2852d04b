r"""Image files on disk → a row per face (`jobs/predict.py`): finding the files, classifying them a chunk at a time,
and writing the rows as a table, CSV or JSON. File names are written in text by `ferdist.files.shown_name`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferdist.errors import FerdistError
from ferdist.files import shown_name, write_atomically

if TYPE_CHECKING:
    from rich.table import Table

    from ferdist.serve.inference import Predictor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
CHUNK = 64
"""Files decoded at a time: a folder of thousands of photos is never held in memory at once."""


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
