"""The jobs' error line prints ferdist's sentence as it was written."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ferdist.console import bold, job_console, print_error


def test_an_error_sentence_with_brackets_is_printed_whole() -> None:
    """Catches the markup break: printed as rich markup, "takes [low, high] with low < high" lost "[low, high]"
    (rich reads it as a style tag) and the user read a sentence that no longer said what to write."""
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    print_error(console, "search.optim.lr takes [low, high] with low < high; data.extra[0]: [bold]x[/bold]")
    print_error(console, "interrupted while reading a[1].csv", label="stopped")
    assert out.getvalue().splitlines() == [
        "error: search.optim.lr takes [low, high] with low < high; data.extra[0]: [bold]x[/bold]",
        "stopped: interrupted while reading a[1].csv",
    ]


def test_the_jobs_console_prints_folder_and_file_names_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a job console that reads its lines as rich markup and emoji codes: a run folder `runs/[faces]` printed
    as `runs/`, `:smile:.jpg` as an emoji, `[literature]` vanished from a results table's label."""
    out = io.StringIO()
    console = job_console()
    monkeypatch.setattr(console, "file", out)
    console.print("best checkpoint: runs/[faces]/model_epoch_0003 from :smile:.jpg", highlight=False)
    console.print(Text.assemble(bold("[run]"), ": 3 epochs"), highlight=False)
    table = Table()
    table.add_column("model")
    table.add_row("VGGNet [literature]")
    console.print(table)
    text = out.getvalue()
    assert "best checkpoint: runs/[faces]/model_epoch_0003 from :smile:.jpg\n" in text
    assert "[run]: 3 epochs\n" in text and "VGGNet [literature]" in text


def test_an_error_sentence_never_prints_the_password_of_a_uri_it_names() -> None:
    out = io.StringIO()
    console = Console(file=out, width=300, color_system=None)
    print_error(console, "no model at http://bob:hunter2@127.0.0.1:9/model; check it (ftp://ann:pw@h/x too)")
    said = out.getvalue().strip()
    assert said == "error: no model at http://bob:***@127.0.0.1:9/model; check it (ftp://ann:***@h/x too)"


def test_an_option_given_twice_or_by_two_spellings_is_refused_not_silently_the_last(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import evaluate
    import predict

    twice = [(["x.jpg", "--tta", "flip", "--tta", "crops"], "--tta is given twice"),
             (["x.jpg", "--detect", "on", "--no-detect"], "--detect and --no-detect both set detect")]
    for argv, said in twice:
        with pytest.raises(SystemExit) as stopped:
            predict.parse_args(argv)
        assert stopped.value.code == 2 and said in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "m", "--manifest", "s", "--tta", "--tta", "crops"])
    assert "--tta is given twice" in capsys.readouterr().err
    once = predict.parse_args(["x.jpg", "--no-detect", "--tta"])
    assert (once.detect, once.tta) == ("off", "flip")
    assert predict.parse_args(["x.jpg"]).detect == "auto"
    assert predict.parse_args(["x.jpg", "--tta", "crops"]).tta == "crops"
