r"""Any file name, any output (issue 25): names that are not UTF-8 or hold newlines, tabs and other control characters
go through predict.py's screen, CSV, JSON, annotated copies and error sentences, spelt by the one documented rule
(`ferdist.files.shown_name`: ``caf\xe9.jpg``, ``new\nline.jpg``, ``a\\b.jpg``); and an output file or
annotated copy is written whole or not at all."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferdist.files import original_name, shown_name

ODD_NAMES = {
    b"caf\xe9.jpg": r"caf\xe9.jpg",  # Latin-1: not UTF-8
    "café.jpg".encode(): "café.jpg",  # the same word in UTF-8: another file, another spelling
    b"caf\\xe9.jpg": r"caf\\xe9.jpg",  # a real backslash, so not the Latin-1 name either
    b"new\nline.jpg": r"new\nline.jpg",
    b"tab\there.jpg": r"tab\there.jpg",
    b"cr\rname.jpg": r"cr\rname.jpg",
    b"\x1b[31mred.jpg": r"\x1b[31mred.jpg",  # a terminal colour code
    b":smile: [bold]x.jpg": ":smile: [bold]x.jpg",  # rich's emoji code and markup, shown as they are
    b"plain.jpg": "plain.jpg",
    b"sub\xff/plain.jpg": r"sub\xff/plain.jpg",  # a folder not in UTF-8, and a second plain.jpg
}
"""Each photo's name under photos/ (bytes) → how every text output spells it."""

COPIES = {b"caf\xe9.png", "café.png".encode(), b"caf\\xe9.png", b"new\nline.png", b"tab\there.png", b"cr\rname.png",
          b"\x1b[31mred.png", b":smile: [bold]x.png", b"plain.png", b"plain-1.png"}  # fmt: skip
"""The annotated copies: the photos' own bytes, .png; the second plain.jpg gets -1."""


