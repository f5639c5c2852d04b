"""jobs/export.py: the ONNX file reproduces the PyTorch predictor from uint8 faces at any batch size, says in its
metadata what to feed it, and bad input (or a file that fails the check) replaces nothing."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from ferdist.constants import FER_CLASSES
from ferdist.serve import export
from ferdist.serve.inference import Predictor
from ferdist.train.checkpoint import load_classifier


def test_the_onnx_file_matches_the_predictor_at_any_batch_size(
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    import export as job

    out = tmp_path / "fer.onnx"
    out.write_bytes(b"an older export")
    assert job.main(["--model", str(tiny_checkpoint), "--out", str(out), "--force"]) == 0
    err = capsys.readouterr().err
    assert f"wrote {out}" in err and "opset 18" in err and "max |Δp|" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["fer.onnx"]  # no partial file left

    model, cfg = load_classifier(tiny_checkpoint)
    faces = export.check_faces(256, seed=7)  # drawn faces of every class (and some noise), not the job's own
    expected = Predictor(model, image_size=cfg.model.image_size).probabilities(faces)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"faces": faces})[0]
    assert got.dtype == np.float32 and got.shape == (256, 7)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)
    for n in (1, 7):
        assert np.abs(session.run(["probabilities"], {"faces": faces[:n]})[0] - expected[:n]).max() <= 1e-4

    metadata = export.read_metadata(out)
    assert json.loads(metadata["classes"]) == list(FER_CLASSES)
    assert "uint8 [N, 48, 48]" in metadata["input"] and metadata["image_size"] == str(cfg.model.image_size) == "32"
    assert metadata["ferdist_model"] == str(tiny_checkpoint) and metadata["ferdist_backbone"] == "random:tiny"
    assert export.file_opset(out) == export.DEFAULT_OPSET


def test_a_file_that_fails_the_check_replaces_nothing(
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import export as job

    out = tmp_path / "fer.onnx"
    out.write_bytes(b"the good export")
    # A graph that exports but computes something else: written, then measured 0.5 away from PyTorch.
    monkeypatch.setattr(export, "export_onnx", lambda model, path, **_: path.write_bytes(b"a wrong graph"))
    monkeypatch.setattr(export, "check_onnx", lambda path, model, **_: 0.5)
    assert job.main(["--model", str(tiny_checkpoint), "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert "differ from PyTorch's by up to 5.00e-01" in err and "Traceback" not in err, err
    assert out.read_bytes() == b"the good export" and [p.name for p in tmp_path.iterdir()] == ["fer.onnx"]


def test_a_real_export_that_computes_something_else_is_measured_and_refused(
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Catches check_onnx not measuring (e.g. always returning 0.0, the export's safety check disabled): a real export
    whose head bias is shifted inside the file must be measured as far off as ONNX Runtime shows, and refused."""
    import export as job
    import onnx
    from onnx import numpy_helper

    real_export = export.export_onnx

    def shifted_export(model, path: Path, **kw) -> None:  # noqa: ANN001
        real_export(model, path, **kw)
        graph = onnx.load(str(path))
        (bias,) = [t for t in graph.graph.initializer if t.name.endswith("head.bias")]
        values = numpy_helper.to_array(bias).copy()
        values[3] += 3.0  # Happy's logit: the probabilities move a lot, the graph still runs
        bias.CopyFrom(numpy_helper.from_array(values, bias.name))
        onnx.save(graph, str(path))

    model, cfg = load_classifier(tiny_checkpoint)
    shifted = tmp_path / "shifted.onnx"
    shifted_export(model, shifted, image_size=cfg.model.image_size, metadata={"input": "faces", "output": "p"},
                   opset=export.DEFAULT_OPSET)  # fmt: skip
    faces = export.check_faces(export.CHECK_FACES)
    session = ort.InferenceSession(str(shifted), providers=["CPUExecutionProvider"])
    expected = Predictor(model, image_size=cfg.model.image_size).probabilities(faces)
    off_by = float(np.abs(session.run(["probabilities"], {"faces": faces})[0] - expected).max())
    assert off_by > 0.1  # measured here without check_onnx
    assert export.check_onnx(shifted, model, image_size=cfg.model.image_size) == pytest.approx(off_by, abs=1e-6)

    out = tmp_path / "fer.onnx"
    out.write_bytes(b"the good export")
    monkeypatch.setattr(export, "export_onnx", shifted_export)  # the real export, then the file changed; real check
    assert job.main(["--model", str(tiny_checkpoint), "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    reported = re.search(r"differ from PyTorch's by up to ([0-9.e+-]+) ", err)
    assert reported and float(reported[1]) == pytest.approx(off_by, rel=0.01) and "Traceback" not in err, err
    assert out.read_bytes() == b"the good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fer.onnx", "shifted.onnx"]


def test_bad_input_is_one_sentence_and_overwrites_nothing(
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import export as job

    existing = tmp_path / "old.onnx"
    existing.write_bytes(b"keep me")
    model = ["--model", str(tiny_checkpoint)]
    cases = [
        ([*model, "--out", str(existing)], "already exists; pass --force"),
        ([*model, "--out", str(tmp_path / "fer.onx")], "does not end in .onnx"),
        ([*model, "--out", str(tmp_path)], "does not end in .onnx"),
        ([*model, "--out", str(tmp_path / "a.onnx"), "--opset", "17"], "--opset 17 is outside 18..25"),
        ([*model, "--out", str(tmp_path / "a.onnx"), "--opset", "30"], "--opset 30 is outside 18..25"),
        (["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "b.onnx")], "no model at"),
        ([*model, "--out", str(existing / "under" / "a.onnx")], "old.onnx is a file, not a folder"),
    ]
    for argv, message in cases:
        assert job.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    # Bundle-only flags were silently dropped from an ONNX export (no score, no name): refused by the parser.
    for flags, message in [(["--evaluate", str(tmp_path)], "--evaluate is for --format bundle"),
                           (["--name", "mine"], "--name is for --format bundle"),
                           (["--format", "bundle", "--name", " "], "--name is empty")]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            job.main([*model, "--out", str(tmp_path / "d.onnx"), *flags])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: import raises ImportError
    assert job.main([*model, "--out", str(tmp_path / "c.onnx")]) == 2
    assert '(onnxruntime missing); install them with pip install -e ".[export]"' in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["old.onnx"]
