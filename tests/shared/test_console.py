"""The jobs' error line prints ferdist's sentence as it was written."""

from __future__ import annotations

import io

from rich.console import Console

from ferdist.console import print_error


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
