"""Classifying the faces in images people have: photos or face crops, any size, grey or colour, pixels or files.

A photo's faces are found and cut out first (`ferdist.serve.faces`); a crop is one face as it is. Every face becomes
what the model was trained on, a uint8 48×48 grey face (PIL's ITU-R 601 luma, then a bilinear resize with
antialiasing), and then goes through the same `eval_transform` as validation (the model's `eval_crop` included). A
48×48 grey face therefore reaches the model bit-identical to the same face read from a shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch

from ferdist.config import ModelConfig
from ferdist.constants import FACE_SIDE, FER_CLASSES
from ferdist.data.images import to_pixels
from ferdist.data.transforms import eval_transform, to_model_input
from ferdist.errors import FerdistError
from ferdist.serve.faces import HAAR, Box, DetectMode, Detector, resize_face
from ferdist.train.model import FerClassifier

if TYPE_CHECKING:
    import pandas as pd


def to_face(image: Any, *, name: str = "image") -> np.ndarray:
    """uint8 ``[48, 48]``: the whole of ``image`` (see `to_pixels`) as one face, resized bilinearly with
    antialiasing. A 48×48 grey image comes back bit-identical."""
    return resize_face(to_pixels(image, name=name))


def read_image(path: Path) -> np.ndarray:
    """The pixels of image file ``path`` (see `to_pixels`)."""
    try:
        data = path.read_bytes()
    except OSError as exn:
        raise FerdistError(f"cannot read {path} ({exn.strerror})") from None
    return to_pixels(data, name=str(path))


TTAMode = Literal["none", "flip", "crops"]
"""Test-time augmentation: ``none``; ``flip``, the face and its mirror image averaged; ``crops``, ten views averaged
(the four corners and the centre, 42 of the face's 48 pixels square, each also mirrored: the ten-crop of the published
FER2013 results). Always reported apart from the plain number, never used to pick an epoch, a trial or the champion."""

TTA_MODES: tuple[str, ...] = get_args(TTAMode)
CROP_SIDE = 42 / FACE_SIDE
"""The side of each `crops` view as a fraction of the face's: whole pixels (42 of 48), so each view is an exact crop
of the face, then resized to the model's input like the face itself."""


def check_tta(mode: str | bool) -> TTAMode:
    """``mode`` as a `TTAMode` (True is ``flip`` and False ``none``, as the ``tta`` flag was before the modes)."""
    if isinstance(mode, bool):
        return "flip" if mode else "none"
    if mode not in TTA_MODES:
        raise FerdistError(f"unknown TTA mode {mode!r}; use one of {', '.join(TTA_MODES)}")
    return mode  # type: ignore[return-value]


def view_thetas(mode: TTAMode, *, eval_crop: float = 1.0) -> torch.Tensor | None:
    """The affine views ``[V, 2, 3]`` (output to input coordinates in [-1, 1], as `to_model_input` takes) whose
    probabilities `Predictor` averages; None for the plain view alone (``flip`` mirrors that view, the centre
    ``eval_crop`` of the face; ``crops`` are the published ten, whatever the model's own view)."""
    if mode == "none":
        return None
    if mode == "flip":
        c = eval_crop
        return torch.tensor([[[c, 0.0, 0.0], [0.0, c, 0.0]], [[-c, 0.0, 0.0], [0.0, c, 0.0]]])
    side, edge = CROP_SIDE, 1.0 - CROP_SIDE  # a crop centred at ±edge touches the face's border
    centres = [(0.0, 0.0), (-edge, -edge), (edge, -edge), (-edge, edge), (edge, edge)]
    return torch.tensor([[[side * mirror, 0.0, cx], [0.0, side, cy]] for cx, cy in centres for mirror in (1.0, -1.0)])


