"""The copies the accuracy benchmark keeps beside its results file (the pretrained backbone, a teaching row's best
model): what is copied, that a copy is used only while it holds the weights the file recorded, and that a row's copy
is the same model as the run's checkpoint."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from ferdist.bench.accuracy import keep_backbone, keep_model, kept_copy, kept_root, weights_sha256
from ferdist.train.mae import MARKER_FILE


def quiet() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=400), out


def pretrained_folder(tmp_path: Path) -> Path:
    """A pretraining output as jobs/pretrain.py writes it: save_pretrained plus the marker naming this machine's run."""
    folder = tmp_path / "runs" / "pretrained-acc-t"
    config = ViTMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=8, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                          decoder_num_attention_heads=2, decoder_intermediate_size=32)  # fmt: skip
    ViTMAEForPreTraining(config).save_pretrained(folder)
    (folder / MARKER_FILE).write_text(json.dumps({"run": "acc-pretrain-t", "storage_path": str(tmp_path / "runs")}))
    return folder


def test_the_kept_folder_is_named_for_the_results_file() -> None:
    assert kept_root(Path("jobs/benchmark-results/accuracy-cpu.json")) == Path(
        "jobs/benchmark-results/accuracy-cpu-kept")  # fmt: skip
    assert kept_root(None) is None


def test_a_kept_backbone_is_the_pretrained_folder_without_the_machines_marker_and_is_used_while_its_sha_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the record's path is read back relative to the working directory
    source = pretrained_folder(tmp_path)
    record = keep_backbone(source, Path("acc-kept") / "pretrained")
    kept = tmp_path / "acc-kept" / "pretrained"
    assert sorted(p.name for p in kept.iterdir()) == sorted(p.name for p in source.iterdir() if p.name != MARKER_FILE)
    assert (kept / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert record == {"path": "acc-kept/pretrained", "sha256": weights_sha256(source)}
    assert not [p for p in (tmp_path / "acc-kept").iterdir() if p.name.startswith(".")]  # no partial copy left

    console, out = quiet()
    assert kept_copy({"kept": record}, "pretraining", console) == Path.cwd() / "acc-kept" / "pretrained"
    assert kept_copy({}, "pretraining", console) is None  # a stage kept before copies existed
    assert out.getvalue() == ""

    # Someone replaced the weights (or a copy from another run of the stage was committed): said, and not used.
    (kept / "model.safetensors").write_bytes(b"not these weights")
    assert kept_copy({"kept": record}, "pretraining", console) is None
    assert "pretraining: the copy in" in out.getvalue() and "its sha256 differs): not used" in out.getvalue()

    # Kept again over it: the folder is replaced whole.
    assert keep_backbone(source, Path("acc-kept") / "pretrained") == record
    assert kept_copy({"kept": record}, "pretraining", console) is not None
    (kept / "model.safetensors").unlink()
    assert kept_copy({"kept": record}, "pretraining", console) is None  # a gone copy is not a refusal: run again


def test_a_teaching_rows_kept_model_is_a_safetensors_bundle_with_the_same_outputs(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from ferdist.serve.export import check_faces
    from ferdist.serve.inference import Predictor
    from ferdist.track.registry import load_model

    record = keep_model(tiny_checkpoint, tmp_path / "acc-kept" / "row-final", "final")
    kept = tmp_path / "acc-kept" / "row-final"
    assert (kept / "model.safetensors").is_file() and not (kept / "model.pt").exists()  # no pickle is committed
    assert record == {"path": str(kept), "sha256": weights_sha256(kept)}
    assert "row 'final'" in (kept / "MODEL_CARD.md").read_text()
    faces = check_faces(8, seed=3)
    source, copy = load_model(str(tiny_checkpoint)), load_model(str(kept))  # as a distill.teacher URI loads it
    np.testing.assert_array_equal(Predictor.of(copy.model, copy.cfg.model).probabilities(faces),
                                  Predictor.of(source.model, source.cfg.model).probabilities(faces))  # fmt: skip
    console, out = quiet()
    assert kept_copy({"kept": record}, "final", console) == kept
