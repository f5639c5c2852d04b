"""Bundled models (`ferdist.serve.bundled`): a model written by ``jobs/export.py --format bundle`` loads in a fresh
process with no tracking store and gives the probabilities recorded when it was written; it is found by its bare
name; bad input is one sentence and writes nothing; and every bundle committed in ferdist/models still reproduces
its own expected.json."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ferdist.config import load_config, to_yaml
from ferdist.constants import FER_CLASSES
from ferdist.errors import FerdistError
from ferdist.serve import bundled
from ferdist.serve.export import check_faces
from ferdist.train.checkpoint import BACKBONE_FILE, CONFIG_FILE, MODEL_FILE, SAFE_MODEL_FILE, load_classifier
from ferdist.train.model import build_model
from ferdist.train.runs import SUMMARY_FILE

ROOT = Path(__file__).resolve().parents[2]
BUNDLE_FILES = sorted([SAFE_MODEL_FILE, BACKBONE_FILE, CONFIG_FILE, SUMMARY_FILE, bundled.CARD_FILE,
                       bundled.EXPECTED_FILE])  # fmt: skip
COMMITTED = bundled.names()
"""The bundles committed in ferdist/models, listed before any test points `bundled.ROOT` elsewhere."""


@pytest.fixture(scope="module")
def checkpoint(synth_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model checkpoint of an untrained random:tiny classifier at 32 px (no training: only loading is tested), its
    head scaled up so the probabilities are far from uniform, on the SYNTHETIC shards' config."""
    cfg = load_config(None, [f"data.manifest={synth_shards}", "model.pretrained=random:tiny", "model.image_size=32",
                             "tracking.backend=none"])  # fmt: skip
    model = build_model(cfg.model, seed=0)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    folder = tmp_path_factory.mktemp("tiny-untrained") / "model_epoch_0001"
    folder.mkdir()
    torch.save(model.state_dict(), folder / MODEL_FILE)
    (folder / BACKBONE_FILE).write_text(json.dumps(model.backbone.config.to_dict()))
    (folder / CONFIG_FILE).write_text(to_yaml(cfg))
    confusion = (np.eye(7, dtype=int) * 4 + 1).tolist()
    summary = {"epoch": 1, "metrics": {"val/acc": 0.5, "val/macro_f1": 0.45}, "classes": list(FER_CLASSES),
               "confusion": confusion, "history": []}  # fmt: skip
    (folder / SUMMARY_FILE).write_text(json.dumps(summary))
    return folder


@pytest.fixture
def bundle_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder standing in for ferdist/models: no test writes into the package."""
    root = tmp_path / "bundled-models"
    root.mkdir()
    monkeypatch.setattr(bundled, "ROOT", root)
    return root


def export_bundle(checkpoint: Path, out: Path, *extra: str) -> None:
    import export as job

    assert job.main(["--model", str(checkpoint), "--format", "bundle", "--out", str(out), *extra]) == 0


def expected_probabilities(bundle: Path) -> np.ndarray:
    return np.asarray(json.loads((bundle / bundled.EXPECTED_FILE).read_text())["probabilities"], dtype=np.float32)


def face_files(folder: Path) -> list[Path]:
    """The check faces as 48×48 grey PNGs (which reach the model bit-identical), named in their order."""
    folder.mkdir()
    paths = []
    for i, face in enumerate(check_faces(bundled.CHECK_FACES, seed=bundled.CHECK_SEED)):
        out = io.BytesIO()
        Image.fromarray(face).save(out, format="PNG")
        paths.append(folder / f"face{i:02d}.png")
        paths[-1].write_bytes(out.getvalue())
    return paths


def fresh_env() -> dict[str, str]:
    """This environment without any MLflow setting: the bundle must need no tracking store."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


PROBABILITY_COLUMNS = [f"p_{name.lower()}" for name in FER_CLASSES]


