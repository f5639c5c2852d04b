"""A trained classifier as one ONNX file that takes FER2013 faces as they are: uint8 ``[N, 48, 48]`` in,
softmax probabilities ``[N, 7]`` out, with the resize and normalisation of `ferdist.data.transforms.eval_transform`
inside the graph, so a runtime without ferdist cannot feed the model differently from how it was trained.

The graph comes from PyTorch's ``torch.export``-based ONNX exporter (``torch.onnx.export(dynamo=True)``, written out
with onnxscript). The older TorchScript exporter refuses ``affine_grid`` below opset 20, and the resize here is an
``affine_grid`` + ``grid_sample``. Every file is checked with ONNX Runtime against the PyTorch model before it
replaces anything (`check_onnx`).
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ferdist import __version__
from ferdist.constants import FACE_SIDE, FER_CLASSES, IMAGENET_MEAN, IMAGENET_STD
from ferdist.data.transforms import eval_transform
from ferdist.errors import FerdistError
from ferdist.files import check_writable
from ferdist.train.model import FerClassifier

MIN_OPSET = 18
"""The lowest opset the exporter writes."""
DEFAULT_OPSET = MIN_OPSET
"""The lowest, because it is read by the most runtimes (ONNX Runtime since 1.14)."""
MAX_OPSET = 25
"""The highest opset verified here (torch 2.15, onnxscript 0.7, ONNX Runtime 1.32); above it the exporter falls back to
onnx's version converter, whose graphs ONNX Runtime refused."""
MAX_ABS_DIFF = 1e-4
"""The largest |probability difference| to PyTorch a written file may show."""
CHECK_FACES = 256
INPUT_NAME, OUTPUT_NAME = "faces", "probabilities"
PACKAGES = ("onnx", "onnxscript", "onnxruntime")
MAX_BATCH = 65_536
"""Largest batch the exported graph declares. An unbounded batch dimension fails torch.export on torch 2.6 (a guard
against the largest int64), and no caller sends more faces than this in one call."""


class FaceClassifier(nn.Module):
    """uint8 faces ``[N, 48, 48]`` → probabilities ``[N, 7]``: `ferdist.serve.inference.Predictor` without autocast."""

    def __init__(self, model: FerClassifier, *, image_size: int, eval_crop: float = 1.0) -> None:
        super().__init__()
        self.model, self.image_size, self.eval_crop = model, image_size, eval_crop

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        logits = self.model(eval_transform(faces.unsqueeze(1), image_size=self.image_size, crop=self.eval_crop))
        return torch.softmax(logits.float(), dim=1)


@dataclass(frozen=True)
class ExportResult:
    """A written and checked ONNX file."""

    path: Path
    size_bytes: int
    max_abs_diff: float
    """Largest |p_onnxruntime − p_pytorch| over the check faces."""
    opset: int


def require_packages() -> None:
    """Fails with the install command when the optional export packages are missing (they are an extra, not core)."""
    missing = []
    for name in PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise FerdistError(f"exporting to ONNX needs onnx, onnxscript and onnxruntime ({', '.join(missing)} missing); "
                           'install them with pip install -e ".[export]"')  # fmt: skip


def check_destination(out: Path, *, force: bool) -> None:
    """Refuses an ``out`` that would be misread (no .onnx suffix) or would silently replace a file."""
    if out.suffix.lower() != ".onnx":
        raise FerdistError(f"--out {out} does not end in .onnx; name the file model.onnx or similar")
    if out.is_dir():
        raise FerdistError(f"--out {out} is a folder; give a file name ending in .onnx")
    if out.exists() and not force:
        raise FerdistError(f"{out} already exists; pass --force to replace it, or choose another --out")
    check_writable(out, what="--out", folder=False)  # e.g. a file where a folder of its path should be


