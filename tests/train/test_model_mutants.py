"""The model settings reach the classifier: pooling, the frozen prefix, the head's dropout and its seven classes
(written for mutation testing, see MUTATION_RESULTS.md)."""

from __future__ import annotations

from ferdist.config import ModelConfig
from ferdist.constants import FER_CLASSES
from ferdist.train.model import build_model


def test_classifier_on_passes_every_model_setting() -> None:
    # Kills classifier_on mutants that drop or swap pooling, freeze_blocks, head_dropout or num_classes.
    cfg = ModelConfig(pretrained="random:tiny", image_size=32, freeze_blocks=3, pooling="mean", head_dropout=0.3)
    model = build_model(cfg, seed=0)
    assert (model.pooling, model.freeze_blocks, model.dropout.p) == ("mean", 3, 0.3)
    assert model.head.out_features == len(FER_CLASSES) == 7 and model.head.in_features == 96
    frozen = {
        n.split(".")[2] for n, p in model.named_parameters() if n.startswith("backbone.layers.") and not p.requires_grad
    }
    assert frozen == {"0", "1", "2"}
