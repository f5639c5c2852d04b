"""``pretrain`` measures what MAE pretraining on FER2013's own train faces buys, on the real FER2013 (sharded to
shards/fer2013 first if needed; skipped with a message where absent), with the jobs a user runs:

1. ``jobs/pretrain.py`` with the pretraining config (wall time = ``pretrain_s``);
2. ``jobs/train.py`` fine-tuning that backbone (``mae``), and the same fine-tune from random weights for the same
   epochs (``scratch``) and for the same total wall time, pretraining included (``scratch_equal_time``).

Each fine-tune keeps every epoch's checkpoint; PublicTest (val) picks the epoch, PrivateTest (test) only reports it:
accuracy, macro-F1 and per-class recall, plus training images/s and wall time. PrivateTest never picks anything,
and pretraining never reads val or test.

The whole comparison takes hours on a CPU, so with ``--json`` the results file is written after every stage, and
``--resume`` (with the same ``--json``) runs only the stages it does not hold yet, with the same run names and
settings. A stage that was interrupted starts over (its run folder is removed first), so every wall time in the file
is one uninterrupted run.
"""

from __future__ import annotations

import argparse
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

from ferdist.bench import results as bench_results
from ferdist.bench.recipe import ensure_shards, timed_evaluation
from ferdist.console import path_arg
from ferdist.data.loader import open_dataset

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN_CONFIG = ROOT / "jobs" / "configs" / "pretrain-fer2013-cpu.yaml"
FINETUNE_CONFIG = ROOT / "jobs" / "configs" / "fer2013-mae-cpu.yaml"


def run_job(command: list[str], console: Console) -> float:
    """Runs a job as a user does (its own process); returns its wall seconds."""
    console.print(f"running: {' '.join(command[1:])}", highlight=False)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def score_run(run_path: Path, manifest: Path) -> dict:
    """The PublicTest-chosen epoch of a fine-tuning run, scored on PrivateTest; the run's curves and speed."""
    import torch

    from ferdist.serve.inference import Predictor
    from ferdist.train.checkpoint import load_classifier
    from ferdist.train.runs import checkpoints, download

    stored = checkpoints(str(run_path))
    history = stored[-1].summary["history"]
    best = max(stored, key=lambda c: (c.summary["metrics"]["val/acc"], -c.summary["epoch"]))
    dataset = open_dataset(str(manifest))
    with tempfile.TemporaryDirectory(prefix="ferdist-bench-pretrain-") as tmp:
        model, cfg = load_classifier(download(best, Path(tmp) / "best"))
    predictor = Predictor.of(model.to(torch.device("cpu")), cfg.model)
    test = timed_evaluation(predictor, dataset, "test")
    rates = [h["perf/samples_per_s"] for h in history if "perf/samples_per_s" in h]
    cycles = [h["perf/cycle_s"] for h in history if "perf/cycle_s" in h]
    return {
        "epochs": len(history), "best_epoch": int(best.summary["epoch"]),
        "val_acc": best.summary["metrics"]["val/acc"], "test_acc": test["accuracy"], "test_macro_f1": test["macro_f1"],
        "test_recall": test["recall"], "train_img_s": statistics.median(rates) if rates else None,
        "median_cycle_s": statistics.median(cycles) if cycles else None,
        "curve": [{"epoch": h["epoch"], "train_loss": h["train/loss"], "val_acc": h.get("val/acc")} for h in history],
    }  # fmt: skip


def settings_of(args: argparse.Namespace) -> dict:
    """What a resumed benchmark must share with the one it continues."""
    return {"manifest": str(Path(args.manifest).resolve()), "pretrain_config": str(args.pretrain_config),
            "finetune_config": str(args.finetune_config), "pretrain_epochs": args.pretrain_epochs,
            "finetune_epochs": args.finetune_epochs, "scratch_init": args.scratch_init, "set": list(args.set),
            "pretrain_set": list(args.pretrain_set), "finetune_set": list(args.finetune_set),
            "storage": str(Path(args.storage).resolve())}  # fmt: skip


def resumed_results(args: argparse.Namespace) -> dict:
    """With --resume, the stages the --json file already holds (checked to be this benchmark's), else nothing."""
    return bench_results.resumed(args.json, benchmark="pretrain", settings=settings_of(args)) if args.resume else {}


