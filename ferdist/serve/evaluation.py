"""A trained model on one split of a shard set: confusion matrix and per-class report, optionally with flip TTA.

The probabilities come from `ferdist.serve.inference.Predictor`, the code path `jobs/predict.py` and the logged MLflow
model use, so what this reports is what users get.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ferdist.config import DataConfig
from ferdist.constants import NUM_CLASSES
from ferdist.data.loader import ShardedDataset, build_loader
from ferdist.errors import FerdistError
from ferdist.metrics import ClassReport, report_from_confusion
from ferdist.serve.inference import Predictor


@dataclass(frozen=True)
class Evaluation:
    split: str
    confusion: np.ndarray
    """``[7, 7]`` counts, rows = true class."""
    report: ClassReport
    tta: bool
    """Whether test-time augmentation was on (`tta_mode` says which; its numbers are reported apart)."""
    tta_mode: str = "none"

    @property
    def tta_label(self) -> str:
        """`` (flip TTA)`` / `` (ten-crop TTA)`` for titles, empty without TTA."""
        return {"none": "", "flip": " (flip TTA)", "crops": " (ten-crop TTA)"}[self.tta_mode]

    @property
    def tta_suffix(self) -> str:
        """The suffix of this evaluation's metric and tag names: ``_tta`` (flip, as before the modes) or
        ``_tta_crops``."""
        return {"none": "", "flip": "_tta", "crops": "_tta_crops"}[self.tta_mode]


def evaluate_split(predictor: Predictor, dataset: ShardedDataset, split: str, *, batch_size: int = 256) -> Evaluation:
    """Every sample of ``split`` classified once.

    Raises:
        FerdistError: the split is absent from the manifest, or fewer samples were read than it lists.
    """
    expected = dataset.manifest.split(split).samples
    loader = build_loader(dataset, split, DataConfig(manifest=dataset.base_uri, loader_workers=0),
                          batch_size=batch_size, rank=0, world_size=1, training=False)  # fmt: skip
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for batch in loader:
        predicted = predictor.probabilities(batch["image"][:, 0]).argmax(axis=1)
        np.add.at(confusion, (batch["label"].numpy(), predicted), 1)
    if confusion.sum() != expected:
        raise FerdistError(f"read {confusion.sum()} samples of '{split}', the manifest lists {expected}")
    return Evaluation(split, confusion, report_from_confusion(confusion), predictor.tta, predictor.tta_mode)
