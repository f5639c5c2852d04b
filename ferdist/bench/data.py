"""``data`` measures, on the same faces: the sharding job (validate → PNG → tar → manifest), the shard reader in
samples/s per loader process (in-process, and through a DataLoader with 1 and 2 worker processes) from a local
folder and from an S3 server on 127.0.0.1 (moto, over HTTP), and the naive baseline the original notebook used:
torchvision ``ImageFolder`` over PNG files with Grayscale(3) + Resize(224) + ToTensor + Normalize per sample.
"""

from __future__ import annotations

import argparse
import lzma
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ferdist.config import DataConfig
from ferdist.data.loader import build_loader, open_dataset
from ferdist.data.sharding import write_shards
from ferdist.data.sources import open_source, synthetic_source


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
