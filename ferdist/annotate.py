"""Photos with each face's box and expression drawn on them (`jobs/predict.py --annotate`)."""

from __future__ import annotations

from pathlib import Path

from ferdist.constants import FER_CLASSES

COLOURS = {"Angry": "#d62728", "Disgust": "#8c564b", "Fear": "#9467bd", "Happy": "#2ca02c", "Sad": "#1f77b4",
           "Surprise": "#ff7f0e", "Neutral": "#7f7f7f"}  # fmt: skip
"""One colour per class (matplotlib's tab10), so a page of annotated photos reads at a glance."""


def annotate(path: Path, rows: list[dict], dest: Path) -> None:
    """Writes photo ``path`` in colour to ``dest`` (PNG) with a box and "Label 87%" for each face row in ``rows``."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    with Image.open(path) as opened:
        # The boxes are in the upright photo's pixels (`ferdist.images.grey_pixels` applies EXIF rotation).
        image = ImageOps.exif_transpose(opened).convert("RGB")
    draw = ImageDraw.Draw(image)
    line = max(2, round(max(image.size) / 300))
    font = ImageFont.load_default(size=max(12, round(max(image.size) / 40)))
    for row in rows:
        if row["face"] < 0:
            continue
        colour = COLOURS[row["label"]]
        box = (row["x"], row["y"], row["x"] + row["w"], row["y"] + row["h"])
        draw.rectangle(box, outline=colour, width=line)
        probability = row["p_" + row["label"].lower()]
        text = f"{row['label']} {probability:.0%}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text, font=font, anchor="lb")
        draw.rectangle((left - line, top - line, right + line, bottom), fill=colour)
        draw.text((box[0], box[1]), text, fill="white", font=font, anchor="lb")
    dest.parent.mkdir(parents=True, exist_ok=True)
    image.save(dest, format="PNG")


def annotate_files(rows: list[dict], folder: Path) -> list[Path]:
    """An annotated PNG in ``folder`` for every photo in ``rows`` (`jobs/predict.py`'s rows), named after the photo
    (``-1``, ``-2`` … added where two photos share a name); returns the files written."""
    by_file: dict[str, list[dict]] = {}
    for row in rows:
        by_file.setdefault(row["file"], []).append(row)
    written: list[Path] = []
    for file, face_rows in by_file.items():
        stem, dest, n = Path(file).stem, folder / f"{Path(file).stem}.png", 0
        while dest in written:
            n += 1
            dest = folder / f"{stem}-{n}.png"
        annotate(Path(file), face_rows, dest)
        written.append(dest)
    return written


assert set(COLOURS) == set(FER_CLASSES)
