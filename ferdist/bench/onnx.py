"""``onnx`` measures CPU images/s of the exported ONNX file (`ferdist.serve.export`) under ONNX Runtime against the
PyTorch
`ferdist.serve.inference.Predictor` it was exported from, on the same uint8 faces and batches, for the quick-start
geometry
(random:tiny at 32 px) and the ViT-B/16 base geometry at 224 (`BASE_IMAGES`: one of them takes about half a second
on two cores). Both sides get the same number of threads, and both include the preprocessing.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

BASE_IMAGES = 32
"""Images per ViT-B/16 measurement, whatever ``images`` says: keeps the benchmark near a minute on two cores."""


def bench_onnx(*, images: int, batch: int, console: Console | None = None) -> dict:
    """Images/s through ONNX Runtime and through PyTorch for each geometry, with the export's size and max |Δp|."""
    import onnxruntime as ort
    import torch

    from ferdist.config import ModelConfig
    from ferdist.serve.export import DEFAULT_OPSET, check_faces, export_onnx, onnx_metadata
    from ferdist.serve.inference import Predictor
    from ferdist.train.model import build_model

    threads = torch.get_num_threads()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # the same cores as PyTorch, or the comparison measures thread counts
    faces = check_faces(images)
    title = f"CPU inference, {threads} threads: ONNX Runtime {ort.__version__} vs PyTorch {torch.__version__}"
    table = Table(title=f"{title} (random weights: speed only)")
    for column in ("model", "images", "PyTorch img/s", "ONNX Runtime img/s", "speed-up", "max |Δp|", "file MB"):
        table.add_column(column, justify="left" if column == "model" else "right")
    results: dict = {"device": f"CPU, {threads} threads", "onnxruntime": ort.__version__, "opset": DEFAULT_OPSET}
    for pretrained, size in (("random:tiny", 32), ("random:base", 224)):
        n = images if pretrained == "random:tiny" else min(images, BASE_IMAGES)
        model = build_model(ModelConfig(pretrained=pretrained, image_size=size, freeze_blocks=0), seed=0).eval()
        predictor = Predictor(model, image_size=size, batch_size=batch)
        with tempfile.TemporaryDirectory(prefix="ferdist-bench-onnx-") as tmp:
            path = Path(tmp) / "model.onnx"
            metadata = onnx_metadata(image_size=size, model_uri=pretrained, backbone=pretrained)
            export_onnx(model, path, image_size=size, metadata=metadata, opset=DEFAULT_OPSET)
            megabytes = path.stat().st_size / 1e6
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])  # reads the file now

        warm = faces[: max(1, min(batch, n // 4))]  # warm-up: allocator, thread pools, ORT's first-run planning
        predictor.probabilities(warm)
        run_batches(session, warm, batch=batch)
        started = time.perf_counter()
        expected = predictor.probabilities(faces[:n])
        torch_img_s = n / (time.perf_counter() - started)
        started = time.perf_counter()
        got = run_batches(session, faces[:n], batch=batch)
        onnx_img_s = n / (time.perf_counter() - started)
        diff = float(np.abs(got - expected).max())
        results[f"{pretrained}@{size}"] = {"images": n, "batch": batch, "torch_img_s": torch_img_s,
                                           "onnxruntime_img_s": onnx_img_s, "max_abs_diff": diff,
                                           "file_mb": megabytes}  # fmt: skip
        table.add_row(f"{pretrained} @{size}, batch {batch}", str(n), f"{torch_img_s:,.1f}", f"{onnx_img_s:,.1f}",
                      f"{onnx_img_s / torch_img_s:.2f}×", f"{diff:.1e}", f"{megabytes:,.1f}")  # fmt: skip
    if console is not None:
        console.print(table)
    return results


def run_batches(session: Any, faces: np.ndarray, *, batch: int) -> np.ndarray:
    """Probabilities from an ONNX Runtime session over ``faces`` in chunks of ``batch``, as Predictor chunks them."""
    from ferdist.serve.export import INPUT_NAME, OUTPUT_NAME

    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: faces[i : i + batch]})[0]
                           for i in range(0, len(faces), batch)])  # fmt: skip