def test_a_bundle_loads_in_a_fresh_process_with_no_store_and_gives_the_recorded_probabilities(
    checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tiny-bundle"
    export_bundle(checkpoint, out)
    assert sorted(p.name for p in out.iterdir()) == BUNDLE_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-bundle"]  # no partial folder left beside it
    expected = expected_probabilities(out)
    assert expected.shape == (bundled.CHECK_FACES, 7) and np.allclose(expected.sum(axis=1), 1.0, atol=1e-5)
    assert expected.max() > 0.5  # far from uniform: equality below says something

    # jobs/predict.py in a new process, in an empty folder, with no MLFLOW_TRACKING_URI: it must not reach for a store.
    work = tmp_path / "empty"
    work.mkdir()
    faces = face_files(tmp_path / "faces")
    rows_file = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "predict.py"), "--model", str(out), "--no-detect",
                          *map(str, faces), "--output", str(rows_file)],
                         cwd=work, env=fresh_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = json.loads(rows_file.read_text())
    assert [Path(r["file"]).name for r in rows] == [f.name for f in faces]
    got = np.array([[r[c] for c in PROBABILITY_COLUMNS] for r in rows])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)

    # The Python API in a new process: the same numbers through bundled.check.
    code = ("import json, sys; from pathlib import Path; from ferdist.serve import bundled; "
            "c = bundled.check(Path(sys.argv[1])); print(json.dumps([c.max_abs_diff, c.atol, c.ok]))")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code, str(out)], cwd=work, env=fresh_env(), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    diff, atol, ok = json.loads(run.stdout.strip().splitlines()[-1])
    assert ok and diff <= 1e-6 and atol == bundled.SAME_VERSIONS_ATOL
    assert list(work.iterdir()) == []  # no mlflow.db, mlruns/ or anything else written where it ran


