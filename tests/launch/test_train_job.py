"""jobs/train.py's bad input: one sentence and exit code 2, before any Ray process starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import train as train_job

QUICKSTART = str(Path(__file__).resolve().parents[2] / "jobs" / "configs" / "quickstart.yaml")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "data.manifest=/nonexistent/shards"], "no manifest at '/nonexistent/shards/manifest.json'"),
        (["--set", "optim.lrr=1"], "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
        (["--set", "loop.epochs=many"], "loop.epochs must be an integer, got 'many'"),
        (["--workers", "3"], "does not divide by 3 workers"),
        # Known from the backbone's config before Ray starts (it used to fail in every worker, 4 attempts, 61 s).
        (["--set", "model.freeze_blocks=99"], "model.freeze_blocks=99 exceeds the backbone's 6 blocks; use at most 6"),
    ],
)
def test_bad_input_exits_2_with_one_sentence(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], synth_shards: Path
) -> None:
    base = ["--config", QUICKSTART, "--set", f"data.manifest={synth_shards}"]
    import ray

    assert train_job.main(base + args) == 2
    err = capsys.readouterr().err
    # Catches a traceback, a second error or a sentence split over lines, and Ray started before the input is checked.
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], err
    assert errors[0] == err.rstrip("\n").splitlines()[-1]  # the last thing said
    assert "Traceback" not in err and not ray.is_initialized()  # one sentence, found before Ray starts


def test_too_small_for_the_batch(capsys: pytest.CaptureFixture[str], synth_shards: Path) -> None:
    args = ["--config", QUICKSTART, "--set", f"data.manifest={synth_shards}", "--set", "loop.global_batch_size=512"]
    assert train_job.main(args) == 2
    assert "fewer than one global batch" in capsys.readouterr().err


@pytest.mark.slow
def test_a_shard_lost_after_start_is_one_sentence_from_the_workers(synth_shards: Path, tmp_path: Path) -> None:
    # The check before Ray starts reads only the manifest; a shard deleted since is found by a worker's loader
    # process, two process boundaries (DataLoader, Ray) away from the user.
    import shutil
    import subprocess
    import sys

    shards = tmp_path / "shards"
    shutil.copytree(synth_shards, shards)
    (shards / "train-000004.tar").unlink()
    done = subprocess.run(
        [sys.executable, str(Path(QUICKSTART).parents[2] / "jobs" / "train.py"), "--config", QUICKSTART,
         "--set", f"data.manifest={shards}", "--set", f"checkpoint.storage_path={tmp_path / 'runs'}",
         "--set", "tracking.backend=none", "--set", "loop.epochs=1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=400, check=False,
    )  # fmt: skip
    last = [line for line in done.stderr.splitlines() if line.strip()][-1]
    assert done.returncode == 2, done.stderr[-3000:]
    assert last.startswith(f"error: shard '{shards / 'train-000004.tar'}' is listed in the manifest but missing; ")
    assert last.endswith(")") and "(worker rank " in last
    # checkpoint.max_failures is 3, but a missing shard is missing on every attempt: the run ends on the first
    # (one start-up line from rank 0), with no worker traceback on the screen.
    assert done.stderr.count("steps/epoch, peak lr") == 1, done.stderr[-3000:]
    # (Ray's controller may print its own noise on a loaded machine; no worker's traceback reaches the screen.)
    assert not [line for line in done.stderr.splitlines() if "RayTrainWorker" in line and "Traceback" in line]
    assert "Traceback" not in last


def test_the_failure_policy_ends_a_run_on_a_deterministic_error_and_retries_transient_ones() -> None:
    """What Ray decides when workers fail: a FerdistError (wrapped as Ray wraps it) is raised at once; an outage past
    its budget and an error that is not ferdist's (a lost node) keep the retries of checkpoint.max_failures."""
    import ray.train
    from ray.train.v2._internal.execution.failure_handling import FailureDecision

    from ferdist.errors import MissingError
    from ferdist.launch.trainer import FailFastPolicy
    from ferdist.outage import StorageOutage

    def wrapped(error: BaseException) -> BaseException:
        outer = RuntimeError("ray task failed")
        outer.__cause__ = error
        return outer

    def decision(*errors: BaseException) -> FailureDecision:
        failures = {rank: wrapped(e) for rank, e in enumerate(errors)}
        policy = FailFastPolicy(ray.train.FailureConfig(max_failures=3))
        return policy.make_decision(ray.train.WorkerGroupError("workers failed", failures))

    assert decision(MissingError("shard x is missing")) == FailureDecision.RAISE
    assert decision(ConnectionError("node lost"), MissingError("shard x is missing")) == FailureDecision.RAISE
    assert decision(StorageOutage("the store was down for 10 s")) == FailureDecision.RETRY
    assert decision(ConnectionError("node lost")) == FailureDecision.RETRY


def test_a_dataset_without_val_is_refused_before_ray_starts(
    capsys: pytest.CaptureFixture[str], synth_shards: Path, tmp_path: Path
) -> None:
    """Catches a dataset sharded without a val split (an image folder with --val-fraction 0) passing every check
    before Ray starts and failing in the worker, at the first epoch's evaluation."""
    import json
    import shutil

    import ray

    no_val = tmp_path / "no-val"
    shutil.copytree(synth_shards, no_val)
    manifest = json.loads((no_val / "manifest.json").read_text())
    del manifest["splits"]["val"]
    (no_val / "manifest.json").write_text(json.dumps(manifest))
    assert train_job.main(["--config", QUICKSTART, "--set", f"data.manifest={no_val}"]) == 2
    err = capsys.readouterr().err
    assert f"error: {no_val} has no val split, which fine-tuning scores every epoch on to keep the best; re-shard it " \
           "with --val-fraction" in err  # fmt: skip
    assert "Traceback" not in err and not ray.is_initialized()
