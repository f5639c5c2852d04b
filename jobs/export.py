"""Export a trained model: to ONNX (uint8 faces [N, 48, 48] in, softmax probabilities [N, 7] out, preprocessing
inside), or as a bundle that ships with ferdist and works with no training and no registry.

    python jobs/export.py --out fer.onnx                                  # the @champion
    python jobs/export.py --model models:/fer-vitmae/3 --out fer.onnx --force
    python jobs/export.py --model runs/quickstart/model_epoch_0009 --out fer.onnx --opset 20
    python jobs/export.py --format bundle --out ferdist/models/fer2013-vitmae-small   # the @champion, bundled
    python jobs/export.py --model fer2013-vitmae-small --format backbone --out pretrained/fer2013-encoder

--model takes models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a checkpoint folder, an s3://
checkpoint, or a bundled model (bundled:NAME, or NAME where no file has that name).

--format onnx (the default): the class names and the input contract are stored in the file's metadata. Before --out
is written, ONNX Runtime (CPU) must reproduce PyTorch's probabilities within 1e-4 on 256 faces and on a batch of one.
Needs the export extra: pip install -e ".[export]".

--format bundle: --out is a folder holding model.safetensors, backbone.json, config.yaml, summary.json, MODEL_CARD.md
(the model, its data and that data's terms, its scores, what it is not for) and expected.json (its probabilities on
16 check faces, which every later load must reproduce). It is written beside --out and renamed into place whole.
Its name is --out's folder name (or --name, for a bundle to be moved there): under ferdist/models/ it ships with the
package, and `python jobs/predict.py photo.jpg --model NAME` uses it (ferdist.serve.bundled).

--format backbone: --out is a folder holding the model's ViT-MAE encoder alone (its head left out), as
save_pretrained writes it (config.json, model.safetensors): `--set model.pretrained=FOLDER` fine-tunes it further, or
on other faces. Only an earlier encoder folder is replaced, with --force.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ferdist.config import eval_crop_problem  # noqa: E402
from ferdist.console import job_console, path_arg, print_error  # noqa: E402
from ferdist.errors import FerdistError  # noqa: E402

if TYPE_CHECKING:
    from ferdist.config import RunConfig
    from ferdist.track.registry import LoadedModel


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from ferdist.serve.export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models:/fer-vitmae@champion",
                   help="model URI, checkpoint folder or bundled model name (see above)")  # fmt: skip
    p.add_argument("--format", choices=["onnx", "bundle", "backbone"], default="onnx",
                   help="onnx: one .onnx file; bundle: a folder to ship in ferdist/models/; backbone: the encoder "
                        "alone, for model.pretrained (see above)")  # fmt: skip
    p.add_argument("--out", type=path_arg, required=True,
                   help="the .onnx file, or the bundle's or the encoder's folder, to write")  # fmt: skip
    p.add_argument("--name", default=None, help="--format bundle: the bundle's name (default: --out's folder name)")
    p.add_argument("--evaluate", default=None, metavar="MANIFEST",
                   help="--format bundle: score the written bundle on the test split (FER2013 PrivateTest) of this "
                        "shard set, single model and no TTA, and put the result in its MODEL_CARD.md")  # fmt: skip
    p.add_argument("--eval-crop", type=float, default=None, metavar="FRACTION",
                   help="the exported model's view of a face: its centre, this fraction of the face's side (the "
                        "model's model.eval_crop; default: as the model was trained). Choose it on PublicTest with "
                        "jobs/benchmark.py eval-crop")  # fmt: skip
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help="replace --out if it exists (a folder only if it holds a bundle)")  # fmt: skip
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint of an s3:// --model (default: AWS_ENDPOINT_URL)")
    args = p.parse_args(argv)
    if args.format != "bundle" and (ignored := [f for f in ("name", "evaluate") if getattr(args, f) is not None]):
        p.error(f"--{ignored[0]} is for --format bundle; an {args.format} export has no name or model card to score "
                "into")  # fmt: skip
    if args.format == "backbone" and args.eval_crop is not None:
        p.error("--eval-crop is the view of a classifier; an encoder alone has none (set model.eval_crop when you "
                "fine-tune it)")  # fmt: skip
    for flag in ("name", "evaluate"):
        if getattr(args, flag) is not None and not getattr(args, flag).strip():
            p.error(f"--{flag} is empty; give a value or leave it out")
    if args.eval_crop is not None and (problem := eval_crop_problem(args.eval_crop)):
        p.error(f"--eval-crop {problem}")
    return args


def fetch(args: argparse.Namespace) -> tuple[LoadedModel, str, float]:
    """The model --model names (its view set to --eval-crop, where given), how to name it (the URI, with NAME
    vVERSION for the registry), and the view it was trained and scored with."""
    from ferdist.track.registry import load_model

    loaded = load_model(args.model, endpoint_url=args.endpoint_url)
    trained_crop = loaded.cfg.model.eval_crop
    if args.eval_crop is not None:
        loaded = dataclasses.replace(loaded, cfg=with_eval_crop(loaded.cfg, args.eval_crop))
    ref = loaded.ref
    return loaded, f"{args.model} ({ref.name} v{ref.version})" if ref.version else args.model, trained_crop


def with_eval_crop(cfg: RunConfig, eval_crop: float) -> RunConfig:
    """``cfg`` whose model sees the centre ``eval_crop`` of a face (checked as model.eval_crop is).

    Raises:
        FerdistError: ``eval_crop`` outside [0.5, 1].
    """
    try:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, eval_crop=eval_crop))
    except ValueError as exn:
        raise FerdistError(f"--eval-crop {eval_crop:g}: {exn}") from None


def portable_path(path: str) -> str:
    """``path`` relative to the working directory where it lies under it: a bundle ships to other machines, so its
    config and card do not name this one's folders (``/home/me/ferdist/shards/fer2013`` becomes
    ``shards/fer2013``)."""
    local = Path(path)
    if not local.is_absolute():
        return path
    try:
        return str(local.relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def portable_store(uri: str | None) -> str | None:
    """A local tracking store's URI (``sqlite:////home/me/ferdist/mlflow.db``, ``file:///…/mlruns``) with its path
    made a `portable_path`; a server's URI as it is (the config's YAML hides its password)."""
    if uri and uri.startswith("sqlite:///") and Path(uri[len("sqlite:///") :]).is_absolute():
        return "sqlite:///" + portable_path(uri[len("sqlite:///") :])
    if uri and uri.startswith("file://") and Path(uri[len("file://") :]).is_absolute():
        path = uri[len("file://") :]  # a file store under the checkout becomes its relative folder (MLflow's too)
        return portable_path(path) if portable_path(path) != path else uri
    return uri


def portable(cfg):  # noqa: ANN001, ANN201
    """The run config with its local paths made `portable_path`s (data, pretrained source, teachers, storage, a local
    tracking store)."""
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, manifest=portable_path(cfg.data.manifest)),
        model=dataclasses.replace(cfg.model, pretrained=portable_path(cfg.model.pretrained)),
        distill=dataclasses.replace(cfg.distill, teacher=tuple(portable_path(t) for t in cfg.distill.teacher)),
        checkpoint=dataclasses.replace(cfg.checkpoint, storage_path=portable_path(cfg.checkpoint.storage_path)),
        tracking=dataclasses.replace(cfg.tracking, tracking_uri=portable_store(cfg.tracking.tracking_uri)),
    )  # fmt: skip


def to_onnx(args: argparse.Namespace, console: Console) -> list[str]:
    from ferdist.serve import export

    export.check_destination(args.out, force=args.force)
    export.check_opset(args.opset)
    export.require_packages()
    source, what, _ = fetch(args)
    cfg, size = source.cfg, source.cfg.model.image_size
    crop = cfg.model.eval_crop
    metadata = export.onnx_metadata(image_size=size, model_uri=what, backbone=cfg.model.pretrained, eval_crop=crop)
    console.print(f"exporting {what} ({cfg.model.pretrained} at {size} px) to ONNX opset {args.opset}…")
    result = export.export_checked(source.model, args.out, image_size=size, metadata=metadata, opset=args.opset,
                                   eval_crop=crop)  # fmt: skip
    return [
        f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB, opset {result.opset})",
        f"input '{export.INPUT_NAME}' uint8 [N, 48, 48] → output '{export.OUTPUT_NAME}' float32 [N, 7] "
        f"({', '.join(export.FER_CLASSES)})",
        f"ONNX Runtime (CPU) vs PyTorch on {export.CHECK_FACES} faces and a batch of 1: max |Δp| "
        f"{result.max_abs_diff:.2e} (limit {export.MAX_ABS_DIFF:g})",
        *not_pretrained(cfg),
    ]


def not_pretrained(cfg: RunConfig) -> list[str]:
    if cfg.model.pretrained.startswith("random:"):
        return [f"(backbone {cfg.model.pretrained}: randomly initialised, not pretrained)"]
    return []


def to_bundle(args: argparse.Namespace, console: Console) -> list[str]:
    from ferdist.data.loader import open_dataset
    from ferdist.serve import bundled
    from ferdist.track.model_card import bundle_card

    name = bundled.check_name(args.name or args.out.name)
    if args.out.resolve().parent == bundled.ROOT and name != args.out.name:
        raise FerdistError(f"a bundle in {bundled.ROOT} is named by its folder, not --name {name}; drop --name or "
                           f"write to {bundled.ROOT / name}")  # fmt: skip
    bundled.check_destination(args.out, force=args.force)
    source, what, trained_crop = fetch(args)
    try:  # the card names the data and its terms from the shards' own manifest
        manifest = open_dataset(source.cfg.data.manifest, endpoint_url=source.cfg.data.endpoint_url).manifest
    except FerdistError as exn:
        print_error(console, f"MODEL_CARD.md cannot name the data the model learnt from ({exn})", label="warning")
        manifest = None
    model = source.model
    source, what = dataclasses.replace(source, cfg=portable(source.cfg)), portable_path(what)
    card = bundle_card(name, cfg=source.cfg, summary=source.summary, source=what, manifest=manifest,
                       backbone=model.backbone.config.to_dict(), parameters=sum(p.numel() for p in model.parameters()),
                       trained_crop=trained_crop)  # fmt: skip
    console.print(f"bundling {what} ({source.cfg.model.pretrained} at {source.cfg.model.image_size} px) as "
                  f"{name}…", highlight=False)  # fmt: skip
    test = None
    if args.evaluate:  # opened first: a wrong manifest is refused before anything is written
        test = open_dataset(args.evaluate, endpoint_url=args.endpoint_url)
        test.manifest.split("test")
    out = bundled.write_bundle(model, source.cfg, args.out, summary=source.summary, card=card, force=args.force)
    size = sum(f.stat().st_size for f in out.iterdir())
    scored = [] if test is None else [score_bundle(out, test, args.evaluate)]
    return [*scored,
        f"wrote {out}/ ({size / 1e6:.1f} MB): {', '.join(sorted(f.name for f in out.iterdir()))}",
        f"expected.json: its probabilities on {bundled.CHECK_FACES} check faces, which every load must reproduce",
        f"use it: python jobs/predict.py photo.jpg --model {name}" if out.resolve().parent == bundled.ROOT
        else f"use it: python jobs/predict.py photo.jpg --model {out} (or --model {name} once it is in "
        f"{bundled.ROOT})",
        *not_pretrained(source.cfg),
    ]


def to_backbone(args: argparse.Namespace, console: Console) -> list[str]:
    """The classifier's encoder as save_pretrained writes it, written beside --out and renamed into place whole."""
    import shutil

    from ferdist.serve.bundled import check_destination, put_in_place

    out: Path = args.out
    check_destination(out, force=args.force, holds="encoder", marker="config.json", fmt="backbone")
    source, what, _ = fetch(args)
    backbone = source.model.backbone
    console.print(f"writing the encoder of {what} ({source.cfg.model.pretrained} at {source.cfg.model.image_size} px)…",
                  highlight=False)  # fmt: skip
    partial = out.with_name(f".{out.name}.partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Writing model shards" bar, for one file
        backbone.save_pretrained(partial)
        put_in_place(partial, out)
    except OSError as exn:
        raise FerdistError(f"cannot write {out} ({exn.strerror}); choose another --out") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    parameters = sum(p.numel() for p in backbone.parameters())
    return [f"wrote {out}/ ({', '.join(sorted(f.name for f in out.iterdir()))}): the encoder of {what}, "
            f"{parameters:,} parameters, its head left out",
            f"use it: python jobs/train.py --config CONFIG --set model.pretrained={out}",
            *not_pretrained(source.cfg)]  # fmt: skip


def score_bundle(out: Path, dataset, manifest: str) -> str:  # noqa: ANN001
    """The written bundle (loaded back from its files) on ``dataset``'s test split; the result goes into its card."""
    from ferdist.serve import bundled
    from ferdist.serve.evaluation import evaluate_split
    from ferdist.serve.inference import Predictor
    from ferdist.track.model_card import results_section
    from ferdist.train.checkpoint import load_classifier

    model, cfg = load_classifier(out)
    result = evaluate_split(Predictor.of(model, cfg.model), dataset, "test")
    data = f"{'SYNTHETIC ' if dataset.manifest.source.synthetic else ''}test split of {manifest}"
    heading = f"Results on the {data} (single model, no TTA)"
    card = out / bundled.CARD_FILE
    card.write_text(card.read_text().rstrip() + "\n\n" + results_section(result.confusion, heading=heading) + "\n")
    return f"test accuracy {result.report.accuracy:.4f}, macro-F1 {result.report.macro_f1:.4f} ({data}), in its card"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    console = job_console(stderr=True)
    try:
        args = parse_args(argv)
        lines = {"bundle": to_bundle, "backbone": to_backbone, "onnx": to_onnx}[args.format](args, console)
    except FerdistError as exn:
        print_error(console, exn)
        return 2
    for line in lines:
        console.print(line, highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