def test_check_catches_a_changed_weights_file_and_changed_probabilities(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-bundle"
    export_bundle(checkpoint, out)
    assert bundled.check(out).ok
    record = json.loads((out / "expected.json").read_text())
    record["probabilities"][3][0] += 1e-4
    (out / "expected.json").write_text(json.dumps(record))
    check = bundled.check(out)
    assert not check.ok and check.max_abs_diff == pytest.approx(1e-4, rel=1e-3)
    weights = bytearray((out / SAFE_MODEL_FILE).read_bytes())
    weights[-1] ^= 1
    (out / SAFE_MODEL_FILE).write_bytes(bytes(weights))
    with pytest.raises(FerdistError, match=r"model.safetensors is not the file .* was recorded with"):
        bundled.check(out)


def test_the_safetensors_weights_load_as_the_checkpoints_model_pt(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-bundle"
    export_bundle(checkpoint, out)
    from_pt, cfg_pt = load_classifier(checkpoint)
    from_safe, cfg_safe = load_classifier(out)
    assert cfg_safe == cfg_pt and not from_safe.training
    state_pt, state_safe = from_pt.state_dict(), from_safe.state_dict()
    assert state_pt.keys() == state_safe.keys()
    assert all(torch.equal(state_pt[k], state_safe[k]) and state_pt[k].dtype == state_safe[k].dtype for k in state_pt)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(from_pt(x), from_safe(x))


def test_a_bare_bundled_name_resolves_and_a_path_of_that_name_wins(
    checkpoint: Path, bundle_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import predict

    from ferdist.track.registry import fetch_checkpoint

    export_bundle(checkpoint, bundle_root / "tiny-bundle")
    capsys.readouterr()
    assert bundled.names() == ["tiny-bundle"]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for uri in ("tiny-bundle", "bundled:tiny-bundle"):
        folder, ref = fetch_checkpoint(uri, tmp_path / "dest")
        assert folder == bundle_root / "tiny-bundle" and ref.uri == uri and ref.version is None
    assert not (tmp_path / "dest").exists()  # used in place, not copied

    faces = face_files(tmp_path / "faces")
    assert predict.main(["--model", "tiny-bundle", "--no-detect", *map(str, faces), "--output", "rows.json"]) == 0
    rows = json.loads((work / "rows.json").read_text())
    expected = expected_probabilities(bundle_root / "tiny-bundle")
    np.testing.assert_allclose([[r[c] for c in PROBABILITY_COLUMNS] for r in rows], expected, rtol=0, atol=1e-6)

    # The Python API: by name, as the docs show it.
    faces_array = check_faces(bundled.CHECK_FACES, seed=bundled.CHECK_SEED)
    np.testing.assert_allclose(bundled.predictor("tiny-bundle", device="cpu").probabilities(faces_array), expected,
                               rtol=0, atol=1e-6)  # fmt: skip
    loaded = bundled.load("tiny-bundle")
    assert loaded.folder == bundle_root / "tiny-bundle" and loaded.cfg.model.image_size == 32

    # A file or folder of that name where the job runs is what --model means; bundled: is always the bundle.
    (work / "tiny-bundle").symlink_to(checkpoint)
    assert fetch_checkpoint("tiny-bundle", tmp_path / "dest")[0].absolute() == work / "tiny-bundle"
    assert fetch_checkpoint("bundled:tiny-bundle", tmp_path / "dest")[0] == bundle_root / "tiny-bundle"


def one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_an_unknown_bundled_name_is_one_sentence_and_nothing_is_written(
    checkpoint: Path, bundle_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import export as job
    import predict

    (face,) = face_files(tmp_path / "faces")[:1]
    out = tmp_path / "rows.csv"
    assert predict.main(["--model", "bundled:nope", str(face), "--output", str(out)]) == 2
    assert one_line_error(capsys) == ("error: there is no bundled model named 'nope' (bundled: none yet); pass one of "
                                      "those, or a models:/, runs:/, checkpoint folder or s3:// --model")  # fmt: skip
    assert predict.main(["--model", "nope", str(face), "--output", str(out)]) == 2
    assert "no model at nope;" in one_line_error(capsys)

    export_bundle(checkpoint, bundle_root / "tiny-bundle")
    capsys.readouterr()
    assert predict.main(["--model", "bundled:tiny", str(face), "--output", str(out)]) == 2
    assert "no bundled model named 'tiny' (bundled: tiny-bundle)" in one_line_error(capsys)
    assert predict.main(["--model", "tiny", str(face), "--output", str(out)]) == 2
    assert "or a bundled model's name (tiny-bundle)" in one_line_error(capsys)
    assert job.main(["--model", "bundled:../tiny-bundle", "--format", "bundle", "--out", str(tmp_path / "b")]) == 2
    assert "no bundled model named '../tiny-bundle'" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundled-models", "faces"]
    assert bundled.names() == ["tiny-bundle"]


def test_bad_destinations_are_one_sentence_and_replace_nothing(
    checkpoint: Path, bundle_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import export as job

    model = ["--model", str(checkpoint), "--format", "bundle"]
    a_file, other = tmp_path / "a-file", tmp_path / "other"
    a_file.write_text("keep me")
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    existing = tmp_path / "existing"
    export_bundle(checkpoint, existing)
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    cases = [
        ([*model, "--out", str(a_file)], "is a file; --format bundle writes a folder"),
        ([*model, "--out", str(other), "--force"], "holds files but no bundle (no model.safetensors)"),
        ([*model, "--out", str(existing)], "already exists; pass --force"),
        ([*model, "--out", str(tmp_path / "Bad Name")], "'Bad Name' cannot name a bundle"),
        ([*model, "--out", str(bundle_root / "x"), "--name", "y"], "is named by its folder, not --name y"),
        ([*model, "--out", str(a_file / "under" / "b")], "a-file is a file, not a folder"),
    ]
    for argv, message in cases:
        assert job.main(argv) == 2
        assert message in one_line_error(capsys)

    # A failure while writing leaves nothing, and the bundle it would have replaced as it was.
    def broken(folder: Path) -> dict:
        raise FerdistError("the check faces could not be computed")

    real = bundled.record_expected
    monkeypatch.setattr(bundled, "record_expected", broken)
    assert job.main([*model, "--out", str(existing), "--force"]) == 2
    err = capsys.readouterr().err  # "bundling …", then the sentence as the last line
    assert err.splitlines()[-1] == "error: the check faces could not be computed" and "Traceback" not in err, err
    assert job.main([*model, "--out", str(tmp_path / "new")]) == 2
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "bundled-models", "existing", "other"]
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before
    assert a_file.read_text() == "keep me" and [p.name for p in other.iterdir()] == ["notes.txt"]
    monkeypatch.setattr(bundled, "record_expected", real)

    # --force replaces an earlier bundle whole, leaving nothing of the old one beside it.
    (existing / "stale.txt").write_text("from an older bundle")
    export_bundle(checkpoint, existing, "--force")
    assert sorted(p.name for p in existing.iterdir()) == BUNDLE_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "bundled-models", "existing", "other"]


def test_the_card_names_the_data_and_its_terms(checkpoint: Path, tmp_path: Path) -> None:
    from ferdist.data.shards import Manifest, SourceInfo, SplitInfo
    from ferdist.track.model_card import FER2013, bundle_card

    # The shards of `synth_shards` come from a Kaggle-layout CSV (not marked synthetic): read as FER2013 would be.
    out = tmp_path / "tiny-bundle"
    export_bundle(checkpoint, out)
    card = (out / bundled.CARD_FILE).read_text()
    assert card.startswith("# tiny-bundle\n") and "from `synth.csv` (kaggle-csv, sha256" in card
    assert f"## Data terms\n\n{FER2013}. FER2013 is distributed for research" in card
    assert "Google image search" in card and "the dataset's, not ferdist's licence" in card
    assert "val accuracy 0.5000, val macro-F1 0.4500 (epoch 1" in card and "Decisions about individuals" in card
    model, cfg = load_classifier(out)
    params = sum(p.numel() for p in model.parameters())
    assert f"{params:,} parameters" in card and "--model tiny-bundle" in card and "`random:tiny`" in card

    splits = {"train": SplitInfo(samples=280, class_counts=[40] * 7, shards=[])}
    drawn = Manifest(source=SourceInfo(name="synthetic-3000-seed0.csv", kind="synthetic-csv", sha256="0" * 64,
                                       synthetic=True), splits=splits, samples_per_shard=16)  # fmt: skip
    common = dict(cfg=cfg, summary=None, source="models:/fer-vitmae@champion", parameters=params,
                  backbone=model.backbone.config.to_dict())  # fmt: skip
    card = bundle_card("drawn", manifest=drawn, **common)
    assert card.startswith("# drawn (SYNTHETIC data)") and "Trained on SYNTHETIC faces" in card
    assert "no third-party images" in card and FER2013 not in card and "No scores were recorded" in card
    assert "could not be read when this card was written" in bundle_card("x", manifest=None, **common)


def test_evaluate_scores_the_written_bundle_on_the_test_split_and_puts_it_in_the_card(
    checkpoint: Path, synth_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ferdist.data.loader import open_dataset
    from ferdist.serve.evaluation import evaluate_split
    from ferdist.serve.inference import Predictor

    out = tmp_path / "scored"
    export_bundle(checkpoint, out, "--evaluate", str(synth_shards))
    model, cfg = load_classifier(checkpoint)
    predictor = Predictor(model, image_size=cfg.model.image_size)
    expected = evaluate_split(predictor, open_dataset(str(synth_shards)), "test")
    card = (out / bundled.CARD_FILE).read_text()
    assert f"## Results on the test split of {synth_shards} (single model, no TTA)" in card
    assert f"Accuracy {expected.report.accuracy:.4f}, macro-F1 {expected.report.macro_f1:.4f} on 35 faces" in card
    assert f"test accuracy {expected.report.accuracy:.4f}" in capsys.readouterr().err.replace("\n", " ")
    assert bundled.check(out).ok  # the card is not part of what a load checks
    # A shard set with no such split is refused before anything is written.
    import export as job

    assert job.main(["--model", str(checkpoint), "--format", "bundle", "--out", str(tmp_path / "never"),
                     "--evaluate", str(tmp_path / "no-shards")]) == 2  # fmt: skip
    assert not (tmp_path / "never").exists()


def test_a_bundle_names_no_folder_of_the_machine_that_wrote_it(
    checkpoint: Path, synth_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(synth_shards.parent)  # the shards lie under the working directory, as in a checkout
    out = tmp_path / "portable"
    export_bundle(checkpoint, out)
    _, cfg = load_classifier(out)
    assert cfg.data.manifest == synth_shards.name
    written = "".join((out / f).read_text() for f in (CONFIG_FILE, bundled.CARD_FILE, BACKBONE_FILE))
    assert str(synth_shards.parent) not in written and "_name_or_path" not in written
    # The local tracking store the run logged to is named as the checkout names it, too.
    import export as job

    here = synth_shards.parent
    for uri, portable in [(f"sqlite:///{here}/mlflow.db", "sqlite:///mlflow.db"),
                          (f"file://{here}/mlruns", "mlruns"), ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
                          ("http://127.0.0.1:5000", "http://127.0.0.1:5000"), (None, None)]:  # fmt: skip
        cfg_there = load_config(None, ["tracking.tracking_uri=" + uri] if uri else [])
        assert job.portable(cfg_there).tracking.tracking_uri == portable


def test_the_card_of_a_distilled_model_names_its_teachers_and_what_the_peer_saw(checkpoint: Path) -> None:
    from ferdist.track.model_card import teacher_lines

    _, cfg = load_classifier(checkpoint)
    assert teacher_lines(cfg) == []
    taught = load_config(None, ["distill.teacher=['peer:fer', 'models:/big@champion']", "distill.kind=hard"])
    (line,) = teacher_lines(taught)
    assert line.startswith("- Distilled from: `peer:fer`, `models:/big@champion` (hard targets, weight 0.5)")
    assert "learnt, through it, from the test split" in line
    (soft,) = teacher_lines(load_config(None, ["distill.teacher=models:/big@champion", "distill.temperature=2"]))
    assert "(soft targets, weight 0.5, temperature 2)" in soft and "test split" not in soft


def test_a_bundle_exports_to_onnx(checkpoint: Path, bundle_root: Path, tmp_path: Path) -> None:
    for package in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(package, reason='the ONNX export needs the export extra: pip install -e ".[export]"')
    import export as job
    import onnxruntime as ort

    export_bundle(checkpoint, bundle_root / "tiny-bundle")
    out = tmp_path / "tiny.onnx"
    assert job.main(["--model", "bundled:tiny-bundle", "--out", str(out)]) == 0
    faces = check_faces(bundled.CHECK_FACES, seed=bundled.CHECK_SEED)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["probabilities"], {"faces": faces})[0]
    np.testing.assert_allclose(got, expected_probabilities(bundle_root / "tiny-bundle"), rtol=0, atol=1e-4)


MAX_BUNDLE_BYTES = 50_000_000
"""GitHub warns above 50 MB a file (and refuses 100 MB); a bundle is meant to be a few MB."""


@pytest.mark.parametrize("name", COMMITTED or [pytest.param(None, marks=pytest.mark.skip(
    reason="no bundled model committed yet"))])  # fmt: skip
def test_every_committed_bundle_reproduces_its_expected_probabilities_in_a_fresh_process(
    name: str, tmp_path: Path
) -> None:
    folder = Path(bundled.__file__).resolve().parents[1] / "models" / name
    assert sorted(p.name for p in folder.iterdir()) == BUNDLE_FILES
    assert sum(p.stat().st_size for p in folder.iterdir()) < MAX_BUNDLE_BYTES
    assert "## Data terms" in (folder / bundled.CARD_FILE).read_text()
    code = ("import json, sys; from ferdist.serve import bundled; c = bundled.check(bundled.folder(sys.argv[1])); "
            "print(json.dumps({'diff': c.max_abs_diff, 'atol': c.atol, 'ok': c.ok, 'with': c.recorded_with}))")
    run = subprocess.run([sys.executable, "-c", code, name], cwd=tmp_path, env=fresh_env(), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["ok"], f"{name} differs from its expected.json by {result['diff']:.2e} (> {result['atol']:g}; " \
                         f"recorded with {result['with']})"


def test_the_encoder_alone_exports_for_model_pretrained_and_bad_destinations_are_refused(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--format backbone: model.pretrained=FOLDER builds the same encoder (every weight equal, the head new), and
    a file, a folder of something else, or --eval-crop is one sentence with nothing written."""
    import export as job

    from ferdist.config import ModelConfig

    out = tmp_path / "encoder"
    assert job.main(["--model", str(checkpoint), "--format", "backbone", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    trained, cfg = load_classifier(checkpoint)
    again = build_model(ModelConfig(pretrained=str(out), image_size=cfg.model.image_size, freeze_blocks=0), seed=3)
    got, want = again.backbone.state_dict(), trained.backbone.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(again.head.weight, trained.head.weight)

    (tmp_path / "a-file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    capsys.readouterr()
    for target, extra, said in [
        (tmp_path / "a-file", [], "is a file; --format backbone writes a folder"),
        (out, [], "already exists; pass --force to replace it"),
        (tmp_path / "other", ["--force"], "holds files but no encoder (no config.json)"),
        (tmp_path / "a-file" / "under", [], "a-file is a file, not a folder"),
    ]:
        assert job.main(["--model", str(checkpoint), "--format", "backbone", "--out", str(target), *extra]) == 2
        assert said in capsys.readouterr().err.replace("\n", " ")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me" and (tmp_path / "a-file").read_text() == "x"
    with pytest.raises(SystemExit):
        job.main(["--model", str(checkpoint), "--format", "backbone", "--out", str(tmp_path / "e"),
                  "--eval-crop", "0.9"])  # fmt: skip
    assert "--eval-crop is the view of a classifier" in capsys.readouterr().err and not (tmp_path / "e").exists()

