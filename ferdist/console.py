"""The jobs' rich console: at the terminal's width, or 160 columns when output goes to a file or a CI log (rich's
default there is 80, which cuts trial names and parameter values out of the tables)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.text import Text

LOG_WIDTH = 160
# Libraries whose INFO lines are noise in a job's output ("Found credentials in environment variables.").
QUIET_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "aiobotocore")


def setup_logging() -> None:
    """INFO for ferdist's own messages, WARNING for the S3 and HTTP clients' chatter."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def job_console(*, stderr: bool = False) -> Console:
    """The console every job prints with. Strings are printed as they are, never read as rich markup or emoji codes:
    a run folder named ``runs/[faces]`` or a file ``:smile:.jpg`` would otherwise print as ``runs/`` or an emoji, and
    ferdist's sentences hold brackets ("takes [low, high]", "data.extra[0]"). Styles go in `Text` (`bold`)."""
    console = Console(stderr=stderr, soft_wrap=True, markup=False, emoji=False)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, soft_wrap=True, markup=False, emoji=False, width=LOG_WIDTH)


def bold(text: str, style: str = "bold") -> Text:
    """``text`` in ``style``, to assemble into a line (``Text.assemble(bold(name), ": 10 epochs")``)."""
    return Text(text, style=style)


def print_error(console: Console, message: object, *, label: str = "error") -> None:
    """``label: message`` as the job's last line, the message as text (see `job_console`), with the password of
    every URI in it hidden: a sentence that names the URI it could not use must not print the secret inside it."""
    from ferdist.config import redact_uri

    console.print(Text.assemble(bold(f"{label}:", "bold red"), " ", redact_uri(str(message))), highlight=False)


def whole_number(minimum: int) -> Callable[[str], int]:
    """argparse type: a whole number >= ``minimum``, read strictly ("1e3", "2.5", "1_0", "٣" are refused, not
    rounded or read as something else)."""

    def parse(text: str) -> int:
        digits = text.strip()
        if not (digits.isascii() and digits.isdigit()) or int(digits) < minimum:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of at least {minimum}")
        return int(digits)

    return parse


def nonempty(text: str) -> str:
    """argparse type: any text but the empty one (an empty path is the current folder: ``--out ""`` would write there,
    and ``predict.py ""`` read every photo under it)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name a file or folder")
    return text


def path_arg(text: str) -> Path:
    """argparse type: a local path, never the empty text (see `nonempty`)."""
    return Path(nonempty(text))


class Once(argparse.Action):
    """argparse action that stores the option's value (its ``const`` when given bare) and refuses the setting a second
    time, by the same option or another spelling of it (``--detect on --no-detect``): argparse's own would keep the
    last one without a word."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:  # fmt: skip
        given: dict[str, str] = parser.__dict__.setdefault("_ferdist_given", {})
        if given.get(self.dest) == option_string:
            parser.error(f"{option_string} is given twice (the last would win silently); give it once")
        if self.dest in given:
            parser.error(f"{given[self.dest]} and {option_string} both set {self.dest.replace('_', '-')}; give one")
        given[self.dest] = str(option_string)
        setattr(namespace, self.dest, self.const if values is None or values == [] else values)
