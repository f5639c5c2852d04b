"""Class-balanced sampling's draw weights: inverse class frequency in training, none in evaluation or with natural
sampling, and no weight for a class the split lacks (written for mutation testing, see MUTATION_RESULTS.md)."""

from __future__ import annotations

import numpy as np
import pytest

from ferdist.config import DataConfig
from ferdist.data.loader import Selection, _ShardStream


def stream(counts: tuple[int, ...], *, sampling: str, training: bool) -> _ShardStream:
    selection = Selection(name="split 'train'", shards=(), class_counts=counts)
    return _ShardStream(selection, DataConfig(sampling=sampling), rank=0, world_size=1, epoch=0, seed=0,
                        training=training, batch_size=8)  # fmt: skip


def test_class_balanced_training_weighs_each_class_by_its_inverse_frequency() -> None:
    # Kills _ShardStream.class_weights mutants of 1.0 / counts, of the zero-count guard, of the dtype, and of its
    # out=np.zeros_like(counts) (→ None or dropped: the absent class would get whatever memory NumPy reuses).
    junk = [np.full(7, 9.0) for _ in range(8)]  # NumPy's small-block cache now holds memory that reads as 9.0
    del junk
    weights = stream((4, 0, 2, 8, 1, 5, 10), sampling="class_balanced", training=True).class_weights()
    assert weights is not None and weights.dtype == np.float64
    np.testing.assert_array_equal(weights, [0.25, 0.0, 0.5, 0.125, 1.0, 0.2, 0.1])


@pytest.mark.parametrize(("sampling", "training"), [("natural", True), ("class_balanced", False), ("natural", False)])
def test_no_weights_unless_training_with_class_balanced_sampling(sampling: str, training: bool) -> None:
    # Kills _ShardStream.class_weights mutants of `not self.training or sampling != "class_balanced"` (and ↔ or, ==).
    assert stream((4, 1, 2, 8, 1, 5, 10), sampling=sampling, training=training).class_weights() is None