def check_opset(opset: int) -> None:
    """Refuses opsets the exporter cannot write, or writes through a converter whose graphs did not run."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise FerdistError(f"--opset {opset} is outside {MIN_OPSET}..{MAX_OPSET}, the opsets the torch.onnx exporter "
                           "writes and ONNX Runtime was verified to run")  # fmt: skip


def onnx_metadata(*, image_size: int, model_uri: str, backbone: str, eval_crop: float = 1.0) -> dict[str, str]:
    """What a user holding only the .onnx file needs to know to feed it and read its output."""
    return {
        "classes": json.dumps(list(FER_CLASSES)),
        "input": f"{INPUT_NAME}: uint8 [N, {FACE_SIDE}, {FACE_SIDE}] grey faces, 0 = black, 255 = white, any batch N; "
        "convert other images to grey (ITU-R 601 luma) and resize them to 48x48 (bilinear) first",
        "output": f"{OUTPUT_NAME}: float32 [N, {len(FER_CLASSES)}] softmax probabilities, in the order of 'classes'",
        "preprocessing": f"in the graph: /255, {crop_words(eval_crop)}bilinear resize to {image_size}x{image_size} "
        f"(grid_sample, align_corners=False), grey to 3 channels, normalised with mean {list(IMAGENET_MEAN)} std "
        f"{list(IMAGENET_STD)}",
        "image_size": str(image_size),
        "eval_crop": str(eval_crop),
        "ferdist_model": model_uri,
        "ferdist_backbone": backbone,
        "ferdist_version": __version__,
    }


def crop_words(eval_crop: float) -> str:
    return "" if eval_crop == 1.0 else f"the centre {eval_crop:g} of the face's side, "


def export_onnx(
    model: FerClassifier, out: Path, *, image_size: int, metadata: dict[str, str], opset: int, eval_crop: float = 1.0
) -> None:
    """Writes the face-in, probabilities-out graph of ``model`` to ``out`` (one file, weights included)."""
    check_opset(opset)
    wrapper = FaceClassifier(model.eval(), image_size=image_size, eval_crop=eval_crop).eval()
    # Two example faces, not one: torch.export specialises a dimension of size 1, which would fix the batch.
    example = torch.zeros(2, FACE_SIDE, FACE_SIDE, dtype=torch.uint8)
    try:
        program = torch.onnx.export(
            wrapper, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch", max=MAX_BATCH)}},
            verbose=False,
        )  # fmt: skip
    except Exception as exn:  # torch.export and onnxscript raise many types; the first line says which step failed
        first = str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__
        raise FerdistError(f"torch {torch.__version__} could not export this model to ONNX opset {opset} ({first}); "
                           "try another --opset, or report it with the model's backbone.json") from None  # fmt: skip
    if program is None:  # only the TorchScript exporter returns None
        raise FerdistError("torch.onnx.export(dynamo=True) returned no ONNX program; upgrade torch (>= 2.6)")
    program.model.metadata_props.update(metadata)
    program.model.doc_string = f"ferdist FER2013 classifier: {metadata['input']} -> {metadata['output']}"
    # One self-contained file; the protobuf limit (2 GB) is far above ViT-MAE large.
    program.save(out, external_data=False)


def check_faces(n: int, *, seed: int = 0) -> np.ndarray:
    """``n`` deterministic uint8 faces: SYNTHETIC faces of every class (`ferdist.data.synth`), every fourth one replaced
    by random pixels so every value 0-255 goes through the graph too."""
    from ferdist.data.synth import draw_face

    rng = np.random.default_rng(seed)
    faces = np.stack([draw_face(i % len(FER_CLASSES), rng) for i in range(n)])
    faces[::4] = rng.integers(0, 256, size=faces[::4].shape, dtype=np.uint8)
    return faces


def check_onnx(
    path: Path, model: FerClassifier, *, image_size: int, eval_crop: float = 1.0, faces: int = CHECK_FACES
) -> float:
    """Largest |p_onnxruntime − p_pytorch| over ``faces`` random faces, run as one batch and as a batch of 1
    (``model`` on the CPU: on CUDA, Predictor's bf16 autocast would be measured, not the export).

    Raises:
        FerdistError: ONNX Runtime cannot load or run the file.
    """
    import onnxruntime as ort

    from ferdist.serve.inference import Predictor

    batch = check_faces(faces)
    expected = Predictor(model, image_size=image_size, eval_crop=eval_crop, batch_size=faces).probabilities(batch)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        many = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        one = session.run([OUTPUT_NAME], {INPUT_NAME: batch[:1]})[0]
    except Exception as exn:  # ORT raises its own untyped errors (Fail, InvalidGraph, NotImplemented, …)
        first = str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__
        raise FerdistError(f"ONNX Runtime {ort.__version__} cannot run the exported graph ({first}); try a lower "
                           f"--opset (default {DEFAULT_OPSET})") from None  # fmt: skip
    if many.shape != expected.shape or one.shape != expected[:1].shape:
        raise FerdistError(f"the exported graph returns {many.shape} for {faces} faces, not {expected.shape}")
    return float(max(np.abs(many - expected).max(), np.abs(one - expected[:1]).max()))


def export_checked(
    model: FerClassifier, out: Path, *, image_size: int, metadata: dict[str, str], opset: int, eval_crop: float = 1.0
) -> ExportResult:
    """Exports to a temporary file beside ``out``, checks it with ONNX Runtime, and only then moves it to ``out``,
    so a failed export or check never leaves a bad file and never replaces a good one.

    Raises:
        FerdistError: the file does not reproduce PyTorch's probabilities within `MAX_ABS_DIFF`, or cannot be run.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exn:
        raise FerdistError(f"cannot create the folder of --out {out} ({exn.strerror}); choose another --out") from None
    partial = out.with_name(f".{out.name}.partial")  # same folder: os.replace is then a rename
    try:
        export_onnx(model, partial, image_size=image_size, metadata=metadata, opset=opset, eval_crop=eval_crop)
        diff = check_onnx(partial, model, image_size=image_size, eval_crop=eval_crop)
        if not diff <= MAX_ABS_DIFF:  # `not <=` so that NaN fails too
            raise FerdistError(f"the exported graph's probabilities differ from PyTorch's by up to {diff:.2e} (> "
                               f"{MAX_ABS_DIFF:g}) on {CHECK_FACES} faces; nothing was written to {out}")  # fmt: skip
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return ExportResult(path=out, size_bytes=out.stat().st_size, max_abs_diff=diff, opset=file_opset(out))


def file_opset(path: Path) -> int:
    """The default-domain opset the file declares, read back rather than taken from the request."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def read_metadata(path: Path) -> dict[str, str]:
    """The file's metadata_props (what `onnx_metadata` wrote)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
