"""The README and docs/ hold together: every relative link and anchor resolves, every job script, config, module,
test and cluster file they name by path exists, and the README stays a front page.

Anchors follow GitHub's heading slugs: the heading's text (inline code, emphasis and link targets dropped) in lower
case, every character that is not a letter, digit, space, hyphen or underscore removed, spaces turned into hyphens;
a repeated heading gets -1, -2, … Pure Python, no network.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 260

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target), with an optional "title"; the text may hold one level of brackets.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
JOB_PATH = re.compile(r"\bjobs/[\w./-]+\.(?:py|yaml)\b")
# Other files the pages name by path (modules, tests, cluster files): when the layout moves, the docs must follow.
REPO_PATH = re.compile(r"(?<![\w./-])(?:ferdist|tests|cluster|shards)/[\w./-]+\.(?:py|yaml|sh|md)\b")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("*", "")
    text = "".join(ch for ch in text.lower() if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link outside code."""
    return [
        (number, m.group(1)) for number, line in prose_lines(path) for m in LINK.finditer(INLINE_CODE.sub("", line))
    ]


def broken_links(path: Path) -> list[str]:
    problems = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:, …
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{rel(path)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where} (no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor:
            if dest.suffix != ".md" or not dest.is_file():
                problems.append(f"{where} (an anchor into a file that is not Markdown)")
            elif unquote(anchor).lower() not in anchors(dest):
                problems.append(f"{where} (no heading #{anchor} in {rel(dest)})")
    return problems


def test_readme_is_a_front_page() -> None:
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to a page under docs/ and link it"
    )


def test_every_relative_link_and_anchor_resolves() -> None:
    problems = [p for path in doc_files() for p in broken_links(path)]
    assert not problems, "broken links in README.md / docs/:\n  " + "\n  ".join(problems)


def named_but_missing(pattern: re.Pattern[str]) -> list[str]:
    """`file:line: path` for every path matching ``pattern`` (prose or code) that is not a file of the repository."""
    missing = []
    for path in doc_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            names = pattern.findall(line)
            missing.extend(f"{rel(path)}:{number}: {name}" for name in names if not (ROOT / name).is_file())
    return missing


def test_every_named_job_script_and_config_exists() -> None:
    missing = named_but_missing(JOB_PATH)
    assert not missing, "README.md / docs/ name jobs/ files that do not exist:\n  " + "\n  ".join(missing)


def test_every_named_module_test_and_cluster_file_exists() -> None:
    missing = named_but_missing(REPO_PATH)
    assert not missing, "README.md / docs/ name files that do not exist (moved?):\n  " + "\n  ".join(missing)


def test_docs_index_links_every_page() -> None:
    index = ROOT / "docs" / "README.md"
    assert index.is_file(), "docs/README.md, the index of the pages, is missing"
    linked = {(index.parent / t.partition("#")[0]).resolve() for _, t in links(index) if t.partition("#")[0]}
    unlisted = [rel(p) for p in sorted((ROOT / "docs").glob("*.md")) if p != index and p.resolve() not in linked]
    assert not unlisted, "docs/README.md does not link these pages: " + ", ".join(unlisted)


def test_slugs_follow_github() -> None:
    assert slug("Results on FER2013 (PrivateTest)") == "results-on-fer2013-privatetest"
    assert slug("Checkpoints: what an epoch end costs") == "checkpoints-what-an-epoch-end-costs"
    assert slug("Bad input: what is refused and what is converted") == "bad-input-what-is-refused-and-what-is-converted"
    assert slug("Quick start (two commands)") == "quick-start-two-commands"
    assert slug("The `fer` peer, **bold** & [linked](x.md)") == "the-fer-peer-bold--linked"
    assert slug("Tests, CI and versions") == "tests-ci-and-versions"
