"""MAE pretraining (jobs/pretrain.py): masking on in pretraining and off in fine-tuning, the loop's loss and exact
resume, the save_pretrained output a fine-tuning run loads as it is (local and S3), and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pretrain as pretrain_job
import pytest
import torch
from sessions import CrashingSession

from ferdist.config import ModelConfig, PretrainConfig, load_config
from ferdist.errors import FerdistError
from ferdist.train import backbone_output
from ferdist.train.loop import LocalSession
from ferdist.train.mae import MARKER_FILE, build_pretraining_model, check_start, write_pretrained
from ferdist.train.model import build_model
from ferdist.train.pretraining import run_pretraining, take_resume

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "jobs" / "configs" / "pretrain-quickstart.yaml"


def tiny_pretrain(manifest: Path, *extra: str) -> PretrainConfig:
    return load_config(
        None,
        [f"data.manifest={manifest}", "data.loader_workers=1", "model.pretrained=random:tiny", "model.image_size=32",
         "optim.lr=3e-3", "optim.warmup_epochs=1", "loop.epochs=4", "loop.global_batch_size=32",
         "tracking.backend=none", *extra],
        root=PretrainConfig,
    )  # fmt: skip


def saved_output(tmp_path: Path, cfg: PretrainConfig, state_dir: Path) -> Path:
    out = tmp_path / "backbone"
    backbone_output.publish(state_dir, str(out), mine=backbone_output.owner(cfg.name, "here"))
    return out


def test_masking_is_on_in_pretraining_and_off_in_fine_tuning_and_the_encoder_is_loaded_exactly(
    tmp_path: Path,
) -> None:
    cfg = tiny_pretrain(tmp_path / "unused")
    mae = build_pretraining_model(cfg.model, seed=3)
    faces = torch.randn(5, 3, 32, 32)
    out = mae(pixel_values=faces)
    patches = (32 // 8) ** 2
    assert out.mask.shape == (5, patches) and out.mask.sum(1).tolist() == [0.75 * patches] * 5
    assert mae.config.norm_pix_loss and mae.config.mask_ratio == 0.75
    # The decoder must know where each hidden patch goes (transformers leaves these at zero; see model.py).
    assert mae.decoder.decoder_pos_embed.abs().sum() > 0 and mae.decoder.mask_token.abs().sum() > 0

    folder = tmp_path / "backbone"
    write_pretrained(mae.state_dict(), mae.config.to_dict(), folder, marker={"run": "t", "storage_path": "x"})
    assert json.loads((folder / "config.json").read_text())["mask_ratio"] == 0.75  # as written, masking on
    classifier = build_model(ModelConfig(pretrained=str(folder), image_size=32, freeze_blocks=0), seed=0)
    backbone = classifier.backbone
    assert backbone.config.mask_ratio == 0.0  # fine-tuning sees every patch
    tokens = backbone(torch.randn(2, 3, 32, 32), noise=torch.arange(patches).float().expand(2, -1))
    assert tokens.last_hidden_state.shape[1] == patches + 1
    encoder = {k.removeprefix("vit."): v for k, v in mae.state_dict().items() if k.startswith("vit.")}
    loaded = backbone.state_dict()
    assert set(loaded) == set(encoder)
    assert all(torch.equal(loaded[k], encoder[k]) for k in encoder)


def test_pretraining_lowers_the_loss_and_a_resumed_run_ends_bit_identical(synth_shards: Path, tmp_path: Path) -> None:
    cfg = tiny_pretrain(synth_shards, "checkpoint.every_epochs=2", "model.pictures_every=0")
    clean = run_pretraining(cfg, LocalSession(tmp_path / "clean"))
    losses = [m["train/loss"] for m in clean.history]
    assert losses[-1] < losses[0] - 0.02, losses

    # Killed after epoch 3: epoch 2's state is the last resume point, so epoch 3 is trained again.
    with pytest.raises(RuntimeError, match="worker lost"):
        run_pretraining(cfg, CrashingSession(tmp_path / "crashed", crash_after=3))
    resumed = run_pretraining(cfg, LocalSession(tmp_path / "crashed"))
    assert resumed.resumed_at == [2]
    assert [m["epoch"] for m in resumed.history] == [1, 2, 3, 4]
    strip = lambda h: [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in h]  # noqa: E731
    assert strip(resumed.history) == strip(clean.history)
    a = torch.load(tmp_path / "clean" / "checkpoint_epoch_0004" / "trained.pt", weights_only=True)
    b = torch.load(tmp_path / "crashed" / "checkpoint_epoch_0004" / "trained.pt", weights_only=True)
    assert set(a) == set(b) and any(k.startswith("decoder.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_output_is_what_fine_tuning_loads(synth_shards: Path, tmp_path: Path) -> None:
    cfg = tiny_pretrain(synth_shards, "loop.epochs=1", "model.pictures_every=0")
    run_pretraining(cfg, LocalSession(tmp_path / "run"))
    out = saved_output(tmp_path, cfg, tmp_path / "run" / "checkpoint_epoch_0001")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", MARKER_FILE, "model.safetensors"]
    trained = torch.load(tmp_path / "run" / "checkpoint_epoch_0001" / "trained.pt", weights_only=True)
    backbone = build_model(ModelConfig(pretrained=str(out), image_size=32), seed=0).backbone
    assert all(torch.equal(v, trained[f"vit.{k}"]) for k, v in backbone.state_dict().items())
    # Pretraining can continue from its own output: encoder and decoder both come back.
    again = build_pretraining_model(tiny_pretrain(synth_shards, f"model.pretrained={out}").model, seed=5)
    assert all(torch.equal(v, trained[k]) for k, v in again.state_dict().items())
    # The same run writing again (re-submitted) replaces its own output, leaving no staging folders behind.
    (out / "model.safetensors").write_bytes(b"stale")
    saved_output(tmp_path, cfg, tmp_path / "run" / "checkpoint_epoch_0001")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone", "run"]
    assert (out / "model.safetensors").read_bytes() != b"stale"


def test_the_output_goes_to_s3_and_fine_tuning_loads_it_from_there(
    synth_shards: Path, tmp_path: Path, s3: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint, bucket = s3
    monkeypatch.setenv("FERDIST_CACHE", str(tmp_path / "cache"))
    cfg = tiny_pretrain(synth_shards, "loop.epochs=1", "model.pictures_every=0")
    run_pretraining(cfg, LocalSession(tmp_path / "run"))
    uri = f"s3://{bucket}/backbones/tiny"
    mine = backbone_output.owner(cfg.name, "here")
    written = backbone_output.publish(tmp_path / "run" / "checkpoint_epoch_0001", uri, mine=mine, endpoint_url=endpoint)
    assert written == uri
    trained = torch.load(tmp_path / "run" / "checkpoint_epoch_0001" / "trained.pt", weights_only=True)
    backbone = build_model(ModelConfig(pretrained=uri, image_size=32), seed=0, endpoint_url=endpoint).backbone
    assert all(torch.equal(v, trained[f"vit.{k}"]) for k, v in backbone.state_dict().items())
    # The driver's check before a run reads config.json only, and names the S3 source, not a local copy.
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(FerdistError, match=f"model.image_size=36 is not a multiple of {uri}'s patch size 8"):
        check_start(tiny_pretrain(synth_shards, f"model.pretrained={uri}", "model.image_size=36").model,
                    endpoint_url=endpoint)  # fmt: skip
    assert not (tmp_path / "cache").exists()
    # The same run may write again; another run may not.
    backbone_output.check_output(uri, mine=mine, endpoint_url=endpoint)
    with pytest.raises(FerdistError, match="already holds the backbone of pretraining run 'pretrain-quickstart'"):
        backbone_output.check_output(uri, mine=backbone_output.owner("other", "here"), endpoint_url=endpoint)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "data.split=val"], "data.split=val: pretraining reads only the train split; val is held out"),
        (["--set", "data.split=test"], "data.split=test: pretraining reads only the train split; test is held out"),
        (["--set", "model.image_size=50"], "model.image_size=50 is not a multiple of random:tiny's patch size 8"),
        (["--set", "model.pretrained=random:huge"], "random:huge is unknown; use random:tiny, random:small"),
        (["--set", "model.freeze_blocks=2"], "command line: model.freeze_blocks is a fine-tuning setting, which this "
                                             "job does not take; it belongs to jobs/train.py"),
        (["--config", str(QUICKSTART.with_name("quickstart.yaml"))], "quickstart.yaml: model.freeze_blocks is a "
         "fine-tuning setting, which this job does not take; is this a fine-tuning config (for jobs/train.py)?"),
        (["--set", "model.mask_ratio=1"], "model.mask_ratio must be in (0, 1), got 1.0"),
        # 16 patches at 32 px: 0.95 keeps int(16 × 0.05) = 0 of them, which ViTMAE would silently train on.
        (["--set", "model.mask_ratio=0.95"], "model.mask_ratio=0.95 hides all 16 patches of a 32 px face with "
                                             "random:tiny's 8 px patches, so the encoder would see none; use at most "
                                             "0.9375"),
        (["--set", "optim.label_smoothing=0.1"], "optim.label_smoothing is a fine-tuning setting that pretraining "
                                                 "would ignore"),
    ],
)
def test_bad_input_exits_2_with_one_sentence_and_starts_nothing(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], synth_shards: Path, tmp_path: Path
) -> None:
    base = ["--config", str(QUICKSTART), "--set", f"data.manifest={synth_shards}", "--set", "tracking.backend=none",
            "--set", f"checkpoint.storage_path={tmp_path / 'runs'}", "--output", str(tmp_path / "out")]  # fmt: skip
    assert pretrain_job.main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err.replace("\n", " ")
    assert "Traceback" not in err and not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_a_checkpoint_whose_patch_does_not_divide_the_image_size_is_refused(
    capsys: pytest.CaptureFixture[str], synth_shards: Path, tmp_path: Path
) -> None:
    mae = build_pretraining_model(tiny_pretrain(tmp_path).model, seed=0)  # 8 px patches
    mae.save_pretrained(tmp_path / "vit-mae")
    args = ["--config", str(QUICKSTART), "--set", f"data.manifest={synth_shards}", "--set", "tracking.backend=none",
            "--set", f"model.pretrained={tmp_path / 'vit-mae'}", "--set", "model.image_size=36",
            "--output", str(tmp_path / "out")]  # fmt: skip
    assert pretrain_job.main(args) == 2
    assert f"model.image_size=36 is not a multiple of {tmp_path / 'vit-mae'}'s patch size 8; use a multiple of 8" in (
        capsys.readouterr().err.replace("\n", " ")
    )


@pytest.mark.parametrize("holder", ["another model", "another run", "other files", "a file"])
def test_an_output_that_holds_something_else_is_refused_and_left_as_it_was(
    holder: str, capsys: pytest.CaptureFixture[str], synth_shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    if holder == "another model":
        build_pretraining_model(tiny_pretrain(tmp_path).model, seed=0).save_pretrained(out)
        expected = "already holds a model that ferdist pretraining did not write (it has config.json)"
    elif holder == "another run":
        mae = build_pretraining_model(tiny_pretrain(tmp_path).model, seed=0)
        write_pretrained(mae.state_dict(), mae.config.to_dict(), out, marker=backbone_output.owner("other", "x"))
        expected = "already holds the backbone of pretraining run 'other'"
    elif holder == "other files":
        (out / "notes").mkdir(parents=True)
        (out / "notes" / "todo.txt").write_text("keep me")
        expected = "already holds 1 files (e.g. notes/todo.txt)"
    else:
        out.write_text("keep me")
        expected = "is a file; give a folder"
    before = {p: p.read_bytes() for p in [out, *out.rglob("*")] if p.is_file()}
    args = ["--config", str(QUICKSTART), "--set", f"data.manifest={synth_shards}", "--set", "tracking.backend=none",
            "--set", f"checkpoint.storage_path={tmp_path / 'runs'}", "--output", str(out)]  # fmt: skip
    assert pretrain_job.main(args) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert f"--output {out} " in err and expected in err
    assert {p: p.read_bytes() for p in [out, *out.rglob("*")] if p.is_file()} == before
    assert not (tmp_path / "runs").exists()  # refused before any training


def test_take_resume_holds_encoder_decoder_optimizer_and_progress(synth_shards: Path, tmp_path: Path) -> None:
    """Catches resume state that loses or shares the optimizer's moments, the scheduler or weights: after a real
    step, the snapshot holds copies of every tensor, and a model restored from it takes the same next step."""
    from ferdist.train.checkpoint import write_snapshot
    from ferdist.train.pretraining import restore

    cfg = tiny_pretrain(synth_shards, "loop.epochs=1", "model.pictures_every=0")
    state = run_pretraining(cfg, LocalSession(tmp_path / "run"))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler) -> None:
        torch.manual_seed(1)  # the same mask for both runs
        opt.zero_grad()
        model(pixel_values=x).loss.backward()
        opt.step()
        sched.step()

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        mae = build_pretraining_model(cfg.model, seed=0)
        opt = torch.optim.AdamW(mae.parameters(), lr=1e-3)
        return mae, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)

    mae, opt, sched = fresh()
    step(mae, opt, sched)
    snap = take_resume(mae, cfg=cfg, state=state, optimizer=opt, scheduler=sched)
    assert snap.epoch == 1 and snap.train_state is not None and snap.train_state["epochs_done"] == 1
    assert snap.backbone["mask_ratio"] == 0.75
    live = mae.state_dict()
    assert set(snap.weights) == set(live) and all(torch.equal(snap.weights[k], live[k]) for k in live)
    saved_opt, live_opt = snap.train_state["optimizer"], opt.state_dict()
    assert saved_opt["state"].keys() == live_opt["state"].keys() and len(live_opt["state"]) > 0
    assert any(moments["exp_avg"].abs().sum() > 0 for moments in live_opt["state"].values())
    for k, moments in live_opt["state"].items():  # step, exp_avg, exp_avg_sq after the real step
        for name, value in moments.items():
            assert torch.equal(saved_opt["state"][k][name], value), (k, name)
    assert saved_opt["param_groups"][0]["lr"] == live_opt["param_groups"][0]["lr"] == 0.5e-3
    assert snap.train_state["scheduler"]["last_epoch"] == 1

    write_snapshot(snap, tmp_path / "resume")
    step(mae, opt, sched)  # training goes on while the snapshot is written: the snapshot must not follow
    assert not torch.equal(
        snap.train_state["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )

    again, again_opt, again_sched = fresh()
    assert restore(tmp_path / "resume", raw_model=again, optimizer=again_opt, scheduler=again_sched).epochs_done == 1
    step(again, again_opt, again_sched)  # the restored model takes the very step the original took
    assert all(torch.equal(again.state_dict()[k], v) for k, v in mae.state_dict().items())
    for k, moments in opt.state_dict()["state"].items():
        for name, value in moments.items():
            assert torch.equal(again_opt.state_dict()["state"][k][name], value), (k, name)


# --------------------------------------------------------------------------- the real job under Ray


@pytest.mark.slow
def test_pretrain_job_on_two_ray_workers_then_fine_tune_from_its_output(
    synth_shards: Path, tmp_path: Path, mlflow_server: str
) -> None:
    """jobs/pretrain.py → its folder → jobs/train.py --set model.pretrained=that folder, as a user runs them."""
    out = tmp_path / "backbone"
    common = ["--set", f"data.manifest={synth_shards}", "--set", f"checkpoint.storage_path={tmp_path / 'runs'}",
              "--set", f"tracking.tracking_uri={mlflow_server}", "--set", "checkpoint.max_failures=0"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--config", str(QUICKSTART), *common,
         "--set", "name=pt-ray", "--workers", "2", "--set", "loop.epochs=6", "--set", "loop.global_batch_size=32",
         "--set", "model.pictures_every=3", "--output", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    # The path is the last stdout line (Ray forwards the workers' own prints, MLflow's run links, above it).
    assert done.stdout.strip().splitlines()[-1] == str(out)
    assert json.loads((out / MARKER_FILE).read_text())["run"] == "pt-ray"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("ferdist-pretrain").experiment_id],
                                filter_string="tags.`ferdist.run` = 'pt-ray'")  # fmt: skip
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.02, losses
    pictures = [a.path for a in client.list_artifacts(run.info.run_id, "reconstructions")]
    assert pictures == ["reconstructions/epoch_0003.png", "reconstructions/epoch_0006.png"]
    assert run.data.tags["ferdist.output"] == str(out) and run.info.status == "FINISHED"

    fine = subprocess.run(
        [sys.executable, str(ROOT / "jobs/train.py"), "--config", str(ROOT / "jobs/configs/quickstart.yaml"), *common,
         "--set", "name=ft-from-mae", "--set", f"model.pretrained={out}", "--set", "model.image_size=32",
         "--set", "loop.epochs=1", "--workers", "1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False,
    )  # fmt: skip
    assert fine.returncode == 0, fine.stderr[-4000:]
    assert "1 epochs; best epoch 1" in fine.stderr


def test_publish_latest_writes_the_newest_checkpoints_backbone_without_training(
    capsys: pytest.CaptureFixture[str], synth_shards: Path, tmp_path: Path
) -> None:
    storage, out = tmp_path / "runs", tmp_path / "so-far"
    base = ["--config", str(QUICKSTART), "--set", f"data.manifest={synth_shards}", "--set", "tracking.backend=none",
            "--set", f"checkpoint.storage_path={storage}", "--set", "name=long", "--output", str(out),
            "--publish-latest"]  # fmt: skip
    assert pretrain_job.main(base) == 2  # nothing pretrained yet
    assert "holds no pretraining checkpoint yet" in capsys.readouterr().err.replace("\n", " ")
    assert not out.exists()
    cfg = load_config(QUICKSTART, [f"data.manifest={synth_shards}", "tracking.backend=none", "loop.epochs=2",
                                   "checkpoint.every_epochs=1", "name=long", "data.loader_workers=0",
                                   "model.pictures_every=0"], root=PretrainConfig)  # fmt: skip
    run_pretraining(cfg, LocalSession(storage / "long"))  # the same run folder a job of that name uses
    assert pretrain_job.main(base) == 0
    assert "after epoch 2 of" in capsys.readouterr().err
    trained = torch.load(storage / "long" / "checkpoint_epoch_0002" / "trained.pt", weights_only=True)
    backbone = build_model(ModelConfig(pretrained=str(out), image_size=cfg.model.image_size), seed=0).backbone
    assert all(torch.equal(v, trained[f"vit.{k}"]) for k, v in backbone.state_dict().items())
    assert sorted(p.name for p in storage.iterdir()) == ["long"]  # no run started, nothing else written
