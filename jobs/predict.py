r"""Find the faces in photos and classify each one's expression: files or folders, any size, grey or colour.

    python jobs/predict.py group.jpg photos/                                  # the @champion, a row per face
    python jobs/predict.py photos/ --output faces.csv --annotate annotated/  # or .json; boxes and labels drawn
    python jobs/predict.py crops/ --detect off                               # inputs that are already face crops
    python jobs/predict.py photo.jpg --model fer2013-vitmae-small            # a bundled model: no training, no MLflow

--model takes models:/NAME@ALIAS (default models:/fer-vitmae@champion), models:/NAME/VERSION, runs:/RUN_ID/model,
a checkpoint folder, an s3:// checkpoint, or the name of a model bundled with ferdist (bundled:NAME or NAME; the
folders of ferdist/models/, usable right after install). --detect auto (the default) searches every image larger
than 96×96 for faces and takes smaller ones (a FER2013 row, a crop another tool made) as one face; `on` searches
every image, `off` none (--no-detect is the same). A photo with no face gets a row saying so. A file that is not an
image is reported and skipped; the others are still classified (exit code 1 if any was skipped).

File names are written one way on the screen, in the CSV and JSON and in messages: their bytes read as UTF-8, with a
byte that is not UTF-8 as \xNN, a backslash as \\, a newline, tab or carriage return as \n, \t, \r, other ASCII
control characters as \xNN, and C1 controls, line separators and bidi controls as \uNNNN. So a Latin-1 café.jpg is
caf\xe9.jpg, every name is one line, and no two files share a spelling. An annotated copy keeps its photo's own name
(the same bytes, .png for the suffix). --output and each annotated copy are written whole or not at all: a file
already there is replaced only once the new one is complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.text import Text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ferdist.config import redact_uri  # noqa: E402
from ferdist.console import Once, job_console, path_arg, whole_number  # noqa: E402
from ferdist.errors import FerdistError  # noqa: E402
from ferdist.files import check_writable, shown_name  # noqa: E402
from ferdist.serve.faces import DETECT_MODES  # noqa: E402
from ferdist.serve.photos import image_files, predict_files, rows_table, write_rows  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=path_arg, help="image files and/or folders (searched recursively)")
    p.add_argument("--model", default="models:/fer-vitmae@champion",
                   help="model URI, checkpoint folder or bundled model name (see above)")  # fmt: skip
    p.add_argument("--output", type=path_arg, default=None, help="write a row per face to a .csv or .json file")
    p.add_argument("--annotate", type=path_arg, default=None, help="folder for copies of the photos with boxes drawn")
    p.add_argument("--detect", choices=DETECT_MODES, default="auto", action=Once,
                   help="search images for faces (see above)")  # fmt: skip
    p.add_argument("--no-detect", dest="detect", action=Once, nargs=0, const="off", help="same as --detect off")
    p.add_argument("--tta", nargs="?", const="flip", default="none", metavar="flip|crops", action=Once,
                   help="test-time augmentation, reported apart: flip (the face and its mirror averaged; a bare "
                        "--tta) or crops (ten views: the four corners and the centre, 42 of 48 pixels square, each "
                        "mirrored)")  # fmt: skip
    p.add_argument("--batch-size", type=whole_number(1), default=256)
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint of an s3:// --model (default: AWS_ENDPOINT_URL)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    console = job_console(stderr=True)
    try:
        args = parse_args(argv)
        if args.output:
            if args.output.suffix.lower() not in (".csv", ".json"):
                raise FerdistError(f"--output {shown_name(args.output)}: write a .csv or .json file")
            check_writable(args.output, what="--output", folder=False)
        if args.annotate:
            check_writable(args.annotate, what="--annotate", folder=True)
        files = image_files(args.paths)
        import torch

        from ferdist.serve.inference import Predictor
        from ferdist.track.registry import load_model

        loaded = load_model(args.model, endpoint_url=args.endpoint_url)
        model, cfg = loaded.model, loaded.cfg
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
        predictor = Predictor.of(model, cfg.model, batch_size=args.batch_size, tta=args.tta)
        rows = predict_files(predictor, files, detect=args.detect)
        skipped = [row for row in rows if row["error"]]
        for row in skipped:
            say(console, row["error"], lead=("skipped: ", "yellow"))
        kept = [{k: v for k, v in row.items() if k != "error"} for row in rows if not row["error"]]
        if args.output:
            write_rows(args.output, kept)
            say(console, f"wrote {plural(len(kept), 'row')} to {shown_name(args.output)}")
        else:
            job_console().print(rows_table(kept))
        if args.annotate:
            from ferdist.serve.annotate import annotate_files

            written = annotate_files(kept, args.annotate, keep=files)
            say(console, f"wrote {plural(len(written), 'annotated photo')} to {shown_name(args.annotate)}/")
    except FerdistError as exn:
        say(console, redact_uri(str(exn)), lead=("error: ", "bold red"))  # no password of a URI it names
        return 2
    faces, images = sum(1 for row in kept if row["face"] >= 0), len({row["file"] for row in kept})
    console.print(f"{plural(faces, 'face')} in {plural(images, 'image')}"
                  + (f", {plural(len(skipped), 'file')} skipped" if skipped else ""))  # fmt: skip
    return 1 if skipped else 0


def say(console: Console, text: str, *, lead: tuple[str, str] = ("", "")) -> None:
    """One line: ``lead`` (its text and style), then ``text`` as it is. File names in it are already spelt by
    `shown_name`; as Text they are not read as markup (``[final].jpg``) or emoji codes (``:smile:.jpg``) either."""
    console.print(Text.assemble(lead, text), highlight=False)


def plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


if __name__ == "__main__":
    sys.exit(main())
