"""Photos with each face's box and expression drawn on them (`jobs/predict.py --annotate`).

A copy is named after its photo with the photo's own bytes (a Latin-1 ``café.jpg`` gives a Latin-1 ``café.png``, a
name holding a newline a copy holding it), so it sorts and shows beside its original; messages name it by
`ferdist.files.shown_name`. Each copy is written whole or not at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ferdist.errors import FerdistError
from ferdist.files import shown_name, write_atomically

COLOURS = {"Angry": "#d62728", "Disgust": "#8c564b", "Fear": "#9467bd", "Happy": "#2ca02c", "Sad": "#1f77b4",
           "Surprise": "#ff7f0e", "Neutral": "#7f7f7f"}  # fmt: skip
"""One colour per class (matplotlib's tab10), so a page of annotated photos reads at a glance."""


def upright_rgb(path: Path) -> Any:
    """The photo as 8-bit RGB in the orientation its boxes were found in: EXIF rotation applied, 16-bit and float
    images scaled as `ferdist.data.images.grey_pixels` scales them (Pillow's own conversion clips them to white)."""
    from PIL import Image, ImageOps

    from ferdist.data.images import grey_pixels

    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):
            return Image.fromarray(grey_pixels(image, name=shown_name(path))).convert("RGB")
        return image.convert("RGB")


def annotate(path: Path, rows: list[dict[str, Any]], dest: Path) -> None:
    """Writes photo ``path`` to ``dest`` (PNG, whole or not at all) with a box and "Label 87%" for each face row in
    ``rows``.

    Raises:
        FerdistError: the photo cannot be read again, or ``dest`` cannot be written.
    """
    try:
        image = upright_rgb(path)
    except OSError as exn:  # moved, changed or unreadable since it was classified
        why = exn.strerror or exn
        raise FerdistError(f"cannot read {shown_name(path)} again ({why}); run predict.py on it again") from None
    draw_faces(image, rows)
    try:
        write_atomically(dest, lambda file: image.save(file, format="PNG"))
    except OSError as exn:
        why = exn.strerror or exn
        raise FerdistError(f"cannot write {shown_name(dest)} ({why}); choose another --annotate") from None


def draw_faces(image: Any, rows: list[dict[str, Any]]) -> None:
    """Draws a box and "Label 87%" for each face row in ``rows`` on PIL RGB ``image`` (the text holds no name)."""
    from PIL import ImageDraw, ImageFont

    draw = ImageDraw.Draw(image)
    line = max(2, round(max(image.size) / 300))
    font = ImageFont.load_default(size=max(12, round(max(image.size) / 40)))
    for row in rows:
        if row["face"] < 0:
            continue
        colour = COLOURS[row["label"]]
        box = (row["x"], row["y"], row["x"] + row["w"] - 1, row["y"] + row["h"] - 1)
        draw.rectangle(box, outline=colour, width=line)
        text = f"{row['label']} {row['p_' + row['label'].lower()]:.0%}"
        # Above the box, or inside its top edge where there is no room above (a face at the top, a whole crop).
        anchor = "lb" if box[1] >= getattr(font, "size", 12) + 2 * line else "lt"
        origin = (box[0], box[1])
        left, top, right, bottom = draw.textbbox(origin, text, font=font, anchor=anchor)
        draw.rectangle((left - line, top - line, right + line, bottom + line), fill=colour)
        draw.text(origin, text, fill="white", font=font, anchor=anchor)


def annotate_files(rows: list[dict[str, Any]], folder: Path, *, keep: Iterable[Path] = ()) -> list[Path]:
    """An annotated PNG in ``folder`` for every photo in ``rows`` (`jobs/predict.py`'s rows), named after the photo
    (its name's own bytes, the suffix ``.png``), with ``-1``, ``-2`` … added where a name is taken by this run or by a
    file in ``keep`` (the input photos, which are never overwritten); returns the files written."""
    protected = {path.resolve() for path in keep}
    by_file: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_file.setdefault(row["file"], []).append(row)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exn:
        raise FerdistError(f"cannot create --annotate {shown_name(folder)} ({exn.strerror}); choose another "
                           "folder") from None  # fmt: skip
    written: list[Path] = []
    for file, face_rows in by_file.items():
        stem, dest, n = Path(file).stem, folder / f"{Path(file).stem}.png", 0
        while dest in written or dest.resolve() in protected:
            n += 1
            dest = folder / f"{stem}-{n}.png"
        annotate(Path(file), face_rows, dest)
        written.append(dest)
    return written
