"""Evaluate a trained model on a split of a shard set: accuracy, macro-F1, per-class precision/recall/F1, confusion.

    python jobs/evaluate.py --manifest shards/fer2013 --split test                       # the @champion
    python jobs/evaluate.py --model models:/fer-vitmae/3 --manifest s3://bucket/fer2013 --tta --out eval/

--model takes models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a checkpoint folder, an s3://
checkpoint, or the name of a model bundled with ferdist (bundled:NAME or NAME; ferdist/models/). The results are
printed, written to --out (confusion_matrix.png, class_report.md, evaluation.json) and logged to MLflow as a run of
the experiment `ferdist-evaluation` tagged with the model version, whose registry entry gets `<split>_acc` /
`<split>_macro_f1` tags (with `_tta` for --tta flip, `_tta_crops` for --tta crops).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ferdist.console import Once, job_console, path_arg, print_error, whole_number  # noqa: E402
from ferdist.errors import FerdistError  # noqa: E402

EXPERIMENT = "ferdist-evaluation"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models:/fer-vitmae@champion",
                   help="model URI, checkpoint folder or bundled model name (see above)")  # fmt: skip
    p.add_argument("--manifest", required=True, help="shard set (folder, s3:// prefix or manifest.json)")
    p.add_argument("--split", default="test", help="train, val or test (default: test = FER2013 PrivateTest)")
    p.add_argument("--tta", nargs="?", const="flip", default="none", metavar="flip|crops", action=Once,
                   help="test-time augmentation, reported apart: flip (the face and its mirror averaged; a bare "
                        "--tta) or crops (ten views: the four corners and the centre, 42 of 48 pixels square, each "
                        "mirrored)")  # fmt: skip
    p.add_argument("--batch-size", type=whole_number(1), default=256)
    p.add_argument("--out", type=path_arg, default=None, help="folder for the PNG, Markdown and JSON results")
    p.add_argument("--no-track", action="store_true", help="do not log the evaluation to MLflow")
    p.add_argument("--endpoint-url", default=None,
                   help="S3 endpoint of the shards and of an s3:// --model (default: AWS_ENDPOINT_URL)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    console = job_console(stderr=True)
    try:
        args = parse_args(argv)
        from ferdist.data.loader import open_dataset
        from ferdist.serve.evaluation import evaluate_split
        from ferdist.serve.inference import Predictor
        from ferdist.track.registry import load_model

        if args.out is not None:  # said now, not after the split was scored
            from ferdist.files import check_writable

            check_writable(args.out, what="--out", folder=True)
        dataset = open_dataset(args.manifest, endpoint_url=args.endpoint_url)
        dataset.manifest.split(args.split)  # an absent split fails before the model is fetched
        if not args.no_track:  # a store that is down is said now, not after the scoring and minutes of retries
            from ferdist.config import TrackingConfig
            from ferdist.track.store import check_server, tracking_uri

            check_server(tracking_uri(TrackingConfig()), fix="start it, set MLFLOW_TRACKING_URI, or pass --no-track")
        loaded = load_model(args.model, endpoint_url=args.endpoint_url)
        model, cfg, ref = loaded.model, loaded.cfg, loaded.ref
        import torch

        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
        predictor = Predictor.of(model, cfg.model, batch_size=args.batch_size, tta=args.tta)
        result = evaluate_split(predictor, dataset, args.split, batch_size=args.batch_size)
    except FerdistError as exn:
        print_error(console, exn)
        return 2
    what = f"{ref.name} v{ref.version}" if ref.version else args.model
    synthetic = dataset.manifest.source.synthetic
    data = f"{'SYNTHETIC ' if synthetic else ''}{args.split}"  # never let drawn faces pass for FER2013
    print_result(console, result, title=f"{what} on {data}{result.tta_label}")
    if cfg.model.pretrained.startswith("random:"):
        console.print(f"(backbone {cfg.model.pretrained}: randomly initialised, not pretrained)")
    with tempfile.TemporaryDirectory(prefix="ferdist-eval-out-") as tmp:
        out = args.out or Path(tmp)
        files = write_outputs(out, result, title=what, model_uri=args.model, manifest=args.manifest)
        if args.out:
            console.print(f"wrote {', '.join(str(f) for f in files)}")
        if not args.no_track:
            from mlflow.exceptions import MlflowException

            try:
                run_id = track(result, ref, files, manifest=args.manifest, dataset=dataset, synthetic=synthetic)
            except (FerdistError, MlflowException) as exn:  # e.g. a login that may read the model but not log runs
                first = str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__
                print_error(console, f"the evaluation above was not logged to MLflow ({first}); pass --no-track to "
                                     "skip logging")  # fmt: skip
                return 2
            console.print(f"logged to MLflow experiment '{EXPERIMENT}', run {run_id}")
    return 0


def print_result(console: Console, result, *, title: str) -> None:  # noqa: ANN001
    from ferdist.constants import FER_CLASSES

    r = result.report
    table = Table(title=title)
    for column in ("class", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for i, name in enumerate(FER_CLASSES):
        table.add_row(name, f"{r.precision[i]:.4f}", f"{r.recall[i]:.4f}", f"{r.f1[i]:.4f}", str(r.support[i]))
    console.print(table)
    console.print(f"accuracy {r.accuracy:.4f} · macro-F1 {r.macro_f1:.4f} · {sum(r.support)} faces", highlight=False)
    matrix = Table(title="confusion (rows: true, columns: predicted)")
    matrix.add_column("")
    for name in FER_CLASSES:
        matrix.add_column(name[:3], justify="right")
    for name, row in zip(FER_CLASSES, result.confusion, strict=True):
        matrix.add_row(name, *[str(v) for v in row])
    console.print(matrix)


def write_outputs(out: Path, result, *, title: str, model_uri: str, manifest: str) -> list[Path]:  # noqa: ANN001
    from ferdist.track.reports import REPORT_MD, class_report_markdown, plot_confusion

    out.mkdir(parents=True, exist_ok=True)
    label = f"{title}: {result.split}{result.tta_label}"
    (out / REPORT_MD).write_text(class_report_markdown(result.confusion, title=label))
    plot_confusion(result.confusion, out / "confusion_matrix.png", title=label)
    r = result.report
    summary = {"model": model_uri, "manifest": manifest, "split": result.split, "tta": result.tta,
               "tta_mode": result.tta_mode,
               "accuracy": r.accuracy, "macro_f1": r.macro_f1, "precision": r.precision, "recall": r.recall,
               "f1": r.f1, "support": r.support, "confusion": result.confusion.tolist()}  # fmt: skip
    (out / "evaluation.json").write_text(json.dumps(summary, indent=1) + "\n")
    return [out / REPORT_MD, out / "confusion_matrix.png", out / "evaluation.json"]


def track(result, ref, files: list[Path], *, manifest: str, dataset, synthetic: bool = False) -> str:  # noqa: ANN001
    """One MLflow run per evaluation, tagged with the model version, with the shards it read as its dataset input;
    the version gets the headline numbers."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from ferdist.config import TrackingConfig
    from ferdist.constants import FER_CLASSES
    from ferdist.data.loader import dataset_record
    from ferdist.track.tracking import dataset_input, tracking_uri

    client = MlflowClient(tracking_uri(TrackingConfig()))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    suffix = result.tta_suffix
    name = f"{ref.name} v{ref.version}" if ref.version else ref.uri
    tags = {"model_uri": ref.uri, **({"model_name": ref.name, "model_version": ref.version} if ref.version else {}),
            **({"source_run_id": ref.run_id} if ref.run_id else {})}  # fmt: skip
    run = client.create_run(experiment_id, run_name=f"{name} on {result.split}{suffix}", tags=tags)
    split, r = result.split, result.report
    metrics = {f"{split}/acc{suffix}": r.accuracy, f"{split}/macro_f1{suffix}": r.macro_f1}
    for i, cls in enumerate(FER_CLASSES):
        metrics[f"{split}/recall{suffix}/{cls.lower()}"] = r.recall[i]
        metrics[f"{split}/f1{suffix}/{cls.lower()}"] = r.f1[i]
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                     params=[Param("manifest", manifest), Param("split", split), Param("tta", str(result.tta)),
                             Param("tta_mode", result.tta_mode)],
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])  # fmt: skip
    client.log_inputs(run.info.run_id, datasets=[dataset_input(dataset_record(dataset), context="evaluation")])
    for f in files:
        client.log_artifact(run.info.run_id, str(f))
    client.set_terminated(run.info.run_id)
    if ref.version:
        prefix = "synthetic_" if synthetic else ""
        client.set_model_version_tag(ref.name, ref.version, f"{prefix}{split}_acc{suffix}", f"{r.accuracy:.6f}")
        client.set_model_version_tag(ref.name, ref.version, f"{prefix}{split}_macro_f1{suffix}", f"{r.macro_f1:.6f}")
        update_card(client, ref, result, synthetic=synthetic)
    return run.info.run_id


def update_card(client, ref, result, *, synthetic: bool = False) -> None:  # noqa: ANN001
    """Adds (or replaces) this split's results section in the version's model card."""
    from ferdist.track.model_card import results_section

    data = f"{'SYNTHETIC ' if synthetic else ''}{result.split}"
    heading = f"Results on {data}{result.tta_label}"
    card = client.get_model_version(ref.name, ref.version).description or ""
    if f"## {heading}\n" in card:  # re-evaluated: replace the old section
        before, _, after = card.partition(f"## {heading}\n")
        rest = after.split("\n## ", 1)
        card = before + ("## " + rest[1] if len(rest) > 1 else "")
    section = results_section(result.confusion, heading=heading)
    client.update_model_version(ref.name, ref.version, description=card.rstrip() + "\n\n" + section)


if __name__ == "__main__":
    sys.exit(main())
