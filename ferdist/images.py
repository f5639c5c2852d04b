"""Any image (a PIL image or a pixel array, of any bit depth) as the 8-bit grey pixels ferdist trains on.

Pillow's ``convert("L")`` is right for 8-bit images but not for the others: it clips a 16-bit grey PNG's 0–65535
values at 255, so a face becomes all white, and a float image in 0–1 becomes black. Every place that turns an image
into pixels (image-folder sources, shards written by other tools, the predictor) goes through `grey_pixels` or
`array_to_uint8`, which scale each bit depth to 0–255 and refuse what has no defined range.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ferdist.errors import FerdistError

# Pillow's modes with more than 8 bits per channel: grey 16-bit (several byte orders) and 32-bit int / float.
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I;16BS", "I;16LS"}


def grey_pixels(image: Any, *, name: str) -> np.ndarray:
    """uint8 ``[H, W]`` luma of a PIL image, with 16-bit and float images scaled to 0–255 (not clipped).

    Colour goes through Pillow's ITU-R 601 luma (``convert("L")``), EXIF rotation is applied, and a palette or alpha
    channel is dropped as Pillow does. Raises `FerdistError` naming ``name`` for a mode with no defined range.
    """
    from PIL import ImageOps

    if getattr(image, "getexif", None) is not None and image.getexif().get(0x0112, 1) != 1:
        image = ImageOps.exif_transpose(image)  # a phone photo stored sideways, with an orientation tag
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        return array_to_uint8(_wide_array(image), name=name, sixteen_bit=mode != "F")
    return np.asarray(image.convert("L"), dtype=np.uint8)


def _wide_array(image: Any) -> np.ndarray:
    """The pixels of a 16/32-bit or float image as a numpy array of its own range."""
    if image.mode in _SIXTEEN_BIT:
        # numpy has no view of every byte order Pillow knows; mode "I" (int32) holds each of them exactly.
        image = image.convert("I") if image.mode not in ("I;16", "I;16L", "I;16B") else image
    return np.asarray(image)


def array_to_uint8(array: np.ndarray, *, name: str, sixteen_bit: bool | None = None) -> np.ndarray:
    """``array`` as uint8 by its type's range: 8-bit as is, 16-bit ÷ 257, bool × 255, floats in 0–1 or 0–255.

    ``sixteen_bit`` says a wide integer array holds 16-bit samples (Pillow's mode "I" from a 16-bit PNG); by default
    only a uint16/int16 array does. Raises `FerdistError` naming ``name`` for values outside the range its type
    implies (a negative pixel, a 32-bit value, NaN), never clipping them into a plausible face.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.size == 0:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise FerdistError(f"{name} has NaN or infinite pixel values; save it as an 8-bit image")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 255:
            raise FerdistError(
                f"{name} has floating-point pixels from {low:g} to {high:g}, outside 0-1 and 0-255; "
                "save it as an 8-bit image"
            )
        scaled = array * 255.0 if high <= 1.0 else array
        return np.rint(scaled).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        wide = sixteen_bit if sixteen_bit is not None else array.dtype.itemsize == 2
        top = 65535 if wide else 255
        if low < 0 or high > top:
            raise FerdistError(
                f"{name} has pixel values from {low} to {high}, outside the 0-{top} of a {16 if wide else 8}-bit "
                "image; save it as an 8- or 16-bit image"
            )
        if wide:
            # 0-65535 onto 0-255 with rounding: 65535 / 257 = 255 exactly.
            return ((array.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
        return array.astype(np.uint8)
    raise FerdistError(f"{name} has pixels of type {array.dtype}; pass uint8 (or 16-bit / float) pixels")
