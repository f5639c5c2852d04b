"""The model's view of a face (`model.eval_crop`): a centre crop, resized like the whole face, that validation,
the predictor (TTA included), a bundle, its ONNX graph and `jobs/benchmark.py eval-crop` all share."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ferdist.bench.eval_crop import mean_crop_side
from ferdist.config import AugmentConfig, load_config
from ferdist.data.loader import open_dataset
from ferdist.data.transforms import crop_params, eval_transform, to_model_input
from ferdist.errors import FerdistError
from ferdist.serve import bundled
from ferdist.serve.evaluation import evaluate_split
from ferdist.serve.export import check_faces
from ferdist.serve.inference import Predictor
from ferdist.train.checkpoint import load_classifier
from ferdist.train.loop import evaluate
from tests.serve.test_bundled import checkpoint, export_bundle  # noqa: F401 (a fixture)
from tests.serve.test_tta import faces, model_input

CROP, CUT = 0.75, slice(6, 42)
"""A centre crop of 0.75 of the face's side is exactly its pixels 6..41 (36 of 48)."""


def test_a_centre_crop_is_exactly_the_centre_pixels_and_1_is_the_whole_face() -> None:
    batch = torch.from_numpy(faces(4))[:, None]
    cropped = eval_transform(batch, image_size=36, crop=CROP)
    torch.testing.assert_close(cropped, to_model_input(batch[:, :, CUT, CUT].contiguous(), image_size=36),
                               rtol=0, atol=2e-5)  # fmt: skip  (float coordinates: 1e-3 grey levels)
    assert torch.equal(eval_transform(batch, image_size=32), to_model_input(batch, image_size=32))
    assert (cropped - eval_transform(batch, image_size=36)).abs().max() > 0.1


def test_the_predictor_and_its_flip_see_the_models_view(tiny_checkpoint: Path) -> None:
    """Catches Predictor.of, or the flip views, ignoring eval_crop: the probabilities equal the model's on the
    centre pixels cut with numpy (and, for flip, their mirror averaged in)."""
    model, cfg = load_classifier(tiny_checkpoint)
    view = dataclasses.replace(cfg.model, eval_crop=CROP)
    batch, size = faces(6), cfg.model.image_size
    centre = batch[:, CUT, CUT]
    with torch.no_grad():
        plain = torch.softmax(model(model_input(np.ascontiguousarray(centre), size)), dim=1)
        mirror = torch.softmax(model(model_input(np.ascontiguousarray(centre[:, :, ::-1]), size)), dim=1)
    np.testing.assert_allclose(Predictor.of(model, view).probabilities(batch), plain.numpy(), rtol=0, atol=2e-6)
    flipped = Predictor.of(model, view, tta="flip").probabilities(batch)
    np.testing.assert_allclose(flipped, ((plain + mirror) / 2).numpy(), rtol=0, atol=2e-6)
    whole = Predictor.of(model, cfg.model).probabilities(batch)
    assert np.abs(whole - plain.numpy()).max() > 1e-4  # the view changes this model's answer


def test_validation_scores_the_same_view_as_evaluate(tiny_checkpoint: Path, synth_shards: Path) -> None:
    """The epoch is picked on what the shipped model will see: the loop's validation at eval_crop equals
    evaluate.py's path (the predictor) at it, and differs from the whole face's."""
    model, cfg = load_classifier(tiny_checkpoint)
    cropped = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, eval_crop=0.6))
    dataset = open_dataset(str(synth_shards))
    loop = evaluate(model, dataset, cropped, split="val", rank=0, world_size=1, device=torch.device("cpu"))
    served = evaluate_split(Predictor.of(model, cropped.model), dataset, "val")
    assert loop["confusion"] == served.confusion.tolist()
    whole = evaluate(model, dataset, cfg, split="val", rank=0, world_size=1, device=torch.device("cpu"))
    assert whole["confusion"] != loop["confusion"]


def test_the_mean_crop_side_is_what_training_draws() -> None:
    """mean_crop_side's formula against the sampler itself (square crops: the side is the matrix's scale)."""
    square = AugmentConfig(crop_scale=0.8, crop_ratio=1.0)
    theta = crop_params(200_000, square, generator=torch.Generator().manual_seed(0))
    assert theta[:, 1, 1].double().mean().item() == pytest.approx(mean_crop_side(0.8), abs=5e-4)
    assert mean_crop_side(0.8) == pytest.approx(0.9482, abs=1e-4) and mean_crop_side(1.0) == 1.0