class Predictor:
    """Batched class probabilities from a trained classifier, on its device (bf16 autocast on CUDA)."""

    def __init__(
        self,
        model: FerClassifier,
        *,
        image_size: int,
        eval_crop: float = 1.0,
        batch_size: int = 256,
        tta: TTAMode | bool = "none",
    ) -> None:
        self.model = model.eval()
        self.image_size = image_size
        self.eval_crop = eval_crop
        """The centre of the face the model sees (`ferdist.config.ModelConfig.eval_crop`)."""
        self.batch_size = batch_size
        self.tta_mode: TTAMode = check_tta(tta)
        """Test-time augmentation (`TTAMode`)."""
        self.device = next(model.parameters()).device
        views = view_thetas(self.tta_mode, eval_crop=eval_crop)
        self.views = views.to(self.device) if views is not None else None  # once, not per batch

    @classmethod
    def of(cls, model: FerClassifier, cfg: ModelConfig, **options: Any) -> Predictor:
        """A predictor that feeds ``model`` the way its config says (its image_size and eval_crop)."""
        return cls(model, image_size=cfg.image_size, eval_crop=cfg.eval_crop, **options)

    @property
    def tta(self) -> bool:
        """Whether any test-time augmentation is on (`tta_mode` says which)."""
        return self.tta_mode != "none"

    def probabilities(self, faces: np.ndarray | Sequence[np.ndarray] | torch.Tensor) -> np.ndarray:
        """``[N, 7]`` float32 softmax probabilities for uint8 faces ``[N, 48, 48]`` (averaged over the TTA views)."""
        if not isinstance(faces, torch.Tensor):
            faces = torch.from_numpy(np.asarray(faces, dtype=np.uint8).reshape(-1, FACE_SIDE, FACE_SIDE))
        # A block rather than the decorator: mutation testing (mutmut) skips decorated functions.
        with torch.no_grad():
            out = [self._batch(faces[i : i + self.batch_size]) for i in range(0, len(faces), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(FER_CLASSES)), dtype=np.float32)

    def _batch(self, faces: torch.Tensor) -> np.ndarray:
        """One batch's probabilities: the face alone, or the mean over the TTA views."""
        chunk = faces.unsqueeze(1).to(self.device)
        if self.views is None:
            probs = self._softmax(eval_transform(chunk, image_size=self.image_size, crop=self.eval_crop))
        else:
            probs = torch.stack([self._softmax(to_model_input(chunk, image_size=self.image_size,
                                                              theta=view.expand(len(chunk), 2, 3)))
                                 for view in self.views]).mean(dim=0)  # fmt: skip
        return probs.cpu().numpy()

    def _softmax(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.model(inputs)
        return torch.softmax(logits.float(), dim=1)


def probability_columns() -> list[str]:
    return [f"p_{name.lower()}" for name in FER_CLASSES]


NO_FACE = "no face"
"""The ``label`` of an image in which no face was found (its ``face`` is -1, its probabilities NaN)."""

COLUMNS = ["image", "face", "x", "y", "w", "h", "label", *probability_columns(), "error"]


def classify(
    predictor: Predictor,
    images: Sequence[Any],
    *,
    detect: DetectMode = "auto",
    names: Sequence[str] | None = None,
    detector: Detector = HAAR,
) -> pd.DataFrame:
    """A DataFrame with a row per face found (`COLUMNS`): ``image`` (the input's index), ``face`` (0, 1, … largest
    first), its box ``x, y, w, h`` in the image's pixels, ``label`` and one probability per class. An image with no
    face gets one row labelled `NO_FACE`; one that cannot be read gets a row whose ``error`` says why, and the others
    are still classified. ``detect`` is a `ferdist.serve.faces.DetectMode`; ``detector`` finds the faces.
    """
    import pandas as pd

    from ferdist.serve.faces import check_mode, crop, is_crop

    check_mode(detect)  # an unknown mode fails before any work
    rows: list[dict[str, Any]] = []
    crops: list[np.ndarray] = []
    for index, item in enumerate(images):
        name = names[index] if names is not None else f"image {index}"
        row = {"image": index, "face": -1, "x": 0, "y": 0, "w": 0, "h": 0, "label": "", "error": ""}
        try:
            grey = to_pixels(item, name=name)
        except FerdistError as exn:
            rows.append({**row, "error": str(exn)})
            continue
        height, width = grey.shape
        if is_crop(grey, detect):
            found = [(Box(0, 0, width, height), resize_face(grey))]
        else:
            found = [(box, crop(grey, box)) for box in detector.find(grey)]
        if not found:
            rows.append({**row, "label": NO_FACE})
        for number, (box, face) in enumerate(found):
            rows.append({**row, "face": number, "x": box.x, "y": box.y, "w": box.w, "h": box.h})
            crops.append(face)
    probabilities = predictor.probabilities(np.stack(crops) if crops else np.zeros((0, FACE_SIDE, FACE_SIDE), np.uint8))
    table = pd.DataFrame(rows, columns=[c for c in COLUMNS if not c.startswith("p_")])
    full = np.full((len(rows), len(FER_CLASSES)), np.nan)
    has_face = (table["face"] >= 0).to_numpy() if rows else np.zeros(0, bool)
    full[has_face] = probabilities
    table.loc[has_face, "label"] = [FER_CLASSES[i] for i in probabilities.argmax(axis=1)] if len(probabilities) else []
    for k, column in enumerate(probability_columns()):
        table[column] = full[:, k]
    return table[COLUMNS].astype({c: "int64" for c in ("image", "face", "x", "y", "w", "h")})


def images_from_input(model_input: Any) -> list[Any]:
    """The images of an MLflow model input, in order: a DataFrame's ``image`` column (or its only column), a dict's
    ``image`` entry (the ``{"inputs": {"image": …}}`` request form), a uint8 array ``[N, H, W]`` / ``[N, H, W, 3]``
    (or one image ``[H, W]`` / ``[H, W, 3]``), or a list. Strings are base64 (how JSON carries bytes).

    Raises:
        FerdistError: the input holds no images where they are looked for.
    """
    import pandas as pd

    if isinstance(model_input, dict):
        if "image" not in model_input:
            raise FerdistError(f"the input has the fields {sorted(model_input)}; send the images as 'image'")
        model_input = model_input["image"]
    if isinstance(model_input, pd.DataFrame):
        if "image" in model_input.columns:
            items: list[Any] = model_input["image"].tolist()
        elif len(model_input.columns) == 1:
            items = model_input.iloc[:, 0].tolist()
        else:
            raise FerdistError(f"the input table has the columns {list(model_input.columns)}; put the images in "
                               "one column named 'image'")  # fmt: skip
    elif isinstance(model_input, np.ndarray) and model_input.dtype.kind in "uifb":
        # Channels last: [H, W] or [H, W, 1|3|4] is one image; [N, H, W] or [N, H, W, C] a batch.
        one = model_input.ndim == 2 or (model_input.ndim == 3 and model_input.shape[-1] in (1, 3, 4))
        items = [model_input] if one else list(model_input)
    elif isinstance(model_input, (list, tuple, np.ndarray, pd.Series)):
        items = list(model_input)
    else:
        items = [model_input]
    return [_from_json(item) for item in items]


def _from_json(item: Any) -> Any:
    """Base64 text as its bytes, a nested list of pixel values as an array; anything else as it is."""
    if isinstance(item, str):
        import base64
        import binascii

        try:
            return base64.b64decode("".join(item.split()), validate=True)  # MIME base64 breaks lines
        except (binascii.Error, ValueError):
            return item  # refused by to_pixels with the row's name
    if isinstance(item, list):
        return np.asarray(item)
    return item
