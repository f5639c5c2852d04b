"""Photos end to end (decode + detect + crop + classify), per face detector: photos/s for 640×480 JPEGs with 1 and
4 faces, and how many of FER2013's PrivateTest faces each detector finds (where the real CSV is at hand).

The photos are scikit-image's astronaut's head pasted on a gradient at several places and sizes; the recall set is
the first 1000 PrivateTest faces, each scaled to 144 px in the middle of a 288 px grey square (FER2013's crops are
tight: a detector needs some background around the face), a hit being a box with IoU ≥ 0.5 against that square.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ferdist.serve.faces import HAAR, Box, Detector

DETECTORS = {
    "haar alt2 1.1/4 (ferdist)": HAAR,
    "haar default 1.1/5": Detector("haarcascade_frontalface_default.xml", 1.1, 5),
    "haar alt2 1.05/4": Detector("haarcascade_frontalface_alt2.xml", 1.05, 4),
}
"""Name (cascade, scale step / neighbours) → detector."""
PLACES = [(40, 120, 1.0, False), (380, 60, 1.3, True), (250, 250, 0.8, False), (500, 330, 0.7, True)]
"""(left, top, scale, mirrored) of each pasted head; a photo with n faces uses the first n."""


def photo(faces: int) -> bytes:
    """A 640×480 colour JPEG with the astronaut's head pasted ``faces`` times."""
    from PIL import Image
    from skimage import data

    head = Image.fromarray(data.astronaut()[40:200, 150:300])
    y, x = np.mgrid[0:480, 0:640]
    pixels = np.stack([90 + x / 8, 110 + y / 6, 140 + (x + y) / 20], axis=-1).clip(0, 255).astype(np.uint8)
    for left, top, scale, mirrored in PLACES[:faces]:
        pasted = head.resize((round(150 * scale), round(160 * scale)), Image.Resampling.BICUBIC)
        if mirrored:
            pasted = pasted.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels[top : top + pasted.height, left : left + pasted.width] = np.asarray(pasted)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def fer_recall(detector: Detector, faces: np.ndarray) -> tuple[float, int]:
    """(share of ``faces`` found with IoU ≥ 0.5, boxes elsewhere) for uint8 faces ``[N, 48, 48]``."""
    from PIL import Image

    truth, hits, extra = Box(72, 72, 144, 144), 0, 0
    for face in faces:
        canvas = np.full((288, 288), 128, np.uint8)
        canvas[72:216, 72:216] = np.asarray(Image.fromarray(face).resize((144, 144), Image.Resampling.BILINEAR))
        found = detector.find(canvas)
        hits += any(box.iou(truth) >= 0.5 for box in found)
        extra += sum(box.iou(truth) < 0.3 for box in found)
    return hits / len(faces), extra


def privatetest_faces(source: Path, count: int) -> np.ndarray | None:
    if not source.exists():
        return None
    from ferdist.data.sources import open_source

    opened = open_source(source)
    return opened.load(opened.splits["test"][:count]).images


def bench_photos(console: Console, *, photos: int, source: Path) -> dict:
    import cv2

    from ferdist.config import ModelConfig
    from ferdist.serve.inference import Predictor, classify
    from ferdist.train.model import build_model

    model = build_model(ModelConfig(pretrained="random:tiny", image_size=32, freeze_blocks=0), seed=0)
    predictor = Predictor(model, image_size=32)
    fer = privatetest_faces(source, 1000)
    table = Table(title=f"photos end to end, 640×480 JPEG, CPU ({cv2.getNumThreads()} OpenCV threads), "
                  "quick-start model (random:tiny at 32 px)")  # fmt: skip
    for column in ("detector", "1 face: photos/s", "4 faces: photos/s", "faces found (1 / 4)", "FER2013 found"):
        table.add_column(column, justify="left" if column == "detector" else "right")
    results: dict = {"photos": photos, "opencv": cv2.__version__}
    jpegs = {n: [photo(n)] * photos for n in (1, 4)}
    for name, detector in DETECTORS.items():
        row: dict = {"cascade": detector.cascade, "scale_factor": detector.scale_factor,
                     "min_neighbors": detector.min_neighbors}  # fmt: skip
        for n, batch in jpegs.items():
            classify(predictor, batch[:2], detect="on", detector=detector)  # warm-up
            started = time.perf_counter()
            found = classify(predictor, batch, detect="on", detector=detector)
            row[f"faces_{n}"] = {"photos_s": photos / (time.perf_counter() - started),
                                 "found_per_photo": int((found["face"] >= 0).sum()) / photos}  # fmt: skip
        if fer is not None:
            recall, extra = fer_recall(detector, fer)
            row["fer2013_privatetest_recall"], row["fer2013_extra_boxes"] = recall, extra
        results[name] = row
        table.add_row(name, f"{row['faces_1']['photos_s']:.1f}", f"{row['faces_4']['photos_s']:.1f}",
                      f"{row['faces_1']['found_per_photo']:g} / {row['faces_4']['found_per_photo']:g}",
                      f"{row['fer2013_privatetest_recall']:.1%}" if fer is not None else "no CSV")  # fmt: skip
    console.print(table)
    return results
