"""Prediction and bf16: the Predictor autocasts to bf16 on CUDA only (ferdist.serve.inference), so on the CPU it must be
plain fp32, and the same model's probabilities under PyTorch's CPU bf16 autocast stay within a stated tolerance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ferdist.data.transforms import eval_transform
from ferdist.serve.export import check_faces
from ferdist.serve.inference import Predictor
from ferdist.train.checkpoint import load_classifier


def test_cpu_prediction_is_fp32_and_bf16_autocast_stays_close(tiny_checkpoint: Path) -> None:
    """Catches the Predictor autocasting on the CPU (it must be fp32 there, bit for bit the plain forward pass), and
    bounds what its CUDA bf16 path costs this model: probabilities within 0.02 of fp32's, the same top class on at
    least 95 % of 128 faces. The Predictor's own bf16 branch runs on CUDA only; its autocast is measured here by
    hand on the CPU with the same calls (eval_transform, the model, softmax in fp32)."""
    model, cfg = load_classifier(tiny_checkpoint)
    model.eval()
    faces = check_faces(128, seed=3)
    predictor = Predictor(model, image_size=cfg.model.image_size, batch_size=128)
    got = predictor.probabilities(faces)
    inputs = eval_transform(torch.from_numpy(faces).unsqueeze(1), image_size=cfg.model.image_size)
    with torch.no_grad():
        fp32 = torch.softmax(model(inputs).float(), dim=1).numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(inputs)
        assert logits.dtype == torch.bfloat16  # CPU autocast really ran the model in bf16
        bf16 = torch.softmax(logits.float(), dim=1).numpy()
    assert got.dtype == np.float32 and np.array_equal(got, fp32)
    assert 0 < np.abs(bf16 - fp32).max() < 0.02
    assert (bf16.argmax(1) == fp32.argmax(1)).mean() >= 0.95
