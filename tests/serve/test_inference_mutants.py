"""The Predictor's settings as behaviour: evaluation mode whatever the model was in, the batch size only splits the
work, and TTA averages a face with its mirror image (written for mutation testing, see MUTATION_RESULTS.md)."""

from __future__ import annotations

import numpy as np
import torch

from ferdist.config import ModelConfig
from ferdist.data.transforms import eval_transform
from ferdist.serve.inference import Predictor
from ferdist.train.model import build_model


def tiny_model() -> torch.nn.Module:
    cfg = ModelConfig(pretrained="random:tiny", image_size=32, freeze_blocks=0, head_dropout=0.5)
    return build_model(cfg, seed=0).train()  # in training mode, with dropout: Predictor must switch it off


def faces(n: int) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, size=(n, 48, 48), dtype=np.uint8)


def softmax(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = model(eval_transform(torch.from_numpy(x).unsqueeze(1), image_size=32))
    return torch.softmax(logits, dim=1).numpy()


def test_predictor_settings_are_what_it_was_given() -> None:
    # Kills Predictor.__init__ mutants that store another image_size, batch_size, tta or device, or skip model.eval().
    model = tiny_model()
    predictor = Predictor(model, image_size=32, batch_size=3, tta=True)
    assert (predictor.image_size, predictor.batch_size, predictor.tta) == (32, 3, True)
    assert predictor.device == torch.device("cpu") and predictor.model is model and not model.training
    assert Predictor(model, image_size=32).batch_size == 256 and Predictor(model, image_size=32).tta is False


def test_tta_averages_each_face_with_its_mirror_and_batches_change_nothing() -> None:
    # Kills Predictor.__init__ mutants of tta (TTA off or always on) and of eval() (dropout would make runs differ).
    model, x = tiny_model(), faces(5)
    plain = Predictor(model, image_size=32, batch_size=2).probabilities(x)
    np.testing.assert_allclose(plain, softmax(model.eval(), x), atol=1e-6)
    mirrored = softmax(model, x[:, :, ::-1].copy())
    tta = Predictor(model.train(), image_size=32, batch_size=2, tta=True).probabilities(x)
    np.testing.assert_allclose(tta, (plain + mirrored) / 2, atol=1e-6)
    assert np.abs(tta - plain).max() > 1e-4  # the faces are not symmetric: TTA changes the answer
    np.testing.assert_allclose(
        Predictor(model, image_size=32, batch_size=256, tta=True).probabilities(x), tta, atol=1e-6
    )
