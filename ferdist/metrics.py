"""Classification metrics from a confusion matrix, so ranks can sum their matrices and agree on one answer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClassReport:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support from one confusion matrix."""

    accuracy: float
    macro_f1: float
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]


def report_from_confusion(confusion: np.ndarray) -> ClassReport:
    """``confusion[t, p]`` counts samples of true class t predicted as p.

    Macro-F1 averages over the classes that occur as a label or a prediction (scikit-learn's convention), so a
    class absent from a small split does not count as F1 = 0.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = (support > 0) | (predicted > 0)
    total = confusion.sum()
    return ClassReport(
        accuracy=float(tp.sum() / total) if total else 0.0,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        precision=precision.tolist(),
        recall=recall.tolist(),
        f1=f1.tolist(),
        support=support.tolist(),
    )
