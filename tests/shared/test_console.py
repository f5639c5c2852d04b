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
