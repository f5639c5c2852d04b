"""Results files hold paths relative to the repository: a JSON committed from one machine names no other machine's
folders (``/work/main/shards/fer2013`` becomes ``shards/fer2013``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ferdist.errors import FerdistError


def _roots() -> list[str]:
    # The checkout this code runs from, and the working directory (the benchmark's own relative paths start there).
    found = {str(Path(__file__).resolve().parents[2]), str(Path.cwd().resolve())}
    return sorted(found, key=len, reverse=True)


def relative(value: Any) -> Any:
    """``value`` (a results tree) with every absolute path under the repository written relative to it."""
    if isinstance(value, dict):
        return {k: relative(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [relative(v) for v in value]
    if isinstance(value, str):
        for root in _roots():
            value = value.replace(f"{root}/", "").replace(root, ".")
    return value


def write(path: Path, results: dict[str, Any]) -> None:
    """``results`` as indented JSON at ``path``, paths relative (see `relative`), written whole or not at all."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(relative(results), indent=2) + "\n")
    tmp.replace(path)


def local_path(path: str) -> Path:
    """A path read back from a results file: relative ones are under the working directory, as they were written."""
    return Path(path) if Path(path).is_absolute() else Path.cwd() / path


def resumed(path: Path | None, *, benchmark: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The results file at ``path`` that a ``--resume`` continues, checked to be a ``benchmark`` run with the same
    ``settings`` (compared with paths made relative, as they are written).

    Raises:
        FerdistError: no file, not a results file, another benchmark's, or other settings (what to do in each).
    """
    if path is None:
        raise FerdistError("--resume continues the results file of an earlier run: pass its --json FILE")
    if not path.is_file():
        raise FerdistError(f"--resume: {path} {'is a folder' if path.is_dir() else 'does not exist'}, so there is no "
                           "earlier run to continue; pass the --json file that run wrote, or run without --resume")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise FerdistError(f"{path} is not a results file ({exn}); run without --resume") from None
    if not isinstance(saved, dict) or saved.get("benchmark") != benchmark or "name" not in saved:
        raise FerdistError(f"{path} holds no {benchmark} benchmark to resume; run without --resume")
    if relative(saved.get("settings")) != relative(settings):
        raise FerdistError(f"{path} was run with other settings ({saved.get('settings')}); resume it with the same "
                           "options, or run without --resume")  # fmt: skip
    return saved
