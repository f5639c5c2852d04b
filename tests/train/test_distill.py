"""Knowledge distillation (distill.*): the loss against its definition, the ensemble's average, a real run with a
ferdist checkpoint as the teacher (the teacher untouched, the student's saved model unchanged in shape), the `fer`
peer's input equal to its own preprocessing, and each bad teacher one sentence before anything is written."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ferdist.config import DistillConfig, load_config
from ferdist.data.transforms import to_model_input
from ferdist.errors import FerdistError
from ferdist.launch import teachers
from ferdist.train.distill import (
    Member,
    Teacher,
    combined_loss,
    distillation_loss,
    grey_unit,
    no_teacher,
    resized,
    teacher_probabilities,
)
from ferdist.train.loop import LocalSession, run_training

K = 7


def logits(seed: int, n: int = 5) -> torch.Tensor:
    return torch.randn(n, K, generator=torch.Generator().manual_seed(seed)) * 3


def test_the_soft_loss_is_zero_when_the_student_answers_as_the_teacher_and_the_scaled_kl_otherwise() -> None:
    cfg = DistillConfig(teacher=("t",), temperature=4.0)
    student, teacher = logits(0), logits(1)
    assert distillation_loss(teacher, teacher[None], cfg).item() == pytest.approx(0.0, abs=1e-6)
    p_t, p_s = torch.softmax(teacher / 4, 1), torch.softmax(student / 4, 1)
    by_hand = 16 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    assert distillation_loss(student, teacher[None], cfg).item() == pytest.approx(by_hand.item(), rel=1e-5)
    # The temperature matters: at T = 1 the same pair gives the plain KL.
    p_t1, p_s1 = torch.softmax(teacher, 1), torch.softmax(student, 1)
    plain = (p_t1 * (p_t1.log() - p_s1.log())).sum(1).mean()
    one = DistillConfig(teacher=("t",), temperature=1.0)
    assert distillation_loss(student, teacher[None], one).item() == pytest.approx(plain.item(), rel=1e-5)


def test_an_ensemble_is_the_mean_of_its_members_probabilities_at_the_temperature() -> None:
    members = torch.stack([logits(1), logits(2), logits(3)])
    expected = sum(torch.softmax(m / 2, 1) for m in members) / 3
    assert torch.allclose(teacher_probabilities(members, temperature=2.0), expected)
    # Not the softmax of the mean logits: the two differ for members that disagree.
    assert not torch.allclose(expected, torch.softmax(members.mean(0) / 2, 1), atol=1e-3)
    cfg = DistillConfig(teacher=("a", "b", "c"), temperature=2.0)
    student = logits(0)
    by_hand = 4 * F.kl_div(F.log_softmax(student / 2, 1), expected, reduction="batchmean")
    assert distillation_loss(student, members, cfg).item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_the_hard_loss_is_cross_entropy_to_the_ensembles_top_class() -> None:
    members = torch.stack([logits(1), logits(2)])
    top = (torch.softmax(members[0], 1) + torch.softmax(members[1], 1)).argmax(1)
    student = logits(0)
    cfg = DistillConfig(teacher=("a", "b"), kind="hard", temperature=9.0)  # the temperature plays no part
    assert distillation_loss(student, members, cfg).item() == pytest.approx(F.cross_entropy(student, top).item())


def test_the_weight_shares_the_loss_between_labels_and_teacher() -> None:
    label, teacher = torch.tensor(2.0), torch.tensor(10.0)
    assert combined_loss(label, teacher, weight=0.0).item() == 2.0
    assert combined_loss(label, teacher, weight=1.0).item() == 10.0
    assert combined_loss(label, teacher, weight=0.25).item() == pytest.approx(0.75 * 2 + 0.25 * 10)


def test_a_teacher_stays_in_eval_mode_takes_no_gradient_and_resizes_the_student_input() -> None:
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.9), torch.nn.Linear(3 * 16 * 16, K))
    teacher = Teacher([Member(net, resized(16), name="t")])
    teacher.train()  # what the loop's model.train() would do to a child module
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    out = teacher(x)
    assert out.shape == (1, 4, K) and not out.requires_grad
    assert torch.equal(out, teacher(x))  # dropout off: the same answer twice
    assert not any(p.requires_grad for p in teacher.parameters())
    small = F.interpolate(x.detach(), size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(out[0], net.eval()(small))


def test_grey_unit_undoes_the_model_inputs_normalisation() -> None:
    faces = torch.randint(0, 256, (3, 1, 48, 48), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    grey = grey_unit(to_model_input(faces, image_size=48))
    assert torch.allclose(grey, faces.float() / 255, atol=1e-5)  # float rounding only: a grey level is 4e-3


def test_the_fer_peers_input_through_the_adapter_is_its_own_preprocessing() -> None:
    cfg = load_config(None, ["distill.teacher=peer:fer"])
    try:
        member, info = teachers.load_member("peer:fer", cfg)
    except FerdistError as exn:
        pytest.skip(f"the fer peer's weights are not available here (no package index?): {exn}")
    faces = torch.randint(0, 256, (4, 48, 48), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    ours = member(to_model_input(faces[:, None], image_size=48))
    theirs = member.model(member.model.preprocess(faces)).log()
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert "PrivateTest" in info.saw and "has seen the test split" in info.saw


# --------------------------------------------------------------------------- a real run


def tiny(manifest: Path, *extra: str):  # noqa: ANN201
    return load_config(None, [f"data.manifest={manifest}", "data.loader_workers=0", "model.pretrained=random:tiny",
                              "model.image_size=32", "loop.epochs=1", "loop.global_batch_size=32", "optim.lr=2e-3",
                              "tracking.backend=none", *extra])  # fmt: skip


def digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()


def test_a_run_with_a_checkpoint_as_teacher_learns_from_it_and_saves_the_same_student(
    synth_shards: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    before = digest(tiny_checkpoint)
    plain = run_training(tiny(synth_shards), LocalSession(tmp_path / "plain"))
    cfg = tiny(synth_shards, f"distill.teacher={tiny_checkpoint}", "distill.weight=0.7")
    taught = run_training(cfg, LocalSession(tmp_path / "taught"), make_teacher=teachers.make_teacher)
    assert digest(tiny_checkpoint) == before  # the teacher is never trained
    # The same seed, data and student: only the teacher's term makes the loss differ.
    assert taught.history[0]["train/loss"] != pytest.approx(plain.history[0]["train/loss"], rel=1e-3)
    a = torch.load(tmp_path / "plain" / "model_epoch_0001" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "taught" / "model_epoch_0001" / "model.pt", weights_only=True)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}  # no teacher weights inside
    summary = json.loads((tmp_path / "taught" / "model_epoch_0001" / "summary.json").read_text())
    assert summary["classes"] == ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]


def test_a_run_asking_for_a_teacher_without_a_way_to_load_it_is_refused(synth_shards: Path, tmp_path: Path) -> None:
    cfg = tiny(synth_shards, "distill.teacher=peer:fer")
    with pytest.raises(FerdistError, match=r"distill.teacher=\['peer:fer'\] asks for a teacher"):
        run_training(cfg, LocalSession(tmp_path / "r"))
    with pytest.raises(FerdistError):
        no_teacher(cfg, torch.device("cpu"))
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("override", "message"), [
    ("distill.weight=1.5", r"distill.weight must be in \[0, 1\]"),
    ("distill.weight=-0.1", r"distill.weight must be in \[0, 1\]"),
    ("distill.temperature=0", r"distill.temperature must be in \(0, 100\]"),
    ("distill.kind=soft-ish", r"distill.kind"),
    ("distill.teacher=['a', 'a']", r"names a model twice"),
    ("distill.teacher=['']", r"empty URI"),
    ("distill.teacher=peer:FER", r"peer:FER is no peer ferdist knows; the one peer teacher is peer:fer"),
    ("distill.teacher=[peer:fer, 'peer:']", r"distill.teacher peer: is no peer ferdist knows"),
    ("distill.kind=hard", r"distill.kind=hard does nothing without a teacher; set distill.teacher"),
    ("distill.temperature=2", r"distill.temperature=2.0 does nothing without a teacher"),
])  # fmt: skip
def test_bad_distillation_settings_are_one_sentence(override: str, message: str) -> None:
    with pytest.raises(FerdistError, match=message) as caught:
        load_config(None, [override])
    assert "\n" not in str(caught.value)


def test_pretraining_has_no_teacher() -> None:
    from ferdist.config import PretrainConfig

    with pytest.raises(FerdistError, match="distill"):
        load_config(None, ["distill.teacher=peer:fer"], root=PretrainConfig)


def run_job(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    import train  # jobs/train.py

    rc = train.main(argv)
    return rc, capsys.readouterr().err


@pytest.fixture
def jobs_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "jobs"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def other_order(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "other-order"
    shutil.copytree(tiny_checkpoint, folder)
    summary = json.loads((folder / "summary.json").read_text())
    summary["classes"] = ["Happy", "Angry", "Disgust", "Fear", "Sad", "Surprise", "Neutral"]
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def five_classes(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "five"
    shutil.copytree(tiny_checkpoint, folder)
    state = torch.load(folder / "model.pt", weights_only=True)
    state["head.weight"], state["head.bias"] = state["head.weight"][:5], state["head.bias"][:5]
    torch.save(state, folder / "model.pt")
    summary = json.loads((folder / "summary.json").read_text())
    summary.pop("classes", None)
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.mark.parametrize(("teacher", "message"), [
    (lambda ck, tmp: str(tmp / "no-such-model"), r"distill.teacher .*no-such-model: no model at"),
    (lambda ck, tmp: "models:/no-such-teacher@champion", r"distill.teacher models:/no-such-teacher@champion: cannot "
                                                          r"load the model"),
    (other_order, r"answers classes \['Happy', 'Angry'.*not FER2013's .* in that order"),
    (five_classes, r"answers 5 classes, not FER2013's"),
])  # fmt: skip
def test_a_bad_teacher_is_one_sentence_before_ray_starts_and_nothing_is_written(
    teacher, message: str, synth_shards: Path, tiny_checkpoint: Path, tmp_path: Path,  # noqa: ANN001
    jobs_on_path: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    uri = teacher(tiny_checkpoint, tmp_path)
    storage = tmp_path / "runs"
    overrides = [f"data.manifest={synth_shards}", "model.pretrained=random:tiny", "model.image_size=32",
                 "tracking.backend=none", f"checkpoint.storage_path={storage}", f"distill.teacher={uri}"]
    rc, err = run_job([*(part for o in overrides for part in ("--set", o)), "--cpu"], capsys)
    assert rc == 2
    assert re.search(message, " ".join(err.split())), err
    assert "Traceback" not in err
    assert not storage.exists() and not (tmp_path / "mlflow.db").exists()



def test_a_registry_teacher_is_read_from_the_store_the_driver_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches a worker (which runs in another directory) looking for a models:/ teacher in its own ./mlflow.db
    rather than the driver's store, where the driver's check had found it."""
    from mlflow.tracking import MlflowClient

    from ferdist.launch.preflight import with_absolute_paths
    from ferdist.launch.teachers import load_member

    driver, worker = tmp_path / "driver", tmp_path / "worker"
    driver.mkdir(), worker.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(driver)
    MlflowClient(f"sqlite:///{driver / 'mlflow.db'}").search_experiments()  # the driver's default store
    cfg = with_absolute_paths(load_config(None, ["distill.teacher=models:/teacher@champion", "tracking.backend=none"]))
    assert cfg.tracking.tracking_uri == f"sqlite:///{driver / 'mlflow.db'}"
    monkeypatch.chdir(worker)
    # MLflow's own reason differs by version (the name, or the alias, not found); the store it names is the point.
    with pytest.raises(FerdistError, match=rf"from the tracking store sqlite:///{driver}/mlflow\.db \([^)]*not found"):
        load_member("models:/teacher@champion", cfg)
    assert not (worker / "mlflow.db").exists()
    assert with_absolute_paths(load_config(None, [f"distill.teacher={tmp_path}"])).tracking.tracking_uri is None
