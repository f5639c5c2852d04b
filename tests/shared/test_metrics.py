"""Metrics from a confusion matrix, checked against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from ferdist.metrics import report_from_confusion


def test_accuracy_macro_f1_and_per_class_values() -> None:
    confusion = np.zeros((7, 7), dtype=int)
    confusion[0, 0], confusion[0, 1] = 8, 2  # class 0: 10 samples, 8 right
    confusion[1, 1], confusion[1, 0] = 3, 1  # class 1: 4 samples, 3 right
    confusion[3, 3] = 5  # class 3: all right; classes 2, 4-6 absent and never predicted
    report = report_from_confusion(confusion)
    assert report.accuracy == pytest.approx(16 / 19)
    p0, r0 = 8 / 9, 8 / 10
    p1, r1 = 3 / 5, 3 / 4
    f0, f1 = 2 * p0 * r0 / (p0 + r0), 2 * p1 * r1 / (p1 + r1)
    assert report.f1[:2] == pytest.approx([f0, f1]) and report.f1[3] == 1.0
    assert report.macro_f1 == pytest.approx((f0 + f1 + 1.0) / 3)  # absent classes do not count as zeros
    assert report.support == [10, 4, 0, 5, 0, 0, 0]


def test_a_class_predicted_but_absent_counts_as_zero() -> None:
    confusion = np.zeros((7, 7), dtype=int)
    confusion[0, 0], confusion[0, 2] = 1, 1
    report = report_from_confusion(confusion)
    assert report.macro_f1 == pytest.approx((2 * 1 * 0.5 / 1.5 + 0.0) / 2)
