"""The jobs' rich console: at the terminal's width, or 160 columns when output goes to a file or a CI log (rich's
default there is 80, which cuts trial names and parameter values out of the tables)."""

from __future__ import annotations

from rich.console import Console

LOG_WIDTH = 160


def job_console(*, stderr: bool = False) -> Console:
    console = Console(stderr=stderr, soft_wrap=True)
    return console if console.is_terminal else Console(stderr=stderr, soft_wrap=True, width=LOG_WIDTH)
