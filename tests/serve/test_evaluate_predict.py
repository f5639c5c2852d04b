"""jobs/evaluate.py and jobs/predict.py: the numbers match the training loop's evaluation, bad input is one
sentence, and prediction over many files keeps going past a bad one."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ferdist.config import DataConfig, load_config
from ferdist.data.loader import build_loader, open_dataset
from ferdist.serve.inference import Predictor
from ferdist.train.checkpoint import load_classifier
from ferdist.train.loop import LocalSession, evaluate, run_training


@pytest.fixture(scope="module")
def checkpoint(synth_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    cfg = load_config(None, [f"data.manifest={synth_shards}", "data.loader_workers=0", "model.pretrained=random:tiny",
                             "model.image_size=32", "loop.epochs=2", "loop.global_batch_size=32", "optim.lr=2e-3",
                             "tracking.backend=none"])  # fmt: skip
    run_training(cfg, LocalSession(root))
    return max(root.glob("model_epoch_*"))  # the best model


def test_evaluate_matches_the_training_loops_evaluation(
    checkpoint: Path, synth_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import evaluate as job

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert job.main(["--model", str(checkpoint), "--manifest", str(synth_shards), "--out", str(tmp_path / "e")]) == 0
    result = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    model, cfg = load_classifier(checkpoint)
    expected = evaluate(model, open_dataset(str(synth_shards)), cfg, split="test", rank=0, world_size=1,
                        device=torch.device("cpu"))  # fmt: skip
    assert result["accuracy"] == expected["acc"] and result["macro_f1"] == expected["macro_f1"]
    assert result["confusion"] == expected["confusion"] and sum(result["support"]) == 35
    assert (tmp_path / "e" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"

    assert job.main(["--model", str(checkpoint), "--manifest", str(synth_shards), "--tta", "--split", "val",
                     "--out", str(tmp_path / "t")]) == 0  # fmt: skip
    tta = json.loads((tmp_path / "t" / "evaluation.json").read_text())
    assert tta["tta"] is True and sum(tta["support"]) == 35 and 0.0 <= tta["accuracy"] <= 1.0
    # The TTA confusion is the one of the face's and its mirror's probabilities averaged, each computed on its own
    # (catches --tta being ignored by Predictor.probabilities when the two differ on a face).
    faces, labels = val_faces(synth_shards)
    plain = Predictor(model, image_size=cfg.model.image_size)
    averaged = (plain.probabilities(faces) + plain.probabilities(faces[:, :, ::-1].copy())) / 2
    expected_tta = np.zeros((7, 7), dtype=np.int64)
    np.add.at(expected_tta, (labels, averaged.argmax(axis=1)), 1)
    assert tta["confusion"] == expected_tta.tolist()


def val_faces(shards: Path) -> tuple[np.ndarray, np.ndarray]:
    loader = build_loader(open_dataset(str(shards)), "val", DataConfig(manifest=str(shards), loader_workers=0),
                          batch_size=64, training=False)  # fmt: skip
    batches = list(loader)
    return (torch.cat([b["image"][:, 0] for b in batches]).numpy(), torch.cat([b["label"] for b in batches]).numpy())


def test_tta_probabilities_average_the_face_and_its_mirror(checkpoint: Path, synth_shards: Path) -> None:
    """Catches TTA ignored by Predictor.probabilities: with tta=True the probabilities must be the mean of the face's
    and its mirror image's, computed independently, and differ from the face's alone."""
    model, cfg = load_classifier(checkpoint)
    faces, _ = val_faces(synth_shards)
    plain = Predictor(model, image_size=cfg.model.image_size, batch_size=16)
    alone, mirrored = plain.probabilities(faces), plain.probabilities(np.ascontiguousarray(faces[:, :, ::-1]))
    with_tta = Predictor(model, image_size=cfg.model.image_size, batch_size=16, tta=True).probabilities(faces)
    assert np.abs(alone - mirrored).max() > 1e-3  # the mirror changes this model's answer, so TTA must show
    np.testing.assert_allclose(with_tta, (alone + mirrored) / 2, rtol=0, atol=1e-6)
    assert np.abs(with_tta - alone).max() > 5e-4


def test_evaluate_bad_input_is_one_sentence(
    checkpoint: Path, synth_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import evaluate as job

    store = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    assert job.main(["--model", "models:/no-such-model@champion", "--manifest", str(synth_shards)]) == 2
    err = capsys.readouterr().err
    assert f"cannot load the model models:/no-such-model@champion: there is no tracking store at {store}" in err
    assert "Traceback" not in err and not store.exists()  # a reader never leaves an empty store behind
    from conftest import free_port
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", down := f"http://127.0.0.1:{free_port()}")  # a server that is not up
    assert job.main(["--model", "models:/no-such-model@champion", "--manifest", str(synth_shards), "--no-track"]) == 2
    err = capsys.readouterr().err  # at once, not after MLflow's minutes of retries
    assert f"models:/no-such-model@champion: cannot reach the MLflow tracking server at {down}" in err
    assert "Retrying" not in err and "Traceback" not in err
    # The same for a model that needs no store (a checkpoint folder): the store the evaluation is logged to is down.
    assert job.main(["--model", str(checkpoint), "--manifest", str(synth_shards)]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the MLflow tracking server at {down}" in err and "--no-track" in err, err
    assert "accuracy" not in err and "Retrying" not in err and "Traceback" not in err  # before the model is scored
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    MlflowClient(f"sqlite:///{store}").search_experiments()  # an existing store without that model
    assert job.main(["--model", "models:/no-such-model@champion", "--manifest", str(synth_shards)]) == 2
    assert f"in `mlflow ui --backend-store-uri sqlite:///{store}`" in capsys.readouterr().err  # that store, not ./
    five = tmp_path / "five-classes"  # a head of another size: another set of classes, not a traceback
    shutil.copytree(checkpoint, five)
    state = torch.load(five / "model.pt", weights_only=True)
    state["head.weight"], state["head.bias"] = state["head.weight"][:5], state["head.bias"][:5]
    torch.save(state, five / "model.pt")
    reordered = tmp_path / "reordered"  # the same head size, another class order: its answers would be mislabelled
    shutil.copytree(checkpoint, reordered)
    summary = json.loads((reordered / "summary.json").read_text())
    classes = summary["classes"]
    (reordered / "summary.json").write_text(json.dumps(summary | {"classes": [classes[3], *classes[:3], *classes[4:]]}))
    future = tmp_path / "future"
    shutil.copytree(synth_shards, future)
    manifest = json.loads((future / "manifest.json").read_text())
    (future / "manifest.json").write_text(json.dumps(manifest | {"format_version": 99}))
    cases = [
        (["--model", str(checkpoint), "--manifest", str(future)], "shard format version 99"),
        (["--model", "models:/no-such-model@champion", "--manifest", str(synth_shards)],
         "cannot load the model models:/no-such-model@champion from the tracking store sqlite:///"),
        (["--model", str(tmp_path / "nothing"), "--manifest", str(synth_shards)], "no model at"),
        (["--model", str(tmp_path), "--manifest", str(synth_shards)], "is neither a ferdist checkpoint"),
        (["--model", str(five), "--manifest", str(synth_shards)], f"{five} answers 5 classes, not FER2013's"),
        (["--model", "s3://bob:hunter2@bucket/x", "--manifest", str(synth_shards)],  # a traceback with the password
         "'s3://bob:***@bucket/x' holds credentials before its bucket; write s3://BUCKET/PREFIX"),
        (["--model", str(checkpoint), "--manifest", "s3://bob:hunter2@bucket/data"],
         "'s3://bob:***@bucket/data' holds credentials before its bucket"),
        (["--model", str(reordered), "--manifest", str(synth_shards)],
         f"{reordered} answers classes ['Happy', 'Angry', 'Disgust', 'Fear', 'Sad', 'Surprise', 'Neutral'], not "
         "FER2013's"),
        (["--model", str(checkpoint), "--manifest", str(synth_shards), "--split", "dev"], "has no 'dev' split"),
    ]  # fmt: skip
    # A model folder copied in part, or damaged: one sentence, whichever reader meets it (torch, safetensors, JSON).
    for name, damage in [("cut", lambda f: (f / "model.pt").write_bytes((f / "model.pt").read_bytes()[:3000])),
                         ("noise", lambda f: (f / "model.pt").write_bytes(bytes(range(256)) * 20)),
                         ("json", lambda f: (f / "backbone.json").write_text("{")),
                         ("unbundled", lambda f: (f / "backbone.json").unlink())]:  # fmt: skip
        shutil.copytree(checkpoint, broken := tmp_path / name)
        damage(broken)
        said = "is an incomplete model folder (no backbone.json" if name == "unbundled" else "holds a damaged model"
        cases.append((["--model", str(broken), "--manifest", str(synth_shards)], f"{broken} {said}"))
    photo = tmp_path / "face.png"
    photo.write_bytes(b"png")
    cases += [(["--model", str(checkpoint), "--manifest", str(synth_shards), "--out", str(photo)],
               f"--out {photo} is a file; name a folder"),
              (["--model", str(checkpoint), "--manifest", str(synth_shards), "--out", str(photo / "results")],
               "is a file, not a folder")]  # fmt: skip
    for argv, message in cases:
        assert job.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and "accuracy" not in err, err  # before any scoring
    with pytest.raises(SystemExit) as exit_info:
        job.main(["--model", str(checkpoint), "--manifest", str(synth_shards), "--batch-size", "0"])
    assert exit_info.value.code == 2 and "'0' is not a whole number of at least 1" in capsys.readouterr().err


def face_png(face: np.ndarray, size: int = 48, mode: str = "L") -> bytes:
    out = io.BytesIO()
    Image.fromarray(face).convert(mode).resize((size, size)).save(out, format="PNG")
    return out.getvalue()


def test_predict_keeps_going_past_a_bad_file_and_matches_the_model(
    checkpoint: Path, synth_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import predict as job

    from ferdist.serve.inference import Predictor

    cfg = load_config(None, [f"data.manifest={synth_shards}", "data.loader_workers=0"])
    loader = build_loader(open_dataset(str(synth_shards)), "test", cfg.data, batch_size=8, rank=0, world_size=1,
                          training=False)  # fmt: skip
    faces = next(iter(loader))["image"][:3, 0].numpy()
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    (photos / "a.png").write_bytes(face_png(faces[0]))
    (photos / "more" / "b.jpg").write_bytes(face_png(faces[1], size=160, mode="RGB"))
    (photos / "c.png").write_bytes(b"this is not a PNG")
    (photos / "e.png").write_bytes(face_png(np.tile(np.arange(200, dtype=np.uint8), (200, 1)), size=200))
    single = tmp_path / "d.png"
    single.write_bytes(face_png(faces[2]))
    out = tmp_path / "pred.json"
    assert job.main(["--model", str(checkpoint), str(photos), str(single), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "c.png is not an image (17 bytes of no image format PIL knows)" in err
    assert "3 faces in 4 images, 1 file skipped" in err
    rows = json.loads(out.read_text())
    assert [Path(r["file"]).name for r in rows] == ["a.png", "e.png", "b.jpg", "d.png"]  # sorted within the folder
    # 48x48 files are crops; larger ones are searched: a gradient has no face, the 160 px drawn face is found.
    assert (rows[1]["face"], rows[1]["label"], rows[1]["p_happy"]) == (-1, "no face", None)
    assert rows[2]["face"] == 0 and 60 <= rows[2]["w"] <= 160 and rows[2]["x"] + rows[2]["w"] <= 160
    model, run_cfg = load_classifier(checkpoint)
    expected = Predictor(model, image_size=run_cfg.model.image_size).probabilities(faces)
    columns = [f"p_{c}" for c in ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")]
    got = np.array([[r[c] for c in columns] for r in (rows[0], rows[3])])
    np.testing.assert_allclose(got, expected[[0, 2]], atol=1e-5)  # 48x48 grey files: the exact training pixels
    assert (rows[0]["x"], rows[0]["y"], rows[0]["w"], rows[0]["h"]) == (0, 0, 48, 48)

    csv_out = tmp_path / "pred.csv"
    assert job.main(["--model", str(checkpoint), str(photos / "more"), str(single), "--output", str(csv_out),
                     "--no-detect"]) == 0  # fmt: skip
    lines = csv_out.read_text().splitlines()
    assert lines[0] == "file,face,x,y,w,h,label," + ",".join(columns)
    assert lines[1].split(",")[1:6] == ["0", "0", "0", "160", "160"]  # the whole file is the face

    (tmp_path / "empty").mkdir()
    assert job.main(["--model", str(checkpoint), str(tmp_path / "empty")]) == 2
    assert "empty/ holds no image files" in capsys.readouterr().err


def test_an_empty_name_or_a_file_for_a_backbone_is_one_sentence(
    synth_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Catches empty texts taken as the current folder (`predict.py ""` read every photo under it, `--out ""` wrote
    there) or printed as nothing (`--model ""`: "error:  is neither…"), and a file given as model.pretrained being
    called a folder."""
    import export
    import predict
    import pretrain
    import train

    monkeypatch.chdir(tmp_path)
    for job, argv in [(predict, [""]), (predict, ["face.png", "--annotate", ""]), (predict, ["x.png", "--output", " "]),
                      (export, ["--out", ""]), (pretrain, ["--output", ""])]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            job.main(argv)
        assert exit_info.value.code == 2 and "an empty path; name a file or folder" in capsys.readouterr().err
    (photo := tmp_path / "face.png").write_bytes(b"png")
    assert predict.main(["face.png", "--model", ""]) == 2
    assert "the model to load is named by an empty text; give a model URI" in capsys.readouterr().err
    assert train.main(["--set", f"model.pretrained={photo}", "--set", f"data.manifest={synth_shards}", "--cpu"]) == 2
    err = capsys.readouterr().err
    assert f"model.pretrained='{photo}' is a file; give the folder save_pretrained wrote" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["face.png"]  # nothing written
