"""jobs/train.py's bad input: one sentence and exit code 2, before any Ray process starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import train as train_job

QUICKSTART = str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "quickstart.yaml")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "data.manifest=/nonexistent/shards"], "no manifest at '/nonexistent/shards/manifest.json'"),
        (["--set", "optim.lrr=1"], "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
        (["--set", "loop.epochs=many"], "loop.epochs must be an integer, got 'many'"),
        (["--workers", "3"], "does not divide by 3 workers"),
    ],
)
def test_bad_input_exits_2_with_one_sentence(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], synth_shards: Path
) -> None:
    base = ["--config", QUICKSTART, "--set", f"data.manifest={synth_shards}"]
    assert train_job.main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err.replace("\n", " ")


def test_too_small_for_the_batch(capsys: pytest.CaptureFixture[str], synth_shards: Path) -> None:
    args = ["--config", QUICKSTART, "--set", f"data.manifest={synth_shards}", "--set", "loop.global_batch_size=512"]
    assert train_job.main(args) == 2
    assert "fewer than one global batch" in capsys.readouterr().err
