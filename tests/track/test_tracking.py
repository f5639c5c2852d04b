"""MLflow tracking against a real `mlflow server` on 127.0.0.1 (and the embedded SQLite default): one run per
training run, params once, metrics with step=epoch, the same run continued after a resume."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port, running_mlflow
from mlflow.tracking import MlflowClient
from sessions import CrashingSession

from ferdist.config import RunConfig, TrackingConfig, load_config
from ferdist.errors import FerdistError
from ferdist.track.tracking import RUN_TAG, check_tracking, make_tracker
from ferdist.train.checkpoint import Snapshot
from ferdist.train.loop import LocalSession, run_training


def tracked_run(manifest: Path, uri: str | None, *extra: str) -> RunConfig:
    overrides = [f"tracking.tracking_uri={uri}"] if uri else []
    return load_config(
        None,
        [f"data.manifest={manifest}", "data.loader_workers=0", "model.pretrained=random:tiny", "model.image_size=32",
         "loop.epochs=3", "loop.global_batch_size=32", "optim.lr=2e-3", "tracking.backend=mlflow",
         "tracking.system_metrics_s=1",
         "tracking.experiment=tests", *overrides, *extra],
    )  # fmt: skip


def test_one_run_with_params_and_per_epoch_metrics_continued_after_resume(
    synth_shards: Path, mlflow_server: str, tmp_path: Path
) -> None:
    cfg = tracked_run(synth_shards, mlflow_server, "name=tracked")
    with pytest.raises(RuntimeError):
        run_training(cfg, CrashingSession(tmp_path, crash_after=2), make_tracker=make_tracker)
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_TAG}` = 'tracked'")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"

    state = run_training(cfg, LocalSession(tmp_path), make_tracker=make_tracker)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_TAG}` = 'tracked'")
    assert len(runs) == 1  # the resumed run logs into the same MLflow run
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["ferdist.status"] == "completed"
    assert run.data.params["optim.lr"] == "0.002" and run.data.params["model.pretrained"] == "random:tiny"
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert [m.step for m in history] == [1, 2, 3]  # each epoch once, none repeated after the resume
    assert [m.value for m in history] == [h["val/acc"] for h in state.history]

    # Audit: the shards it read, as MLflow's dataset input (one, though logged by both attempts).
    (data,) = run.inputs.dataset_inputs
    manifest = (synth_shards / "manifest.json").read_bytes()
    assert data.dataset.digest == hashlib.sha256(json.dumps(json.loads(manifest), indent=2, sort_keys=True).encode()
                                                 + b"\n").hexdigest()[:16]  # fmt: skip
    assert json.loads(data.dataset.source) == {"uri": str(synth_shards)} and data.dataset.name == synth_shards.name
    assert [(t.key, t.value) for t in data.tags] == [("mlflow.data.context", "training")]
    profile = json.loads(data.dataset.profile)
    counts, source = json.loads(manifest)["splits"], json.loads(manifest)["source"]
    assert (profile["source"], profile["source_sha256"], profile["synthetic"]) == (
        source["name"], source["sha256"], source.get("synthetic", False))  # fmt: skip
    assert {k: v["samples"] for k, v in profile["splits"].items()} == {k: v["samples"] for k, v in counts.items()}
    assert profile["splits"]["train"]["class_counts"] == counts["train"]["class_counts"]
    # ... and the machine: MLflow's own system metrics, sampled every tracking.system_metrics_s of rank 0's process.
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)


def test_system_metrics_can_be_turned_off(synth_shards: Path, mlflow_server: str, tmp_path: Path) -> None:
    cfg = tracked_run(synth_shards, mlflow_server, "name=quiet", "loop.epochs=2", "tracking.system_metrics_s=0")
    run_training(cfg, LocalSession(tmp_path), make_tracker=make_tracker)
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                filter_string=f"tags.`{RUN_TAG}` = 'quiet'")  # fmt: skip
    assert "val/acc" in run.data.metrics and not any(k.startswith("system/") for k in run.data.metrics)


def test_embedded_default_is_a_sqlite_store_in_the_working_directory(
    synth_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_training(tracked_run(synth_shards, None, "loop.epochs=1", "name=embedded"), LocalSession(tmp_path / "ck"),
                 make_tracker=make_tracker)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.data.tags[RUN_TAG] for r in runs] == ["embedded"]


def test_a_database_store_without_its_driver_is_one_sentence_that_hides_the_password(
    synth_shards: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Caught: MLflow stopped with SQLAlchemy's ModuleNotFoundError traceback at the first call (evaluate, predict,
    a models:/ teacher). pg8000 is a PostgreSQL driver this project never installs."""
    import evaluate as job

    from ferdist.track.store import tracking_uri

    uri = "postgresql+pg8000://bob:hunter2@127.0.0.1:9/db"
    with pytest.raises(FerdistError, match=r"^the tracking store postgresql\+pg8000://bob:\*\*\*@127\.0\.0\.1:9/db "
                                           r"needs the database driver 'pg8000', which is not installed here; pip "
                                           r"install pg8000"):
        tracking_uri(TrackingConfig(tracking_uri=uri))
    assert tracking_uri(TrackingConfig(tracking_uri="sqlite:///x.db")) == "sqlite:///x.db"  # no driver to check
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert job.main(["--model", "models:/m@champion", "--manifest", str(synth_shards)]) == 2
    err = capsys.readouterr().err
    assert "needs the database driver 'pg8000'" in err and "hunter2" not in err and "Traceback" not in err


