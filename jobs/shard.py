"""Shard FER2013 (or the SYNTHETIC set) into WebDataset tars + manifest.json on a local folder or S3.

python jobs/shard.py --source ../shared/data/fer2013/fer2013.csv.xz --dest shards/fer2013
python jobs/shard.py --source synthetic --dest shards/synthetic
python jobs/shard.py --source fer2013.csv --dest s3://my-bucket/fer2013 --endpoint-url http://127.0.0.1:9000
python jobs/shard.py --source my-face-crops/ --unlabeled --dest shards/my-faces   # for pretrain's data.extra
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ferdist.console import bold, job_console, print_error, whole_number  # noqa: E402
from ferdist.constants import DEFAULT_SAMPLES_PER_SHARD, FER_CLASSES, SYNTHETIC_DEFAULT_ROWS  # noqa: E402
from ferdist.data.sharding import ShardingResult, write_shards  # noqa: E402
from ferdist.data.sources import open_source, synthetic_source  # noqa: E402
from ferdist.errors import FerdistError, Interrupted  # noqa: E402

positive_int = whole_number(1)


def fraction(text: str) -> float:
    """argparse type: a number from 0 up to (not including) 1."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"'{text}' is not a fraction from 0 up to 1 (e.g. 0.1)")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--source",
        required=True,
        help="fer2013.csv[.gz|.xz], the Kaggle fer2013.tar.gz, an image folder (train/<class>/, test/<class>/), "
        "or 'synthetic' for the generated SYNTHETIC set",
    )
    p.add_argument(
        "--dest", default="shards/fer2013", help="local folder or s3://bucket/prefix (default: shards/fer2013)"
    )
    p.add_argument(
        "--samples-per-shard",
        type=positive_int,
        default=DEFAULT_SAMPLES_PER_SHARD,
        help=f"samples per tar (default {DEFAULT_SAMPLES_PER_SHARD}: FER2013 train → 449 shards, 7 per rank even at 64 "
        "GPUs)",
    )
    p.add_argument(
        "--endpoint-url",
        default=None,
        help="S3-compatible endpoint (MinIO, Ceph, …); default: AWS_ENDPOINT_URL or AWS itself",
    )
    p.add_argument(
        "--workers", type=positive_int, default=os.cpu_count(),
        help="encoding processes (default and most: the cores; never more than the shards to write)",
    )
    p.add_argument(
        "--val-fraction",
        type=fraction,
        default=0.1,
        help="image folders without val/: stratified fraction of train held out as val (default 0.1)",
    )
    p.add_argument(
        "--test-fraction",
        type=fraction,
        default=None,
        help="image folders without test/: stratified fraction of train held out as test (default: a test/ folder "
        "is required)",
    )
    p.add_argument(
        "--seed", type=whole_number(0), default=0, help="seed for the val/test slices and the synthetic set"
    )
    p.add_argument(
        "--unlabeled",
        action="store_true",
        help="--source is a folder of face images without labels (any sub-folders, any sizes): they become the "
        "'unlabeled' split, which only MAE pretraining reads (jobs/pretrain.py, data.extra)",
    )
    p.add_argument("--synthetic-rows", type=positive_int, default=SYNTHETIC_DEFAULT_ROWS,
                   help=f"size of the SYNTHETIC set (default {SYNTHETIC_DEFAULT_ROWS})")  # fmt: skip
    return p.parse_args(argv)


def summary(result: ShardingResult, console: Console) -> None:
    m = result.manifest
    synthetic = bold("   (SYNTHETIC data, not FER2013)", "bold yellow") if m.source.synthetic else ""
    console.print(Text.assemble(f"{m.source.name} → {result.dest}", synthetic))
    table = Table()
    table.add_column("")
    for name in m.splits:
        table.add_column(name, justify="right")
    splits = list(m.splits.values())
    table.add_row("samples", *(f"{s.samples:,}" for s in splits), style="bold")
    table.add_row("shards", *(str(len(s.shards)) for s in splits))
    table.add_row("MB", *(f"{sum(x.bytes for x in s.shards) / 1e6:.1f}" for s in splits), end_section=True)
    for c, cls in enumerate(FER_CLASSES):
        table.add_row(cls, *(f"{s.class_counts[c]:,}" for s in splits))
    console.print(table)
    console.print(
        f"manifest: {result.dest.rstrip('/')}/manifest.json\n"
        f"source sha256 {m.source.sha256[:16]}…  {result.written} shards written, {result.skipped} already present; "
        f"encode {result.seconds_encode:.1f}s, write {result.seconds_write:.1f}s"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = job_console(stderr=True)  # soft wrap: one error = one line, whatever the terminal width
    try:
        if args.source == "synthetic" and args.unlabeled:
            raise FerdistError("--unlabeled takes a folder of face images, not the SYNTHETIC set")
        if args.source == "synthetic":
            source = synthetic_source(args.synthetic_rows, seed=args.seed)
        else:
            with console.status(Text(f"reading {args.source}")):  # Text: a spinner reads str as markup
                source = open_source(
                    args.source, val_fraction=args.val_fraction, seed=args.seed, test_fraction=args.test_fraction,
                    unlabeled=args.unlabeled,
                )  # fmt: skip
        total = sum(rows.size for rows in source.splits.values())
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            enc = progress.add_task("encode", total=total)
            wr = progress.add_task("write (bytes)", total=None)
            result = write_shards(
                source,
                args.dest,
                samples_per_shard=args.samples_per_shard,
                workers=args.workers,
                endpoint_url=args.endpoint_url,
                on_encoded=lambda n: progress.advance(enc, n),
                on_written=lambda n: progress.advance(wr, n),
            )
    except Interrupted as exn:
        print_error(console, exn, label="stopped")
        return 130
    except KeyboardInterrupt:
        print_error(console, f"interrupted while reading {args.source}; nothing was written", label="stopped")
        return 130
    except FerdistError as exn:
        print_error(console, exn)
        return 2
    summary(result, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
