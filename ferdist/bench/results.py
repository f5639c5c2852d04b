"""Results files hold paths relative to the repository: a JSON committed from one machine names no other machine's
folders (``/work/main/shards/fer2013`` becomes ``shards/fer2013``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
