"""Finding the faces in a photo and cutting each one out as FER2013 cut its faces: grey, square, 48×48.

FER2013's faces were found by a face detector and cropped to the box it returned. The detector here is OpenCV's
Haar cascade ``haarcascade_frontalface_alt2.xml`` (scale step 1.1, 4 neighbours), whose weights ship inside the
``opencv-python-headless`` 4.x wheel: nothing is downloaded at run time. Measured against the alternatives (README,
"Use the model on photos"): it finds 70 % of FER2013 PrivateTest faces placed on a plain background (MediaPipe's
short-range model finds 94 %, but no installable wheel ships it beside numpy 2 and this lock's protobuf), exactly
one face on scikit-image's astronaut where the default cascade finds a second, none on face-free pictures, and its
box is a centred square 0.965 × the side of FER2013's own crop, hence `MARGIN`.

A photo is searched at most `SEARCH_SIDE` pixels on its longer side: a face smaller than ~1/20 of a 4000 px photo
is not a face the classifier can read anyway, and the search then costs the same for every photo size. Boxes are
mapped back and the crop is cut from the full-resolution pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np

from ferdist.constants import FACE_SIDE
from ferdist.data.images import to_pixels
from ferdist.errors import FerdistError

DetectMode = Literal["auto", "on", "off"]
DETECT_MODES: tuple[str, ...] = ("auto", "on", "off")
"""``on``: search every image for faces; ``off``: every image is one face, already cropped; ``auto``: images no
larger than `CROP_SIDE` on both sides are crops (a FER2013 row, a face cut out by another tool), the others photos."""

CROP_SIDE = 96
"""``auto`` takes an image this small (on both sides) as a face crop: too small to hold a face worth searching for."""

SEARCH_SIDE = 1280
"""Photos are searched for faces at most this many pixels on their longer side (see the module docstring)."""

MARGIN = 0.02
"""Border added on each side of a detected box, as a fraction of its side, before the crop is resized to 48×48: the
cascade's box is 0.965 × FER2013's crop of the same face (median over 1000 PrivateTest faces), so 2 % makes it up."""


@dataclass(frozen=True)
class Box:
    """A face's square in the photo's pixels: left, top, width, height."""

    x: int
    y: int
    w: int
    h: int

    def iou(self, other: Box) -> float:
        """Intersection over union of the two boxes (0 when they do not overlap)."""
        ix = max(0, min(self.x + self.w, other.x + other.w) - max(self.x, other.x))
        iy = max(0, min(self.y + self.h, other.y + other.h) - max(self.y, other.y))
        inter = ix * iy
        return inter / float(self.w * self.h + other.w * other.h - inter) if inter else 0.0


def check_mode(mode: str) -> None:
    """Raises `FerdistError` for a ``detect`` value that is not one of `DETECT_MODES`."""
    if mode not in DETECT_MODES:
        raise FerdistError(f"detect={mode!r} is not a detection mode; use one of {', '.join(DETECT_MODES)}")


def is_crop(grey: np.ndarray, mode: DetectMode) -> bool:
    """Whether ``grey`` is taken as one face as it is (``off``, or ``auto`` and small) rather than searched."""
    check_mode(mode)
    return mode == "off" or (mode == "auto" and max(grey.shape[:2]) <= CROP_SIDE)


@dataclass(frozen=True)
class Detector:
    """An OpenCV Haar cascade and how it searches; `HAAR` is ferdist's, the others are measured against it."""

    cascade: str = "haarcascade_frontalface_alt2.xml"
    """A file in ``cv2.data.haarcascades``."""
    scale_factor: float = 1.1
    """Step between the sizes searched: 1.05 finds ~4 points more of FER2013's faces at twice the time."""
    min_neighbors: int = 4
    """Overlapping hits a box needs: fewer finds more faces and more things that are not faces."""

    def find(self, grey: np.ndarray) -> list[Box]:
        """The faces in ``grey`` (uint8 ``[H, W]``; any other image goes through `ferdist.data.images.to_pixels`),
        largest first, as boxes in its pixels."""
        import cv2

        if grey.ndim != 2 or grey.dtype != np.uint8:
            grey = to_pixels(grey, name="the image searched for faces")
        height, width = grey.shape
        scale = min(1.0, SEARCH_SIDE / max(height, width))
        if min(height, width) * scale < 30:  # thinner than the smallest face searched for (a 1×4000 strip)
            return []
        small = grey if scale == 1.0 else cv2.resize(grey, (round(width * scale), round(height * scale)),
                                                     interpolation=cv2.INTER_AREA)  # fmt: skip
        # No histogram equalisation: it cost 20 points of recall on FER2013's faces (README, "Use the model on
        # photos").
        min_side = max(30, round(min(small.shape) / 20))
        found = _cascade(self.cascade).detectMultiScale(np.ascontiguousarray(small), scaleFactor=self.scale_factor,
                                                        minNeighbors=self.min_neighbors,
                                                        minSize=(min_side, min_side))  # fmt: skip
        boxes = [Box(round(x / scale), round(y / scale), round(w / scale), round(h / scale)) for x, y, w, h in found]
        return sorted(boxes, key=lambda b: (-b.w * b.h, b.y, b.x))


HAAR = Detector()


@cache
def _cascade(name: str):  # noqa: ANN202 - cv2's classifier type
    import cv2

    path = cv2.data.haarcascades + name
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise FerdistError(f"OpenCV could not load its face detector {path}; reinstall opencv-python-headless<5")
    return cascade


def find_faces(grey: np.ndarray, detector: Detector = HAAR) -> list[Box]:
    """The faces in uint8 grey pixels ``[H, W]``, largest first (see `Detector.find`)."""
    return detector.find(grey)


def crop(grey: np.ndarray, box: Box, *, margin: float = MARGIN) -> np.ndarray:
    """The face in ``box`` as uint8 ``[48, 48]``: the box grown by ``margin`` of its side on each side, squared,
    padded with the photo's edge pixels where it leaves the photo, and resized as `ferdist.serve.inference.to_face`
    resizes (bilinear with antialiasing), so a crop reaches the model as a whole-image face of the same pixels would.
    """
    side = round(max(box.w, box.h) * (1 + 2 * margin))
    left = box.x + box.w // 2 - side // 2
    top = box.y + box.h // 2 - side // 2
    height, width = grey.shape
    window = grey[max(0, top) : min(height, top + side), max(0, left) : min(width, left + side)]
    # Only the window is padded (never the whole photo), by what lies outside the photo on each side.
    square = np.pad(window, ((max(0, -top), max(0, top + side - height)), (max(0, -left), max(0, left + side - width))),
                    mode="edge")  # fmt: skip
    return resize_face(np.ascontiguousarray(square))


def resize_face(grey: np.ndarray) -> np.ndarray:
    """uint8 grey pixels as the 48×48 face the model reads: bilinear with antialiasing (a 48×48 image unchanged)."""
    from PIL import Image

    if grey.shape == (FACE_SIDE, FACE_SIDE):
        return grey
    face = Image.fromarray(grey).resize((FACE_SIDE, FACE_SIDE), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(face, dtype=np.uint8)
