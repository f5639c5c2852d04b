"""Image files on disk → a row per face (`jobs/predict.py`): finding the files, classifying them a chunk at a time,
and writing the rows as a table, CSV or JSON."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferdist.errors import FerdistError

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
                raise FerdistError(f"{path}/ holds no image files (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FerdistError(f"{path} does not exist")
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
        raise FerdistError(f"{what} {path} is a file; name a folder")
    if not folder and path.is_dir():
        raise FerdistError(f"{what} {path} is a folder; name a file")
    parent = path if folder else path.parent
    for above in (parent, *parent.parents):
        if above.exists():
            if not above.is_dir():
                raise FerdistError(f"{what} {path}: {above} is a file, not a folder")
            break


def predict_files(predictor: Predictor, files: list[Path], *, detect: str) -> list[dict[str, Any]]:
    """A row per face (or per photo without one, or per unreadable file, with its ``error``), in file order."""
    from ferdist.serve.inference import classify

    rows: list[dict[str, Any]] = []
    for start in range(0, len(files), CHUNK):
        chunk, data, unreadable = files[start : start + CHUNK], [], {}
        for path in chunk:
            try:
                data.append(path.read_bytes())
            except OSError as exn:
                unreadable[path] = f"cannot read {path} ({exn.strerror})"
        readable = [path for path in chunk if path not in unreadable]
        table = classify(predictor, data, detect=detect, names=[str(path) for path in readable])
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
    """``rows`` as CSV or JSON by ``path``'s suffix; a photo without a face has empty (CSV) / null (JSON)
    probabilities."""
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()} for row in rows]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(clean, indent=1) + "\n")
            return
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=output_columns())
            writer.writeheader()
            writer.writerows(clean)
    except OSError as exn:
        raise FerdistError(f"cannot write {path} ({exn.strerror}); choose another --output") from None


def rows_table(rows: list[dict[str, Any]]) -> Table:
    """The rows as a rich table with the CSV's columns (file names escaped: ``[final].jpg`` is not markup)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table()
    columns = output_columns()
    for column in columns:
        table.add_column(column, justify="left" if column in ("file", "label") else "right")
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if isinstance(value, float):
                cells.append("" if math.isnan(value) else f"{value:.3f}")
            else:
                cells.append(escape(str(value)))
        table.add_row(*cells)
    return table
