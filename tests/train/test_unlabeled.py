"""Unlabeled faces for MAE pretraining: `jobs/shard.py --unlabeled` makes an `unlabeled` split that only pretraining
reads (data.extra), every labelled reader refuses it, and pretraining reads train + unlabeled of every dataset it
is given, never val or test, each source once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import evaluate as evaluate_job  # jobs/evaluate.py
import numpy as np
import pretrain as pretrain_job  # jobs/pretrain.py
import pytest
import shard as shard_job  # jobs/shard.py
from PIL import Image
from test_pretrain import QUICKSTART, tiny_pretrain

from ferdist.config import DataConfig, PretrainConfig, load_config, to_yaml
from ferdist.data.loader import build_loader, open_dataset, open_pretraining_data
from ferdist.errors import FerdistError
from ferdist.launch.preflight import with_absolute_paths
from ferdist.train.loop import LocalSession
from ferdist.train.pretraining import run_pretraining


def face_folder(root: Path) -> Path:
    """21 'face crops' as found in the wild: sizes, colour and bit depths vary, some in sub-folders, plus hidden
    files that are not faces. Each wide image is white in its centre square and black at the sides."""
    root.mkdir()
    (root / "batch2" / "deeper").mkdir(parents=True)
    for i in range(7):
        wide = np.zeros((60, 100, 3), np.uint8)
        wide[:, 20:80] = 255
        Image.fromarray(wide).save(root / f"wide_{i}.jpg", quality=100)
        Image.fromarray(np.full((96, 96), 40 + i, np.uint8)).save(root / "batch2" / f"grey_{i}.png")
        sixteen = np.full((30, 30), 65535, np.uint16)  # white in 16 bits must stay white, not clip
        Image.fromarray(sixteen).save(root / "batch2" / "deeper" / f"deep_{i}.png")
    (root / ".DS_Store").write_bytes(b"\0\0")
    (root / ".thumbs").mkdir()
    (root / ".thumbs" / "notes.txt").write_text("not a face")
    return root


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("unlabeled")
    dest = base / "shards"
    args = ["--source", str(face_folder(base / "faces")), "--unlabeled", "--dest", str(dest),
            "--samples-per-shard", "4", "--workers", "1"]  # fmt: skip
    assert shard_job.main(args) == 0
    return dest


def test_an_unlabeled_folder_shards_to_an_unlabeled_split_of_centre_cropped_faces(unlabeled: Path) -> None:
    ds = open_dataset(str(unlabeled))
    assert list(ds.manifest.splits) == ["unlabeled"] and ds.manifest.source.kind == "unlabeled-folder"
    split = ds.manifest.split("unlabeled", labelled=False)
    assert split.samples == 21 and split.class_counts == [0] * 7 and len(split.shards) == 6
    loader = build_loader(ds.select("unlabeled", labelled=False), None, DataConfig(loader_workers=0), batch_size=8,
                          training=False)  # fmt: skip
    images = np.concatenate([b["image"][:, 0].numpy() for b in loader])
    assert images.shape == (21, 48, 48)
    means = sorted(float(face.mean()) for face in images)
    # batch2 (sorted first): greys 40..46, exact; deeper: 16-bit white -> 255; wide: the white centre only (a
    # squashed image would bring in the black sides: mean ~153).
    assert means[:7] == [40.0, 41.0, 42.0, 43.0, 44.0, 45.0, 46.0]
    assert all(m > 250 for m in means[7:])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "readme.txt").write_text("x"), "readme.txt: not an image file"),
        (lambda d: (d / "broken.png").write_bytes(b"not a png"), "broken.png: not a readable image"),
        (lambda d: None, "no image files under it; put the face crops"),
    ],
)
def test_bad_unlabeled_folders_get_one_sentence_and_write_nothing(
    make, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "faces"
    folder.mkdir()
    if message != "no image files under it; put the face crops":
        Image.fromarray(np.zeros((48, 48), np.uint8)).save(folder / "ok.png")
    make(folder)
    args = ["--source", str(folder), "--unlabeled", "--dest", str(tmp_path / "out"), "--workers", "1"]
    assert shard_job.main(args) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unlabeled_takes_a_folder(synth_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert shard_job.main(["--source", str(synth_csv), "--unlabeled", "--dest", str(tmp_path / "o")]) == 2
    assert "--unlabeled takes a folder of face images, and this is a file" in capsys.readouterr().err
    assert shard_job.main(["--source", "synthetic", "--unlabeled", "--dest", str(tmp_path / "o")]) == 2
    assert "--unlabeled takes a folder of face images, not the SYNTHETIC set" in capsys.readouterr().err


def test_labelled_readers_refuse_the_unlabeled_split(
    unlabeled: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = open_dataset(str(unlabeled))
    with pytest.raises(FerdistError, match="split 'unlabeled' holds faces without labels, which only MAE pretraining"):
        build_loader(ds, "unlabeled", DataConfig(), batch_size=4, training=False)
    # Fine-tuning on it: there is no train split, and the sentence says what the dataset is for.
    with pytest.raises(FerdistError, match="has no 'train' split .it has: unlabeled.; it holds only unlabeled faces"):
        build_loader(ds, "train", DataConfig(), batch_size=4, training=True)
    # Evaluation would score placeholder labels: refused before the model is fetched.
    args = ["--model", str(tiny_checkpoint), "--manifest", str(unlabeled), "--split", "unlabeled", "--no-track"]
    assert evaluate_job.main(args) == 2
    err = capsys.readouterr().err
    assert "split 'unlabeled' holds faces without labels" in err and "Traceback" not in err


def test_a_manifest_whose_unlabeled_split_claims_labels_is_damaged(unlabeled: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(unlabeled, copy)
    doc = json.loads((copy / "manifest.json").read_text())
    doc["splits"]["unlabeled"]["class_counts"] = [21, 0, 0, 0, 0, 0, 0]
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(FerdistError, match="class_counts .* are not all zero .its faces have no labels."):
        open_dataset(str(copy))


def test_pretraining_reads_train_and_unlabeled_of_every_dataset_and_never_val_or_test(
    synth_shards: Path, unlabeled: Path, tmp_path: Path
) -> None:
    train = open_dataset(str(synth_shards)).manifest.split("train").samples
    data = open_pretraining_data(str(synth_shards), [str(unlabeled)])
    assert data.samples == train + 21 == 301
    loader = build_loader(data, None, DataConfig(loader_workers=0), batch_size=32, training=False)
    assert sum(len(b["image"]) for b in loader) == 301
    uris = {ref.uri.rsplit("/", 1)[-1].split("-")[0] for ref in data.shards}
    assert uris == {"train", "unlabeled"}

    cfg = tiny_pretrain(synth_shards, f"data.extra=[{unlabeled}]", "loop.epochs=1", "model.pictures_every=0")
    state = run_pretraining(cfg, LocalSession(tmp_path / "run"))
    assert state.history[0]["step"] == 301 // 32  # the extra faces make a 10th step (280 // 32 = 8)


def test_extra_data_settings_parse_from_yaml_and_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text("data:\n  extra:\n    - shards/a\n    - s3://bucket/b\n")
    from_yaml = load_config(yaml_file, root=PretrainConfig)
    from_cli = load_config(None, ["data.extra=[shards/a, s3://bucket/b]"], root=PretrainConfig)
    assert from_yaml.data.extra == from_cli.data.extra == ("shards/a", "s3://bucket/b")
    assert load_config(None, ["data.extra=shards/a"], root=PretrainConfig).data.extra == ("shards/a",)
    (tmp_path / "round.yaml").write_text(to_yaml(from_cli))
    assert load_config(tmp_path / "round.yaml", root=PretrainConfig) == from_cli
    # Ray workers do not run in the driver's directory: relative extra datasets travel as absolute paths.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards" / "a").mkdir(parents=True)
    moved = with_absolute_paths(from_cli)
    assert moved.data.extra == (str(tmp_path / "shards" / "a"), "s3://bucket/b")
    # Two spellings of one folder meet only once resolved: one sentence there, not the config's ValueError.
    with pytest.raises(FerdistError, match=r"^distill.teacher names a model twice"):
        with_absolute_paths(load_config(None, [f"distill.teacher=[shards/a, {tmp_path / 'shards' / 'a'}/]"]))
    with pytest.raises(FerdistError, match=r"^data.extra names a dataset twice"):
        with_absolute_paths(load_config(None, [f"data.extra=[shards/a, {tmp_path}/shards/a]"], root=PretrainConfig))
    for bad, message in [
        ("data.extra=[shards/a, shards/a]", "data.extra names a dataset twice"),
        ("data.extra=[shards/synthetic]", "data.extra names shards/synthetic twice (it is data.manifest)"),
        ("data.extra=[shards/a", "data.extra must be a list such as [shards/a, s3://bucket/b]"),
        ("data.extra=['']", "data.extra[0] is empty"),
    ]:
        with pytest.raises(FerdistError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            load_config(None, [bad], root=PretrainConfig)


def test_bad_extra_data_is_one_sentence_and_starts_nothing(
    synth_shards: Path, unlabeled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    faces = face_folder(tmp_path / "raw")
    copy = tmp_path / "copy-of-synth"
    shutil.copytree(synth_shards, copy)
    held_out = tmp_path / "held-out"
    shutil.copytree(synth_shards, held_out)
    doc = json.loads((held_out / "manifest.json").read_text())
    del doc["splits"]["train"]
    doc["source"]["sha256"] = "0" * 64
    (held_out / "manifest.json").write_text(json.dumps(doc))
    labelled = tmp_path / "labelled"  # train/<class>/, test/<class>/: --unlabeled would pretrain on its test faces
    for split in ("Train", "test"):
        (labelled / split / "happy").mkdir(parents=True)
        Image.fromarray(np.full((48, 48), 90, np.uint8)).save(labelled / split / "happy" / "a.png")
    cases = [
        (faces, f"data.extra[1]: {faces} is a folder of images, not a sharded dataset; shard it first with python "
                f"jobs/shard.py --source {faces} --unlabeled --dest shards/raw-unlabeled"),
        (labelled, f"data.extra[1]: {labelled} is a folder of images, not a sharded dataset; it holds split folders, "
                   f"so shard it as labelled faces (python jobs/shard.py --source {labelled} --dest shards/labelled)"),
        (copy, f"data.extra[1] ({copy}) holds the same faces as data.manifest ({synth_shards})"),
        (held_out, f"data.extra[1] ({held_out}) has no train or unlabeled split (it has: test, val)"),
        (tmp_path / "nothing", "data.extra[1]: no manifest at"),
    ]  # fmt: skip
    for extra, message in cases:
        args = ["--config", str(QUICKSTART), "--set", f"data.manifest={synth_shards}", "--set",
                f"data.extra=[{unlabeled}, {extra}]", "--set", "tracking.backend=none",
                "--set", f"checkpoint.storage_path={tmp_path / 'runs'}", "--output", str(tmp_path / "out")]  # fmt: skip
        assert pretrain_job.main(args) == 2
        err = capsys.readouterr().err.replace("\n", " ")
        assert message in err, err
        assert "Traceback" not in err and not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()
