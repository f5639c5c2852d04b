"""The jobs' rich console: at the terminal's width, or 160 columns when output goes to a file or a CI log (rich's
default there is 80, which cuts trial names and parameter values out of the tables)."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.markup import escape

LOG_WIDTH = 160
# Libraries whose INFO lines are noise in a job's output ("Found credentials in environment variables.").
QUIET_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "aiobotocore")


def setup_logging() -> None:
    """INFO for ferdist's own messages, WARNING for the S3 and HTTP clients' chatter."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def job_console(*, stderr: bool = False) -> Console:
    console = Console(stderr=stderr, soft_wrap=True)
    return console if console.is_terminal else Console(stderr=stderr, soft_wrap=True, width=LOG_WIDTH)


def print_error(console: Console, message: object, *, label: str = "error") -> None:
    """``label: message`` as the job's last line. The message is printed as text, never as rich markup: ferdist's
    sentences hold brackets ("takes [low, high]", "data.extra[0]") that markup would silently swallow."""
    console.print(f"[bold red]{label}:[/] {escape(str(message))}", highlight=False)
