"""Ten-crop test-time augmentation (``tta=crops``) in the predictor, evaluate.py, predict.py and the served model:
each view an exact 42×42 crop of the face (or its mirror) resized like the face, the ten probability vectors
averaged, reported apart from the plain number."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ferdist.constants import IMAGENET_MEAN, IMAGENET_STD
from ferdist.errors import FerdistError
from ferdist.serve.inference import Predictor, check_tta, view_thetas
from ferdist.train.checkpoint import load_classifier

CORNERS = [(3, 3), (0, 0), (0, 6), (6, 0), (6, 6)]  # (top, left) of the centre, then the 4 corners, as view_thetas


def faces(count: int, seed: int = 0) -> np.ndarray:
    """Structured uint8 faces (a ramp plus noise), so a crop, a mirror or a shift each change the pixels."""
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(48), 2 * np.arange(48)).astype(np.float64)
    return np.clip(ramp[None] + rng.normal(0, 40, (count, 48, 48)), 0, 255).astype(np.uint8)


def model_input(crop: np.ndarray, size: int) -> torch.Tensor:
    """The crop resized and normalised as the model's input, computed without the affine sampler."""
    x = torch.from_numpy(crop.astype(np.float32) / 255.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_modes_and_their_bad_input() -> None:
    assert check_tta(True) == "flip" and check_tta(False) == "none" and check_tta("crops") == "crops"
    with pytest.raises(FerdistError, match=r"^unknown TTA mode 'ten'; use one of none, flip, crops$"):
        check_tta("ten")
    assert view_thetas("none") is None and len(view_thetas("flip")) == 2 and len(view_thetas("crops")) == 10


def test_crops_average_ten_exact_crops_and_their_mirrors(tiny_checkpoint: Path) -> None:
    """Catches a view that is not the stated crop (a wrong corner, scale or mirror), views averaged wrongly, or the
    crops mode ignored: the probabilities equal the mean over the ten crops cut with numpy, each classified alone."""
    model, cfg = load_classifier(tiny_checkpoint)
    size, batch = cfg.model.image_size, faces(6)
    with torch.no_grad():
        views = []
        for top, left in CORNERS:
            crop = batch[:, top : top + 42, left : left + 42]
            for view in (crop, crop[:, :, ::-1]):
                views.append(torch.softmax(model(model_input(np.ascontiguousarray(view), size)), dim=1))
    expected = torch.stack(views).mean(dim=0).numpy()
    got = Predictor(model, image_size=size, batch_size=4, tta="crops").probabilities(batch)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
    plain = Predictor(model, image_size=size).probabilities(batch)
    assert np.abs(got - plain).max() > 1e-4  # the views change this model's answer


def test_crops_on_a_constant_face_equal_no_tta(tiny_checkpoint: Path) -> None:
    """Every crop of a constant face is the same constant face: ten views, one answer."""
    model, cfg = load_classifier(tiny_checkpoint)
    flat = np.full((3, 48, 48), 117, dtype=np.uint8)
    crops = Predictor(model, image_size=cfg.model.image_size, tta="crops").probabilities(flat)
    plain = Predictor(model, image_size=cfg.model.image_size).probabilities(flat)
    np.testing.assert_allclose(crops, plain, rtol=0, atol=1e-6)


def test_evaluate_and_predict_report_crops_apart(
    tiny_checkpoint: Path, synth_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    import evaluate
    import predict

    from ferdist.config import DataConfig
    from ferdist.data.loader import build_loader, open_dataset

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = ["--model", str(tiny_checkpoint), "--manifest", str(synth_shards), "--split", "val", "--no-track"]
    assert evaluate.main([*args, "--tta", "crops", "--out", str(tmp_path / "e")]) == 0
    result = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert result["tta"] is True and result["tta_mode"] == "crops"
    assert "ten-crop TTA" in (tmp_path / "e" / "class_report.md").read_text()
    model, cfg = load_classifier(tiny_checkpoint)
    loader = build_loader(open_dataset(str(synth_shards)), "val", DataConfig(manifest=str(synth_shards),
                          loader_workers=0), batch_size=64, training=False)  # fmt: skip
    batches = list(loader)
    val = torch.cat([b["image"][:, 0] for b in batches]).numpy()
    labels = torch.cat([b["label"] for b in batches]).numpy()
    predicted = Predictor(model, image_size=cfg.model.image_size, tta="crops").probabilities(val).argmax(axis=1)
    expected = np.zeros((7, 7), dtype=np.int64)
    np.add.at(expected, (labels, predicted), 1)
    assert result["confusion"] == expected.tolist()

    capsys.readouterr()
    assert evaluate.main([*args, "--tta", "tenfold"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: unknown TTA mode 'tenfold'; use one of none, flip, crops"

    from PIL import Image

    (tmp_path / "faces").mkdir()
    for i, face in enumerate(faces(3, seed=1)):
        Image.fromarray(face).save(tmp_path / "faces" / f"{i}.png")
    out = tmp_path / "faces.json"
    assert predict.main(["--model", str(tiny_checkpoint), str(tmp_path / "faces"), "--no-detect", "--tta", "crops",
                         "--output", str(out)]) == 0  # fmt: skip
    rows = sorted(json.loads(out.read_text()), key=lambda row: row["file"])
    columns = [c for c in rows[0] if c.startswith("p_")]
    got = np.array([[row[c] for c in columns] for row in rows])
    want = Predictor(model, image_size=cfg.model.image_size, tta="crops").probabilities(faces(3, seed=1))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_the_served_model_takes_tta_as_a_param(tiny_checkpoint: Path, served) -> None:  # noqa: ANN001
    from mlflow.exceptions import MlflowException

    from ferdist.serve.inference import probability_columns

    served, _ = served
    batch = faces(4, seed=2)
    model, cfg = load_classifier(tiny_checkpoint)
    for mode in ("none", "crops"):
        table = served.predict(batch, params={"detect": "off", "tta": mode})
        want = Predictor(model, image_size=cfg.model.image_size, tta=mode).probabilities(batch)
        np.testing.assert_allclose(table[probability_columns()].to_numpy(), want, rtol=0, atol=1e-6)
    with pytest.raises(MlflowException) as refused:
        served.predict(batch, params={"tta": "sometimes"})
    assert refused.value.message == "unknown TTA mode 'sometimes'; use one of none, flip, crops"


def test_no_faces_give_an_empty_float32_table(tiny_checkpoint: Path) -> None:
    """Kills the mutants of `Predictor.probabilities` that concatenate an empty list (a ValueError) or return the
    empty answer as float64."""
    model, cfg = load_classifier(tiny_checkpoint)
    for mode in ("none", "crops"):
        predictor = Predictor(model, image_size=cfg.model.image_size, tta=mode)
        empty = predictor.probabilities(np.zeros((0, 48, 48), np.uint8))
        assert empty.shape == (0, 7) and empty.dtype == np.float32