def bench_pretrain(args: argparse.Namespace, console: Console) -> dict:
    manifest = Path(args.manifest)
    saved = resumed_results(args)
    results: dict = {"benchmark": "pretrain", "manifest": str(manifest), "device": f"CPU, {os.cpu_count()} cores"}
    if "skipped" in (results := ensure_shards(args, results, console)):
        return results
    stamp = saved.get("name") or args.name or time.strftime("%Y%m%d-%H%M%S")
    results |= {"name": stamp, "settings": settings_of(args), "complete": False}
    storage = Path(args.storage).resolve()
    output = storage / f"pretrained-{stamp}"
    common = [f"data.manifest={manifest.resolve()}", f"checkpoint.storage_path={storage}", *args.set]
    sets = lambda overrides: [part for o in overrides for part in ("--set", o)]  # noqa: E731

    def save() -> None:
        if args.json:
            bench_results.write(args.json, results)

    def fresh(*folders: Path) -> None:
        """An interrupted stage starts over: its timing must be one uninterrupted run."""
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)

    # 1. Pretraining, as a user runs it.
    if "pretrain" in saved:
        results |= {k: saved[k] for k in ("pretrain_s", "pretrain_command", "pretrain")}
        console.print(f"pretraining: kept from {args.json} ({saved['pretrain']['output']})", highlight=False)
    else:
        pretrain_sets = [*common, f"name=pretrain-{stamp}", *args.pretrain_set]
        if args.pretrain_epochs:
            pretrain_sets.append(f"loop.epochs={args.pretrain_epochs}")
        command = [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--config", str(args.pretrain_config),
                   *sets(pretrain_sets), "--output", str(output)]  # fmt: skip
        fresh(storage / f"pretrain-{stamp}", output)
        results["pretrain_s"] = run_job(command, console)
        results["pretrain_command"] = " ".join(command[1:])
        from ferdist.train.runs import checkpoints

        pretrain_history = checkpoints(str(storage / f"pretrain-{stamp}"))[-1].summary["history"]
        results["pretrain"] = {
            "epochs": len(pretrain_history),
            "img_s": statistics.median(h["perf/samples_per_s"] for h in pretrain_history),
            "loss": [round(h["train/loss"], 5) for h in pretrain_history],
            "output": str(output),
        }
        save()

    # 2. Fine-tunes: from the pretrained backbone, and from random weights (same epochs; same total time).
    finetune_sets = [*common, "checkpoint.every_epochs=1", *args.finetune_set]
    if args.finetune_epochs:
        finetune_sets.append(f"loop.epochs={args.finetune_epochs}")
    from ferdist.config import load_config

    epochs = load_config(args.finetune_config, finetune_sets).loop.epochs

    def finetune(key: str, label: str, pretrained: str, run_epochs: int) -> None:
        if key in saved:
            results[key] = saved[key]
            console.print(f"{label}: kept from {args.json}", highlight=False)
            return
        name = f"{label}-{stamp}"
        overrides = [*finetune_sets, f"name={name}", f"model.pretrained={pretrained}", f"loop.epochs={run_epochs}",
                     f"checkpoint.keep_resume={run_epochs}", "tracking.registered_model=fer-vitmae-bench-pretrain"]
        command = [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(args.finetune_config),
                   *sets(overrides)]  # fmt: skip
        fresh(storage / name)
        wall = run_job(command, console)
        results[key] = score_run(storage / name, manifest) | {"wall_s": wall, "command": " ".join(command[1:])}
        save()

    finetune("mae", "mae", str(bench_results.local_path(results["pretrain"]["output"])), epochs)
    finetune("scratch", "scratch", args.scratch_init, epochs)
    results["finetune_s"] = results["mae"]["wall_s"]
    results["gain_points"] = 100 * (results["mae"]["test_acc"] - results["scratch"]["test_acc"])
    save()
    # Equal total time: pretraining's wall time buys the scratch run that many more of its epochs (an epoch being
    # its median train + evaluate + checkpoint cycle; start-up is paid once either way).
    per_epoch = results["scratch"]["median_cycle_s"] or results["scratch"]["wall_s"] / epochs
    equal_epochs = epochs + max(1, round(results["pretrain_s"] / per_epoch))
    if args.equal_time:
        finetune("scratch_equal_time", "scratch-equal-time", args.scratch_init, equal_epochs)
    results["complete"] = args.equal_time
    save()
    print_pretrain(results, console)
    return results


def print_pretrain(results: dict, console: Console) -> None:
    table = Table(title=f"MAE pretraining on FER2013 train faces vs from scratch; {results['device']}")
    for column in ("fine-tune from", "epochs", "best epoch (PublicTest)", "PublicTest acc", "PrivateTest acc",
                   "macro-F1", "train img/s", "wall"):  # fmt: skip
        table.add_column(column, justify="left" if column == "fine-tune from" else "right")
    pre = results["pretrain"]
    rows = [("MAE-pretrained", "mae"), ("random (same epochs)", "scratch"),
            ("random (same total time)", "scratch_equal_time")]  # fmt: skip
    for label, key in rows:
        if key not in results:
            continue
        r = results[key]
        wall = r["wall_s"] + (results["pretrain_s"] if key == "mae" else 0)
        table.add_row(label, str(r["epochs"]), str(r["best_epoch"]), f"{r['val_acc']:.2%}", f"{r['test_acc']:.2%}",
                      f"{r['test_macro_f1']:.3f}", f"{r['train_img_s']:,.0f}", f"{wall / 60:.1f} min")  # fmt: skip
    console.print(table)
    console.print(f"pretraining: {pre['epochs']} epochs in {results['pretrain_s'] / 60:.1f} min at {pre['img_s']:,.0f} "
                  f"img/s, loss {pre['loss'][0]:.4f} → {pre['loss'][-1]:.4f}; gain at equal fine-tuning epochs: "
                  f"{results['gain_points']:+.2f} points PrivateTest")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser, real_fer2013: Path) -> None:
    parser.add_argument("--source", default=str(real_fer2013), help="FER2013 CSV, sharded when --manifest is absent")
    parser.add_argument("--manifest", default="shards/fer2013", help="the sharded FER2013 (default shards/fer2013)")
    parser.add_argument("--pretrain-config", type=path_arg, default=PRETRAIN_CONFIG)
    parser.add_argument("--finetune-config", type=path_arg, default=FINETUNE_CONFIG)
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="default: the pretraining config's")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="default: the fine-tuning config's")
    parser.add_argument("--scratch-init", default="random:small", help="the from-scratch backbone (random:small)")
    parser.add_argument("--no-equal-time", dest="equal_time", action="store_false",
                        help="skip the from-scratch run as long as pretraining + fine-tuning")  # fmt: skip
    parser.add_argument("--name", default=None, help="suffix of the run names (default: the time)")
    parser.add_argument("--storage", default="runs/benchmark", help="runs and the pretrained folder go here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override in every job")
    parser.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=path_arg, help="also write the results here (after every stage)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the --json file of an interrupted run: only its missing stages run")  # fmt: skip
