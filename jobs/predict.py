"""Find the faces in photos and classify each one's expression: files or folders, any size, grey or colour.

    python jobs/predict.py group.jpg photos/                                  # the @champion, a row per face
    python jobs/predict.py photos/ --output faces.csv --annotate annotated/  # or .json; boxes and labels drawn
    python jobs/predict.py crops/ --detect off                               # inputs that are already face crops

--model takes models:/NAME@ALIAS (default models:/fer-vitmae@champion), models:/NAME/VERSION, runs:/RUN_ID/model,
a checkpoint folder or an s3:// checkpoint. --detect auto (the default) searches every image larger than 96×96 for
faces and takes smaller ones (a FER2013 row, a crop another tool made) as one face; `on` searches every image, `off`
none (--no-detect is the same). A photo with no face gets a row saying so. A file that is not an image is reported
and skipped; the others are still classified (exit code 1 if any was skipped).
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
from ferdist.faces import DETECT_MODES  # noqa: E402

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
CHUNK = 64
"""Files decoded at a time: a folder of thousands of photos is never held in memory at once."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="image files and/or folders (searched recursively)")
    p.add_argument("--model", default="models:/fer-vitmae@champion", help="model URI or checkpoint folder")
    p.add_argument("--output", type=Path, default=None, help="write a row per face to a .csv or .json file")
    p.add_argument("--annotate", type=Path, default=None, help="folder for copies of the photos with boxes drawn")
    p.add_argument("--detect", choices=DETECT_MODES, default="auto", help="search images for faces (see above)")
    p.add_argument("--no-detect", dest="detect", action="store_const", const="off", help="same as --detect off")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped face")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint of an s3:// --model (default: AWS_ENDPOINT_URL)")
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
        if args.annotate and args.annotate.exists() and not args.annotate.is_dir():
            raise FerdistError(f"--annotate {args.annotate} is a file; name a folder for the annotated photos")
        files = image_files(args.paths)
        import torch

        from ferdist.checkpoint import load_classifier
        from ferdist.inference import Predictor
        from ferdist.registry import fetch_checkpoint

        with tempfile.TemporaryDirectory(prefix="ferdist-predict-") as tmp:
            folder, _ = fetch_checkpoint(args.model, Path(tmp), endpoint_url=args.endpoint_url)
            model, cfg = load_classifier(folder)
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
        predictor = Predictor(model, image_size=cfg.model.image_size, batch_size=args.batch_size, tta=args.tta)
    except FerdistError as exn:
        console.print(f"[bold red]error:[/] {exn}", highlight=False)
        return 2
    rows = predict_files(predictor, files, detect=args.detect)
    skipped = [row for row in rows if row["error"]]
    for row in skipped:
        console.print(f"[yellow]skipped:[/] {row['error']}", highlight=False)
    kept = [{k: v for k, v in row.items() if k != "error"} for row in rows if not row["error"]]
    if args.output:
        write_output(args.output, kept)
        console.print(f"wrote {plural(len(kept), 'row')} to {args.output}")
    else:
        print_rows(kept)
    if args.annotate:
        from ferdist.annotate import annotate_files

        written = annotate_files(kept, args.annotate)
        console.print(f"wrote {plural(len(written), 'annotated photo')} to {args.annotate}/")
    faces, images = sum(1 for row in kept if row["face"] >= 0), len({row["file"] for row in kept})
    console.print(f"{plural(faces, 'face')} in {plural(images, 'image')}"
                  + (f", {plural(len(skipped), 'file')} skipped" if skipped else ""))  # fmt: skip
    return 1 if skipped else 0


def plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def predict_files(predictor, files: list[Path], *, detect: str) -> list[dict]:  # noqa: ANN001
    """A row per face (or per photo without one, or per unreadable file, with its ``error``), in file order."""
    from ferdist.inference import classify

    rows: list[dict] = []
    for start in range(0, len(files), CHUNK):
        chunk, data, unreadable = files[start : start + CHUNK], [], {}
        for path in chunk:
            try:
                data.append(path.read_bytes())
            except OSError as exn:
                unreadable[path] = f"cannot read {path} ({exn.strerror})"
        readable = [path for path in chunk if path not in unreadable]
        table = classify(predictor, data, detect=detect, names=[str(path) for path in readable])
        found: dict[Path, list[dict]] = {}
        for record in table.to_dict(orient="records"):
            path = readable[record.pop("image")]
            found.setdefault(path, []).append({"file": str(path), **{k: (round(v, 6) if isinstance(v, float) else v)
                                                                     for k, v in record.items()}})  # fmt: skip
        for path in chunk:
            rows += found.get(path) or [{"file": str(path), "face": -1, "error": unreadable[path]}]
    return rows


def print_rows(rows: list[dict]) -> None:
    from ferdist.constants import FER_CLASSES

    table = Table()
    for column in ("file", "face", "box", "label", *[c[:3].lower() for c in FER_CLASSES]):
        table.add_column(column, justify="left" if column in ("file", "label", "box") else "right")
    for row in rows:
        if row["face"] < 0:
            table.add_row(row["file"], "", "", row["label"], *[""] * len(FER_CLASSES))
            continue
        box = f"{row['w']}×{row['h']} at {row['x']},{row['y']}"
        table.add_row(row["file"], str(row["face"]), box, row["label"],
                      *[f"{row[f'p_{c.lower()}']:.3f}" for c in FER_CLASSES])  # fmt: skip
    job_console().print(table)


def write_output(path: Path, rows: list[dict]) -> None:
    import math

    from ferdist.inference import COLUMNS

    # A photo without a face has no probabilities: empty in CSV, null in JSON.
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()} for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(clean, indent=1) + "\n")
        return
    with path.open("w", newline="") as f:
        fields = ["file", *[c for c in COLUMNS if c not in ("image", "error")]]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(clean)


if __name__ == "__main__":
    sys.exit(main())
