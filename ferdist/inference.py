"""Classifying face images people have: any size, grey or colour, raw pixels or encoded files.

Every image becomes what the model was trained on, a uint8 48×48 grey face (PIL's ITU-R 601 luma, then a bilinear
resize with antialiasing), and then goes through the same `eval_transform` as validation. A 48×48 grey face therefore
reaches the model bit-identical to the same face read from a shard.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ferdist.constants import FACE_SIDE, FER_CLASSES
from ferdist.errors import FerdistError
from ferdist.images import array_to_uint8, grey_pixels
from ferdist.model import FerClassifier
from ferdist.transforms import eval_transform


def to_face(image: Any, *, name: str = "image") -> np.ndarray:
    """uint8 ``[48, 48]`` from encoded bytes (PNG, JPEG, …), a PIL image, or an array ``[H, W]`` / ``[H, W, C]``.

    Raises:
        FerdistError: ``name`` is not an image (undecodable bytes, a wrong shape).
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            image = Image.open(io.BytesIO(bytes(image)))
            image.load()
        except (UnidentifiedImageError, OSError) as exn:
            raise FerdistError(f"{name} is not an image PIL can read ({exn}); pass PNG/JPEG/BMP bytes") from None
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or min(array.shape[:2]) < 1:
            raise FerdistError(f"{name} has shape {array.shape}; pass [H, W] grey or [H, W, 3|4] colour pixels")
        # By the array's type: uint16 is 16-bit (÷ 257), floats are 0-1 or 0-255; anything outside is refused.
        image = Image.fromarray(array_to_uint8(array, name=name))
    if not isinstance(image, Image.Image):
        raise FerdistError(f"{name} is a {type(image).__name__}; pass image bytes, a PIL image or a uint8 array")
    grey = Image.fromarray(grey_pixels(image, name=name))
    if grey.size != (FACE_SIDE, FACE_SIDE):
        grey = grey.resize((FACE_SIDE, FACE_SIDE), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(grey, dtype=np.uint8)


def read_image(path: Path) -> np.ndarray:
    """The face in image file ``path`` (see `to_face`)."""
    try:
        data = path.read_bytes()
    except OSError as exn:
        raise FerdistError(f"cannot read {path} ({exn.strerror})") from None
    return to_face(data, name=str(path))


class Predictor:
    """Batched class probabilities from a trained classifier, on its device (bf16 autocast on CUDA)."""

    def __init__(self, model: FerClassifier, *, image_size: int, batch_size: int = 256, tta: bool = False) -> None:
        self.model = model.eval()
        self.image_size = image_size
        self.batch_size = batch_size
        self.tta = tta
        """Also classify each face mirrored and average the two probability vectors (horizontal-flip TTA)."""
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def probabilities(self, faces: np.ndarray | Sequence[np.ndarray] | torch.Tensor) -> np.ndarray:
        """``[N, 7]`` float32 softmax probabilities for uint8 faces ``[N, 48, 48]``."""
        if not isinstance(faces, torch.Tensor):
            faces = torch.from_numpy(np.asarray(faces, dtype=np.uint8).reshape(-1, FACE_SIDE, FACE_SIDE))
        out = []
        for start in range(0, len(faces), self.batch_size):
            chunk = faces[start : start + self.batch_size].unsqueeze(1).to(self.device)
            probs = self._softmax(chunk)
            if self.tta:
                probs = (probs + self._softmax(torch.flip(chunk, dims=[-1]))) / 2
            out.append(probs.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(FER_CLASSES)), dtype=np.float32)

    def _softmax(self, chunk: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.model(eval_transform(chunk, image_size=self.image_size))
        return torch.softmax(logits.float(), dim=1)


def probability_columns() -> list[str]:
    return [f"p_{name.lower()}" for name in FER_CLASSES]


def as_table(probabilities: np.ndarray) -> Any:
    """A DataFrame: ``label`` (the most likely class name), then one probability column per class."""
    import pandas as pd

    table = pd.DataFrame(probabilities.astype(np.float64), columns=probability_columns())
    table.insert(0, "label", [FER_CLASSES[i] for i in probabilities.argmax(axis=1)] if len(probabilities) else [])
    return table


def faces_from_input(model_input: Any) -> np.ndarray:
    """uint8 faces ``[N, 48, 48]`` from a DataFrame with an ``image`` column, an array batch, or a list of images."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise FerdistError(f"the input table has columns {list(model_input.columns)}; put the images in 'image'")
        items: Iterable[Any] = model_input["image"].tolist()
    elif isinstance(model_input, np.ndarray) and model_input.dtype != object:
        # [H, W] is one grey face; [N, H, W] (or [N, H, W, C]) a batch.
        items = [model_input] if model_input.ndim == 2 else list(model_input)
    else:
        items = list(model_input) if isinstance(model_input, (list, tuple, np.ndarray)) else [model_input]
    faces = [to_face(item, name=f"image {i}") for i, item in enumerate(items)]
    return np.stack(faces) if faces else np.zeros((0, FACE_SIDE, FACE_SIDE), dtype=np.uint8)
