"""Any image (a PIL image or a pixel array, of any bit depth) as the 8-bit grey pixels ferdist trains on.

Pillow's ``convert("L")`` is right for 8-bit images but not for the others: it clips a 16-bit grey PNG's 0–65535
values at 255, so a face becomes all white, and a float image in 0–1 becomes black. Every place that turns an image
into pixels (image-folder sources, shards written by other tools, the predictor) goes through `grey_pixels` or
`array_to_uint8`, which scale each bit depth to 0–255 and refuse what has no defined range.
"""

from __future__ import annotations

import io
import warnings
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


MAX_PIXELS = 50_000_000
"""Largest image read, in pixels (a 50-megapixel photo; ~150 MB decoded). Checked from the file's header before it is
decoded, so a 10,000 × 10,000 upload is refused without the memory it would take."""


def to_pixels(image: Any, *, name: str = "image") -> np.ndarray:
    """uint8 grey ``[H, W]`` at full size from encoded bytes (PNG, JPEG, …), a PIL image, or an array ``[H, W]`` /
    ``[H, W, C]``: colour through ITU-R 601 luma, other bit depths scaled (`ferdist.data.images`).

    Raises:
        FerdistError: ``name`` is not an image (undecodable or empty bytes, a wrong shape), or is over `MAX_PIXELS`.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            with warnings.catch_warnings():  # PIL warns above 89 MP; _check_size below says it in ferdist's words
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(bytes(image)))  # reads the header only
        except Image.DecompressionBombError:
            raise FerdistError(f"{name} is over {Image.MAX_IMAGE_PIXELS * 2 / 1e6:.0f} megapixels; downscale it "
                               "first") from None  # fmt: skip
        except (UnidentifiedImageError, OSError):
            what = "empty" if not bytes(image) else f"{len(bytes(image)):,} bytes of no image format PIL knows"
            raise FerdistError(f"{name} is not an image ({what}); send PNG, JPEG, BMP, WebP or TIFF bytes") from None
        _check_size(image.size[0], image.size[1], name=name)
        try:
            image.load()
        except (OSError, ValueError) as exn:
            raise FerdistError(f"{name} is a damaged {image.format} file ({exn}); send the file again") from None
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or min(array.shape[:2]) < 1:
            raise FerdistError(f"{name} has shape {array.shape}; pass [H, W] grey or [H, W, 3|4] colour pixels")
        _check_size(array.shape[1], array.shape[0], name=name)
        # By the array's type: uint16 is 16-bit (÷ 257), floats are 0-1 or 0-255; anything outside is refused.
        image = Image.fromarray(array_to_uint8(array, name=name))
    if isinstance(image, str):
        raise FerdistError(f"{name} is text that is not base64; send the image file's bytes, base64-encoded in JSON")
    if not isinstance(image, Image.Image):
        raise FerdistError(f"{name} is a {type(image).__name__}; pass image bytes, a PIL image or a uint8 array")
    _check_size(image.size[0], image.size[1], name=name)
    return grey_pixels(image, name=name)


def _check_size(width: int, height: int, *, name: str) -> None:
    if width * height > MAX_PIXELS:
        raise FerdistError(f"{name} is {width}×{height} ({width * height / 1e6:.0f} megapixels), over the "
                           f"{MAX_PIXELS / 1e6:.0f} megapixels ferdist reads; downscale it first")  # fmt: skip
    if width < 1 or height < 1:
        raise FerdistError(f"{name} is {width}×{height} pixels, an empty image")
