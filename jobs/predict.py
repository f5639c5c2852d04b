"""Classify face images: files or folders, any size or colour (faces assumed already cropped).

    python jobs/predict.py face1.png face2.jpg photos/                       # the @champion, printed
    python jobs/predict.py --model runs/quickstart/checkpoint_… photos/ --output predictions.csv   # or .json

--model takes models:/NAME@ALIAS (default models:/fer-vitmae@champion), models:/NAME/VERSION, runs:/RUN_ID/model,
a checkpoint folder or an s3:// checkpoint. A file that is not an image is reported and skipped; the others are
still classified (exit code 1 if any was skipped).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ferdist.console import job_console  # noqa: E402
from ferdist.errors import FerdistError  # noqa: E402

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="image files and/or folders (searched recursively)")
    p.add_argument("--model", default="models:/fer-vitmae@champion", help="model URI or checkpoint folder")
    p.add_argument("--output", type=Path, default=None, help="write predictions to a .csv or .json file")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped face")
    p.add_argument("--batch-size", type=int, default=256)
    return p.parse_args(argv)


def image_files(paths: list[Path]) -> list[Path]:
    """The files named, and the image files under the folders named, in a stable order.

    Raises:
        FerdistError: a path does not exist, or a folder holds no image files.
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FerdistError(f"{path}/ holds no image files (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FerdistError(f"{path} does not exist")
    return files


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    console = job_console(stderr=True)
    try:
        args = parse_args(argv)
        if args.output and args.output.suffix.lower() not in (".csv", ".json"):
            raise FerdistError(f"--output {args.output}: write a .csv or .json file")
        files = image_files(args.paths)
        import numpy as np
        import torch

        from ferdist.checkpoint import load_classifier
        from ferdist.inference import Predictor, read_image
        from ferdist.registry import fetch_checkpoint

        with tempfile.TemporaryDirectory(prefix="ferdist-predict-") as tmp:
            folder, _ = fetch_checkpoint(args.model, Path(tmp))
            model, cfg = load_classifier(folder)
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
        predictor = Predictor(model, image_size=cfg.model.image_size, batch_size=args.batch_size, tta=args.tta)
    except FerdistError as exn:
        console.print(f"[bold red]error:[/] {exn}", highlight=False)
        return 2
    faces, kept, skipped = [], [], []
    for path in files:  # a bad file is reported and skipped; the rest are still classified
        try:
            faces.append(read_image(path))
            kept.append(path)
        except FerdistError as exn:
            skipped.append(path)
            console.print(f"[yellow]skipped:[/] {exn}", highlight=False)
    probabilities = predictor.probabilities(np.stack(faces)) if faces else np.zeros((0, 7), dtype=np.float32)
    rows = table_rows(kept, probabilities)
    if args.output:
        write_output(args.output, rows)
        console.print(f"wrote {len(rows)} predictions to {args.output}")
    else:
        print_rows(rows)
    if skipped:
        console.print(f"{len(kept)} classified, {len(skipped)} skipped (not images)")
    return 1 if skipped else 0


def table_rows(paths: list[Path], probabilities) -> list[dict]:  # noqa: ANN001
    from ferdist.constants import FER_CLASSES

    rows = []
    for path, p in zip(paths, probabilities, strict=True):
        rows.append({"path": str(path), "label": FER_CLASSES[int(p.argmax())],
                     **{name.lower(): round(float(v), 6) for name, v in zip(FER_CLASSES, p, strict=True)}})  # fmt: skip
    return rows


def print_rows(rows: list[dict]) -> None:
    from ferdist.constants import FER_CLASSES

    table = Table()
    for column in ("path", "label", *[c[:3].lower() for c in FER_CLASSES]):
        table.add_column(column, justify="left" if column in ("path", "label") else "right")
    for row in rows:
        table.add_row(row["path"], row["label"], *[f"{row[c.lower()]:.3f}" for c in FER_CLASSES])
    job_console().print(table)


def write_output(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(rows, indent=1) + "\n")
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["path", "label"])
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
