"""The published model: raw images in, the checkpoint's own predictions out; @champion moves only on a better val
accuracy. Against MLflow's embedded SQLite store (the real server is exercised by the sweep tests)."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from ferdist.config import load_config
from ferdist.constants import FER_CLASSES
from ferdist.data.loader import build_loader, open_dataset
from ferdist.errors import FerdistError
from ferdist.serve.inference import Predictor, images_from_input, to_face
from ferdist.track.registry import CHAMPION, log_model, register, using_store
from ferdist.track.reports import class_report_markdown
from ferdist.train.checkpoint import load_classifier


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def val_faces(synth_shards: Path) -> np.ndarray:
    cfg = load_config(None, [f"data.manifest={synth_shards}", "data.loader_workers=0"])
    loader = build_loader(open_dataset(str(synth_shards)), "val", cfg.data, batch_size=64, rank=0, world_size=1,
                          training=False)  # fmt: skip
    return torch.cat([b["image"] for b in loader])[:, 0].numpy()


def test_any_image_becomes_the_training_face(val_faces: np.ndarray) -> None:
    face = val_faces[0]
    assert np.array_equal(to_face(png(face)), face)  # 48x48 grey: bit-identical to the shard's pixels
    assert np.array_equal(to_face(np.stack([face] * 3, axis=-1)), face)  # grey in RGB
    big = np.asarray(Image.fromarray(face).resize((192, 192), Image.Resampling.BILINEAR))
    assert np.abs(to_face(png(big)).astype(int) - face).mean() < 6  # 4x larger, resized back
    batch = images_from_input(val_faces[:3])  # [N, H, W] is N grey faces, [H, W, 3] one colour image
    assert len(batch) == 3 and all(np.array_equal(a, b) for a, b in zip(batch, val_faces[:3], strict=True))
    assert len(images_from_input(np.stack([face] * 3, axis=-1))) == 1
    with pytest.raises(FerdistError, match=r"image 1 is not an image \(12 bytes of no image format PIL knows\)"):
        to_face(images_from_input(pd.DataFrame({"image": [png(face), b"not an image"]}))[1], name="image 1")
    with pytest.raises(FerdistError, match=r"has shape \(48, 48, 2\)"):
        to_face(np.zeros((48, 48, 2), np.uint8))


def test_deep_images_are_scaled_to_the_training_face_not_clipped(val_faces: np.ndarray) -> None:
    face = val_faces[1]
    deep = face.astype(np.uint16) * 257  # the same picture in 16 bits
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    assert np.array_equal(to_face(buf.getvalue()), face)  # 16-bit PNG bytes (was all white)
    assert np.array_equal(to_face(deep), face)  # a uint16 array
    assert np.array_equal(to_face(face / 255.0), face)  # floats in 0-1
    with pytest.raises(FerdistError, match=r"image has pixel values from -5 to 300, outside the 0-255"):
        to_face(np.asarray([[-5, 300], [0, 0]], np.int32))
    with pytest.raises(FerdistError, match=r"image has NaN or infinite pixel values"):
        to_face(np.full((48, 48), np.nan))


def test_pyfunc_predicts_like_the_checkpoint_and_champion_moves_only_when_better(
    checkpoint: Path, val_faces: np.ndarray, tmp_path: Path
) -> None:
    import mlflow.pyfunc

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("registry", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    model_uri = log_model(run_id, checkpoint, tracking_uri=uri)

    first = register(model_uri, name="fer-test", val_acc=0.5, tags={}, tracking_uri=uri)
    worse = register(model_uri, name="fer-test", val_acc=0.4, tags={}, tracking_uri=uri)
    better = register(model_uri, name="fer-test", val_acc=0.6, tags={}, tracking_uri=uri)
    assert (first.version, first.champion, first.previous_champion) == ("1", True, None)
    assert (worse.version, worse.champion, worse.previous_champion) == ("2", False, ("1", 0.5))
    assert (better.version, better.champion) == ("3", True)
    assert str(client.get_model_version_by_alias("fer-test", CHAMPION).version) == "3"
    assert "not @champion: v1 stays" in worse.describe()
    # Drawn faces are far easier than real ones: a SYNTHETIC model's 0.99 must not displace a real model's 0.6,
    # and any real-data model takes @champion from a SYNTHETIC one.
    drawn = register(model_uri, name="fer-test", val_acc=0.99, tags={}, tracking_uri=uri, synthetic=True)
    assert (drawn.version, drawn.champion) == ("4", False)
    assert "a SYNTHETIC-trained model never replaces a real one" in drawn.describe()
    assert client.get_model_version("fer-test", "4").tags["synthetic"] == "true"
    drawn_first = register(model_uri, name="fer-other", val_acc=0.9, tags={}, tracking_uri=uri, synthetic=True)
    real_after = register(model_uri, name="fer-other", val_acc=0.3, tags={}, tracking_uri=uri)
    assert drawn_first.champion and real_after.champion
    assert str(client.get_model_version_by_alias("fer-test", CHAMPION).version) == "3"

    with using_store(uri):
        served = mlflow.pyfunc.load_model(f"models:/fer-test@{CHAMPION}")
    table = served.predict(pd.DataFrame({"image": [png(f) for f in val_faces]}))
    assert list(table["image"]) == list(range(len(val_faces))) and set(table["face"]) == {0}  # 48x48: crops
    model, cfg = load_classifier(checkpoint)
    expected = Predictor(model, image_size=cfg.model.image_size).probabilities(val_faces)
    probabilities = table[[f"p_{c.lower()}" for c in FER_CLASSES]].to_numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    assert list(table["label"]) == [FER_CLASSES[i] for i in expected.argmax(1)]
    assert served.metadata.signature.inputs is None  # checked by ferdist row by row, not by MLflow's schema
    assert served.metadata.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"


def test_class_report_lists_every_class_with_its_recall() -> None:
    confusion = np.diag([5, 0, 3, 10, 2, 4, 6])
    confusion[1, 3] = 2  # both Disgust faces called Happy
    text = class_report_markdown(confusion, title="t")
    table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    rows = {line.split("|")[1].strip(): line for line in table}
    assert rows["Disgust"].split("|")[3].strip() == "0.0000" and rows["Disgust"].split("|")[5].strip() == "2"
    assert rows["Happy"].split("|")[2].strip() == f"{10 / 12:.4f}"  # precision: 10 of 12 called Happy
    assert "accuracy 0.9375" in text and "32 samples" in text  # 30 of 32 right


def test_the_model_card_says_synthetic_and_describes_the_shards_it_was_trained_on(synth_shards: Path) -> None:
    from ferdist.track.model_card import SYNTHETIC_WARNING, model_card

    cfg = load_config(None, [f"data.manifest={synth_shards}"])
    best = {"epoch": 3, "confusion": np.diag([5, 1, 3, 10, 2, 4, 6]).tolist()}
    shards = open_dataset(str(synth_shards)).manifest
    manifest = dataclasses.replace(shards, source=dataclasses.replace(shards.source, synthetic=True,
                                                                      kind="synthetic-csv"))  # fmt: skip
    card = model_card(cfg, best=best, version="2", manifest=manifest)
    title, _, first = card.split("\n")[:3]
    assert title == "# fer-vitmae v2 (SYNTHETIC data)" and first == SYNTHETIC_WARNING
    assert "PrivateTest" not in card and "28,709" not in card  # FER2013's splits are not claimed
    assert "train 280, val 35, test 35" in card
    real = dataclasses.replace(manifest, source=dataclasses.replace(manifest.source, synthetic=False,
                                                                    kind="kaggle-csv", name="fer2013.csv"))  # fmt: skip
    card = model_card(cfg, best=best, version="2", manifest=real)
    assert "SYNTHETIC" not in card and "val = PublicTest" in card and "`fer2013.csv` (kaggle-csv" in card
    assert "Distilled from" not in card and "(ImageNet-pretrained ViT-MAE)" in card  # the default backbone


def test_the_model_card_names_the_backbone_and_the_teachers_as_they_were() -> None:
    """Catches a card that called every non-random backbone ImageNet-pretrained (one MAE-pretrained here on faces
    too), and one that left out what a distilled model learnt from."""
    from ferdist.track.model_card import model_card

    best = {"epoch": 3, "confusion": np.diag([5, 1, 3, 10, 2, 4, 6]).tolist()}
    own = model_card(load_config(None, ["model.pretrained=pretrained/mae-faces"]), best=best)
    assert "fine-tuned from `pretrained/mae-faces`;" in own and "ImageNet" not in own
    hub = model_card(load_config(None, ["model.pretrained=facebook/vit-mae-base"]), best=best)
    assert "fine-tuned from `facebook/vit-mae-base` (ImageNet-pretrained ViT-MAE)" in hub
    taught = model_card(load_config(None, ["distill.teacher=['peer:fer', 'models:/big@champion']"]), best=best)
    assert "- Distilled from: `peer:fer`, `models:/big@champion` (soft targets, weight 0.5, temperature 4)" in taught
    assert "learnt, through it, from the test split" in taught


def test_publishing_a_finished_run_again_reuses_its_version(
    checkpoint: Path, synth_shards: Path, tmp_path: Path
) -> None:
    """Re-submitting a finished run prints its summary and registration again; it must not register its best
    checkpoint a second time (a duplicate version that could even take @champion from a newer run's model)."""
    from ferdist.track import tracking
    from ferdist.train import runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("dup", artifact_location=str(tmp_path / "a"))).info.run_id
    cfg = load_config(None, [f"data.manifest={synth_shards}", f"tracking.tracking_uri={uri}",
                             "tracking.registered_model=fer-dup"])  # fmt: skip
    best, _ = runs.best_and_last(str(checkpoint.parent))
    first = tracking.publish_model(cfg, run_id=run_id, best=best, tags={})
    again = tracking.publish_model(cfg, run_id=run_id, best=best, tags={})
    assert (first.version, first.champion, first.existing) == ("1", True, False)
    assert (again.version, again.champion, again.existing) == ("1", True, True)
    assert len(client.search_model_versions("name = 'fer-dup'")) == 1
    assert again.describe().startswith("fer-dup v1 (val acc ") and "nothing new was registered; it is @champion" in (
        again.describe())