def face_jpeg(seed: int) -> bytes:
    """A 48×48 grey JPEG (a face crop's size: predict.py takes it as one face)."""
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def make_photos(root: Path, names: list[bytes]) -> None:
    """A face JPEG under ``root`` at each of ``names`` (bytes, so the file system gets exactly them)."""
    for seed, name in enumerate(names):
        path = os.path.join(os.fsencode(str(root)), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as file:
            file.write(face_jpeg(seed))


@pytest.fixture
def odd_photos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the working folder, with the ODD_NAMES photos in photos/ (short relative names: the screen's table
    does not wrap them)."""
    make_photos(tmp_path / "photos", list(ODD_NAMES))
    monkeypatch.chdir(tmp_path)
    return tmp_path


EXPECTED = Counter("photos/" + shown for shown in ODD_NAMES.values())


def test_csv_and_json_name_every_file_once_by_the_rule_and_copies_keep_their_names(
    tiny_checkpoint: Path, odd_photos: Path, capsys: pytest.CaptureFixture
) -> None:
    """Catches the CSV writer's UnicodeEncodeError on a Latin-1 name (after all the work), a newline in a name
    splitting a CSV row, JSON spelling a Latin-1 name with a lone surrogate (strict UTF-8 readers refuse it), two
    files written to one annotated copy or spelt alike, and annotated copies under other names than their photos'."""
    import predict as job

    model = ["--model", str(tiny_checkpoint)]
    assert job.main([*model, "photos", "--output", "faces.csv", "--annotate", "drawn"]) == 0
    text = (odd_photos / "faces.csv").read_bytes().decode("utf-8")  # strict: valid UTF-8
    table = list(csv.reader(io.StringIO(text, newline="")))
    assert len(table) == 1 + len(ODD_NAMES) and table[0][:2] == ["file", "face"]
    assert Counter(row[0] for row in table[1:]) == EXPECTED
    assert all(row[1] == "0" for row in table[1:])  # one face each
    assert set(os.listdir(b"drawn")) == COPIES
    for copy in COPIES:
        assert Image.open(os.path.join(b"drawn", copy)).size == (48, 48)
    err = capsys.readouterr().err
    assert f"wrote {len(ODD_NAMES)} rows to faces.csv" in err and f"wrote {len(ODD_NAMES)} annotated photos" in err

    assert job.main([*model, "photos", "--output", "faces.json"]) == 0
    rows = json.loads((odd_photos / "faces.json").read_bytes().decode("utf-8"))
    assert Counter(row["file"] for row in rows) == EXPECTED


def test_the_screen_shows_each_name_by_the_rule_on_one_line(
    tiny_checkpoint: Path, odd_photos: Path, capsys: pytest.CaptureFixture
) -> None:
    """Catches raw newlines, carriage returns, tabs and terminal codes from names reaching the screen's table (a row
    broken in two, a line overwritten, colours switched), and names read as rich markup or emoji codes."""
    import predict as job

    assert job.main(["--model", str(tiny_checkpoint), "photos"]) == 0
    out = capsys.readouterr().out
    for shown in EXPECTED:
        assert shown in out
    assert not set(out) & {"\r", "\t", "\x1b"} and "new\nline" not in out
    assert sum(line.count("photos/") for line in out.splitlines()) == len(ODD_NAMES)  # one line each


def test_error_sentences_name_odd_files_by_the_rule_on_one_line(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Catches messages (a skipped file, a path that does not exist, a bad --output) that print a name's raw newline
    or its undecodable bytes, or crash on them."""
    import predict as job

    make_photos(tmp_path / "photos", [b"good.jpg"])
    (tmp_path / "photos" / os.fsdecode(b"broken\xff\n.png")).write_bytes(b"not an image")
    monkeypatch.chdir(tmp_path)
    model = ["--model", str(tiny_checkpoint)]
    assert job.main([*model, "photos", "--output", "faces.csv"]) == 1  # skipped, the others classified
    err = capsys.readouterr().err
    assert r"skipped: photos/broken\xff\n.png is not an image (12 bytes of no image format PIL knows)" in err
    assert "wrote 1 row to faces.csv" in err

    assert job.main([*model, os.fsdecode(b"gone\xe9\t.jpg")]) == 2
    assert capsys.readouterr().err == "error: gone\\xe9\\t.jpg does not exist\n"
    assert job.main([*model, "photos", "--output", os.fsdecode(b"rows\xe9\n.txt")]) == 2
    assert capsys.readouterr().err == "error: --output rows\\xe9\\n.txt: write a .csv or .json file\n"


def test_the_rule_keeps_every_name_apart_on_one_line_and_can_be_undone() -> None:
    """Catches a spelling that two names share (a backslash, a byte and a character written alike), a name left with
    a line break, control character or undecodable byte, and a spelling that cannot be turned back into the name."""
    rng = np.random.default_rng(25)
    alphabet = [b"a", b"\\", b"x", b"e9", b"\xe9", b"\xc3\xa9", b"\xc2\x85", b"\x85", b"\n", b"\r", b"\t", b"\x1b",
                b"\x7f", b"\xe2\x80\xa8", b"\xe2\x80\xae", b"\xed\xa0\x80", b"\xff", b"u0085", b"/"]  # fmt: skip
    names = {b"".join(alphabet[i] for i in rng.integers(0, len(alphabet), rng.integers(1, 8))) for _ in range(3000)}
    names |= {bytes([n]) for n in range(1, 256) if n != ord("/")}
    shown = {name: shown_name(os.fsdecode(name)) for name in names}
    assert len(set(shown.values())) == len(names)  # no two names spelt alike
    for name, text in shown.items():
        text.encode("utf-8")  # valid Unicode: no lone surrogates
        assert not [c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs")], text
        assert os.fsencode(original_name(text)) == name
    assert shown_name(Path(os.fsdecode(b"caf\xe9\\\n\xc2\x85.jpg"))) == r"caf\xe9\\\n\u0085.jpg"


FULL_DISK = """
import json, resource, signal, sys, tempfile
sys.path.insert(0, {jobs!r})
import predict
runs = json.loads(sys.argv[1])
# Each run once without the limit, into a scratch folder elsewhere: whatever the libraries write on first use (torch
# writes generated code at some imports, fonts and caches) is written before the disk fills, so only ferdist's own
# output meets the limit.
scratch = tempfile.mkdtemp()
for args in runs:
    predict.main([scratch + "/" + a if a in ("faces.csv", "faces.json", "drawn") else a for a in args])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (300, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
print("exit codes", json.dumps([predict.main(args) for args in runs]))
"""


def predict_on_a_full_disk(folder: Path, runs: list[list[str]]) -> tuple[list[int], str]:
    """predict.py's exit codes and messages for each of ``runs`` (its arguments), in one process (imports once) whose
    files cannot grow past 300 bytes: a real write that fails part of the way through."""
    script = FULL_DISK.format(jobs=str(Path(__file__).resolve().parents[2] / "jobs"))
    done = subprocess.run([sys.executable, "-c", script, json.dumps(runs)], cwd=folder, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.rsplit("exit codes", 1)[1]), done.stderr


def test_an_output_that_fails_part_way_leaves_no_partial_file_and_the_old_one_as_it_was(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Catches a CSV, JSON or annotated copy written in place: a failure part of the way (here the disk full after
    300 bytes) truncating an earlier file to a partial one, or leaving a half-written file or a temporary behind."""
    make_photos(tmp_path / "photos", [f"face{i}.jpg".encode() for i in range(6)])
    (tmp_path / "drawn").mkdir()
    earlier = {"faces.csv": b"earlier rows\n", "faces.json": b"[]\n", "drawn/face0.png": b"an earlier copy"}
    for name, data in earlier.items():
        (tmp_path / name).write_bytes(data)
    model = ["--model", str(tiny_checkpoint)]
    codes, err = predict_on_a_full_disk(tmp_path, [[*model, "photos", "--output", "faces.csv"],
                                                   [*model, "photos", "--output", "faces.json"],
                                                   [*model, "photos/face0.jpg", "--annotate", "drawn"]])  # fmt: skip
    assert codes == [2, 2, 2], err
    assert "error: cannot write faces.csv (File too large); choose another --output\n" in err
    assert "error: cannot write faces.json (File too large); choose another --output\n" in err
    assert "error: cannot write drawn/face0.png (File too large); choose another --annotate\n" in err
    for name, data in earlier.items():
        assert (tmp_path / name).read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == ["drawn", "faces.csv", "faces.json", "photos"]  # no temporary left
    assert os.listdir(tmp_path / "drawn") == ["face0.png"]