def test_unreachable_tracking_server_is_one_sentence_not_a_hang() -> None:
    port = free_port()
    cfg = TrackingConfig(backend="mlflow", tracking_uri=f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(FerdistError, match=rf"cannot reach the MLflow tracking server at http://127\.0\.0\.1:{port} \("
                                           rf"ConnectionError\); start it \(mlflow server --host 127\.0\.0\.1 --port "
                                           rf"{port}\)"):  # fmt: skip  # the server its URI names, not a default
        check_tracking(cfg)
    assert time.monotonic() - started < 10


def test_a_loop_handed_no_tracker_refuses_a_config_that_asks_for_tracking(synth_shards: Path, tmp_path: Path) -> None:
    """The train stage knows no MLflow: a run started without the tracker factory (not through jobs/train.py) says
    so before training, rather than training a run nobody finds in MLflow."""
    cfg = tracked_run(synth_shards, None, "loop.epochs=1", "name=untracked")
    with pytest.raises(FerdistError, match="asks for tracking.backend=mlflow but its loop was given no tracker"):
        run_training(cfg, LocalSession(tmp_path / "ck"))
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").rglob("model_epoch_*"))


def test_only_a_plain_sqlite_file_that_is_not_there_counts_as_a_missing_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches a reader refusing stores that need no file (in memory, SQLite's own URI form) or missing a relative or
    absolute file that is not there (which MLflow would create, empty, on the first read)."""
    from ferdist.track.store import missing_sqlite_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / "here.db").write_bytes(b"")
    assert missing_sqlite_file("sqlite:///gone.db") == Path("gone.db")
    assert missing_sqlite_file(f"sqlite:///{tmp_path / 'gone.db'}?timeout=5") == tmp_path / "gone.db"
    for present in ("sqlite:///here.db", f"sqlite:///{tmp_path / 'here.db'}", "sqlite:///:memory:",
                    "sqlite:///file:gone.db?mode=memory&uri=true", "postgresql://u@db/mlflow", "http://127.0.0.1:5000"):
        assert missing_sqlite_file(present) is None, present


def test_a_server_gone_after_training_is_one_sentence_that_keeps_the_run(tmp_path: Path) -> None:
    """Catches recording a finished run into a server that went down while it trained: MLflow's client retried each
    call for minutes, then a traceback; the sentence now says the checkpoints are kept and how to record them."""
    from ferdist.track.tracking import finalize_run, tag_run

    port = free_port()
    cfg = TrackingConfig(backend="mlflow", tracking_uri=f"http://127.0.0.1:{port}")
    with pytest.raises(FerdistError) as info:
        finalize_run(cfg, run_name="r", run_path=str(tmp_path / "runs" / "r"), filesystem=None, status="completed",
                     config_yaml="")  # fmt: skip
    assert str(info.value).startswith(f"cannot reach the MLflow tracking server at http://127.0.0.1:{port} ")
    kept = tmp_path / "runs" / "r"
    assert f"run r was not recorded (the checkpoints are kept in {kept}); start the server and run the same command " \
           "again" in str(info.value)  # fmt: skip
    with pytest.raises(FerdistError, match="run r was not recorded \\(nothing is lost\\)"):
        tag_run(cfg, "r", {"k": "v"})


@pytest.mark.slow  # two starts of the server: about a minute
def test_a_server_down_while_a_run_trains_holds_no_epoch_and_the_job_records_the_epochs_it_missed(
    synth_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Catches the tracker waiting on a tracking server that went down mid-run: MLflow's client retried each
    epoch's log for minutes (about 4 here), then failed the run. Training now goes on, and the driver's
    finalize_run logs the epochs the tracker missed from the run's checkpoints, with the values the loop had."""
    from ferdist.track.tracking import COMPLETED, finalize_run

    port = free_port()
    with contextlib.ExitStack() as server:  # closed mid-run below; at the latest when the test ends
        uri = server.enter_context(running_mlflow(tmp_path / "mlflow", port=port))
        cfg = tracked_run(synth_shards, uri, "name=outage", "tracking.system_metrics_s=0")
        client = MlflowClient(uri)

        @dataclass
        class ServerStopsAfterEpoch1(LocalSession):
            def report(self, metrics: dict[str, float], resume: Snapshot | None, *, mode: str) -> None:
                super().report(metrics, resume, mode=mode)
                if metrics["epoch"] == 1:
                    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                                filter_string=f"tags.`{RUN_TAG}` = 'outage'")  # fmt: skip
                    # The tracker's flush: an epoch is in MLflow before its report (after which Tune may stop it).
                    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch")] == [1]
                    server.close()

        with caplog.at_level(logging.WARNING, logger="ferdist.track.tracking"):
            state = run_training(cfg, ServerStopsAfterEpoch1(tmp_path / "runs"), make_tracker=make_tracker)
    assert state.epochs_done == 3
    assert sum("does not answer (ConnectionError); training goes on" in r.message for r in caplog.records) == 1
    with running_mlflow(tmp_path / "mlflow", port=port) as again:  # the same store back, where the run expects it
        client = MlflowClient(again)
        (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                    filter_string=f"tags.`{RUN_TAG}` = 'outage'")  # fmt: skip
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [1]
        assert run.info.status == "RUNNING"  # the tracker could not end it either
        finalize_run(TrackingConfig(backend="mlflow", tracking_uri=again, experiment="tests"), run_name="outage",
                     run_path=str(tmp_path / "runs"), filesystem=None, status=COMPLETED, config_yaml="")  # fmt: skip
        history = client.get_metric_history(run.info.run_id, "val/acc")
        assert [(m.step, m.value) for m in history] == [(h["epoch"], h["val/acc"]) for h in state.history]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
        assert client.get_run(run.info.run_id).info.status == "FINISHED"
