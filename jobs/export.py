"""Export a trained model to ONNX: uint8 faces [N, 48, 48] in, softmax probabilities [N, 7] out, preprocessing inside.

    python jobs/export.py --out fer.onnx                                  # the @champion
    python jobs/export.py --model models:/fer-vitmae/3 --out fer.onnx --force
    python jobs/export.py --model runs/quickstart/model_epoch_0009 --out fer.onnx --opset 20

--model takes models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a checkpoint folder or an s3://
checkpoint. The class names and the input contract are stored in the file's metadata. Before --out is written,
ONNX Runtime (CPU) must reproduce PyTorch's probabilities within 1e-4 on 256 faces and on a batch of one.
Needs the export extra: pip install -e ".[export]".
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ferdist.console import job_console, print_error  # noqa: E402
from ferdist.errors import FerdistError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from ferdist.serve.export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models:/fer-vitmae@champion", help="model URI or checkpoint folder")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="the file format (only onnx)")
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint of an s3:// --model (default: AWS_ENDPOINT_URL)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    console = job_console(stderr=True)
    try:
        args = parse_args(argv)
        from ferdist.serve import export

        export.check_destination(args.out, force=args.force)
        export.check_opset(args.opset)
        export.require_packages()
        from ferdist.track.registry import fetch_checkpoint
        from ferdist.train.checkpoint import load_classifier

        with tempfile.TemporaryDirectory(prefix="ferdist-export-") as tmp:
            folder, ref = fetch_checkpoint(args.model, Path(tmp), endpoint_url=args.endpoint_url)
            model, cfg = load_classifier(folder)
        what = f"{ref.name} v{ref.version}" if ref.version else args.model
        size = cfg.model.image_size
        metadata = export.onnx_metadata(image_size=size, model_uri=f"{args.model} ({what})" if ref.version else what,
                                        backbone=cfg.model.pretrained)  # fmt: skip
        console.print(f"exporting {what} ({cfg.model.pretrained} at {size} px) to ONNX opset {args.opset}…")
        result = export.export_checked(model, args.out, image_size=size, metadata=metadata, opset=args.opset)
    except FerdistError as exn:
        print_error(console, exn)
        return 2
    console.print(f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB, opset {result.opset})", highlight=False)
    console.print(f"input '{export.INPUT_NAME}' uint8 [N, 48, 48] → output '{export.OUTPUT_NAME}' float32 [N, 7] "
                  f"({', '.join(export.FER_CLASSES)})", highlight=False)  # fmt: skip
    console.print(f"ONNX Runtime (CPU) vs PyTorch on {export.CHECK_FACES} faces and a batch of 1: max "
                  f"|Δp| {result.max_abs_diff:.2e} (limit {export.MAX_ABS_DIFF:g})", highlight=False)  # fmt: skip
    if cfg.model.pretrained.startswith("random:"):
        console.print(f"(backbone {cfg.model.pretrained}: randomly initialised, not pretrained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