def test_bad_views_are_one_sentence() -> None:
    for bad in ("0.2", "1.5"):
        with pytest.raises(FerdistError, match=r"model\.eval_crop must be in \[0\.5, 1\] \(the fraction of the face's "
                                               r"side the model sees\), got "):  # fmt: skip
            load_config(None, [f"model.eval_crop={bad}"])
    with pytest.raises(FerdistError, match=r"model\.eval_crop must be a finite number, got 'nan'"):
        load_config(None, ["model.eval_crop=nan"])


def test_a_bundle_exported_with_a_view_keeps_it_everywhere(
    checkpoint: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """export --eval-crop: the bundle's config, its expected probabilities, its card and its ONNX graph all carry
    the view; a view outside [0.5, 1] is one sentence and writes nothing."""
    import export as job

    out = tmp_path / "cropped"
    export_bundle(checkpoint, out, "--eval-crop", str(CROP))
    model, cfg = load_classifier(out)
    assert cfg.model.eval_crop == CROP and bundled.check(out).ok
    check = check_faces(bundled.CHECK_FACES, seed=bundled.CHECK_SEED)
    expected = np.asarray(json.loads((out / bundled.EXPECTED_FILE).read_text())["probabilities"], dtype=np.float32)
    np.testing.assert_allclose(expected, Predictor.of(model, cfg.model).probabilities(check), rtol=0, atol=1e-6)
    whole = Predictor(model, image_size=cfg.model.image_size).probabilities(check)
    assert np.abs(expected - whole).max() > 1e-4
    card = (out / bundled.CARD_FILE).read_text()
    assert f"the centre {CROP:g} of the face's side (the model's view), resized to" in card
    assert f"- View: `model.eval_crop` {CROP:g} was set at export" in card and "saw the whole face." in card

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        job.main(["--model", str(checkpoint), "--format", "bundle", "--out", str(tmp_path / "never"),
                  "--eval-crop", "1.2"])  # fmt: skip
    assert exit_.value.code == 2 and not (tmp_path / "never").exists()
    assert "--eval-crop must be in [0.5, 1] (the fraction of the face's side the model sees), got 1.2" in (
        capsys.readouterr().err.replace("\n", " ")
    )

    for package in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(package, reason='the ONNX export needs the export extra: pip install -e ".[export]"')
    import onnxruntime as ort

    from ferdist.serve.export import read_metadata

    onnx_file = tmp_path / "cropped.onnx"
    assert job.main(["--model", str(out), "--out", str(onnx_file)]) == 0
    got = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(None, {"faces": check})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert read_metadata(onnx_file)["eval_crop"] == str(CROP)


def test_the_benchmark_picks_on_val_and_scores_test_only_for_the_pick_the_models_view_and_the_whole_face(
    tiny_checkpoint: Path, synth_shards: Path, tmp_path: Path
) -> None:
    import benchmark

    out = tmp_path / "eval-crop.json"
    crops = [1.0, 0.9, 0.75, 0.6]
    assert benchmark.main(["eval-crop", "--model", str(tiny_checkpoint), "--manifest", str(synth_shards),
                           "--crops", *map(str, crops), "--json", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    model, cfg = load_classifier(tiny_checkpoint)
    dataset = open_dataset(str(synth_shards))

    def score(crop: float, split: str) -> float:
        view = dataclasses.replace(cfg.model, eval_crop=crop)
        return evaluate_split(Predictor.of(model, view), dataset, split).report.accuracy

    val = {crop: score(crop, "val") for crop in crops}
    picked = max(crops, key=lambda crop: (val[crop], crop))
    assert [r["eval_crop"] for r in result["rows"]] == crops and result["picked"] == picked
    assert [r["val_acc"] for r in result["rows"]] == [val[c] for c in crops]
    assert {r["eval_crop"] for r in result["rows"] if r["test_acc"] is not None} == {picked, 1.0}
    assert result["best"]["test_acc"] == score(picked, "test") and result["own"]["eval_crop"] == 1.0
    with pytest.raises(SystemExit):
        benchmark.main(["eval-crop", "--crops", "2"])
