"""``eval-crop`` picks a trained model's view of a face (`ferdist.config.ModelConfig.eval_crop`) on PublicTest and
reports PrivateTest for it.

Training's random crops (``augment.crop_scale``) show the model faces larger than the whole face does, so a centre
crop at test time can match what it learnt (Touvron et al. 2019, "Fixing the train-test resolution discrepancy").
Each candidate view is scored on PublicTest (val), single model, no TTA; the best one (a tie goes to the larger view)
the model's own view and the whole face are then scored on PrivateTest (test): PrivateTest scores nothing else, and
never picks.
``jobs/export.py --eval-crop`` ships the pick.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

CANDIDATES = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85)


def mean_crop_side(crop_scale: float) -> float:
    """The mean side (a fraction of the face's) of training's random crops, whose area is uniform in
    [crop_scale, 1] (aspect ratio aside): E[√a] = ⅔ (1 − s^1.5) / (1 − s)."""
    if crop_scale >= 1.0:
        return 1.0
    return 2.0 / 3.0 * (1.0 - crop_scale**1.5) / (1.0 - crop_scale)


def crop_fraction(text: str) -> float:
    """An argparse type: one view, a fraction of the face's side in [0.5, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give fractions such as 0.95") from None
    from ferdist.config import eval_crop_problem

    if problem := eval_crop_problem(value):
        raise argparse.ArgumentTypeError(problem)
    return value


def pick_view(
    model: Any, model_cfg: Any, dataset: Any, crops: Sequence[float] = CANDIDATES
) -> tuple[float, dict[float, dict[str, Any]]]:
    """The view PublicTest picks for ``model`` among ``crops`` (a tie goes to the larger view), and every candidate's
    PublicTest scores (single model, no TTA). PrivateTest is not looked at."""
    from ferdist.bench.recipe import timed_evaluation
    from ferdist.serve.inference import Predictor

    val = {crop: timed_evaluation(Predictor.of(model, dataclasses.replace(model_cfg, eval_crop=crop)), dataset, "val")
           for crop in crops}  # fmt: skip
    return max(crops, key=lambda crop: (val[crop]["accuracy"], crop)), val


def add_arguments(parser: argparse.ArgumentParser, real_fer2013: Path) -> None:
    from ferdist.console import path_arg

    parser.add_argument("--model", default="fer2013-vitmae-small",
                        help="model URI, checkpoint folder or bundled model name (default: the shipped model)")
    parser.add_argument("--manifest", default="shards/fer2013", help="the sharded FER2013 (default shards/fer2013)")
    parser.add_argument("--source", default=str(real_fer2013), help="FER2013 CSV, sharded when --manifest is absent")
    parser.add_argument("--crops", type=crop_fraction, nargs="+", default=list(CANDIDATES), metavar="FRACTION",
                        help=f"the views to try on PublicTest (default {' '.join(map(str, CANDIDATES))})")
    parser.add_argument("--json", type=path_arg, help="also write the results here")  # fmt: skip


def bench_eval_crop(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from ferdist.bench.recipe import ensure_shards, timed_evaluation
    from ferdist.data.loader import open_dataset
    from ferdist.serve.inference import Predictor
    from ferdist.track.registry import load_model

    results: dict[str, Any] = {"benchmark": "eval-crop", "model": args.model, "manifest": args.manifest}
    results = ensure_shards(args, results, console, required=True)
    dataset = open_dataset(args.manifest)
    loaded = load_model(args.model)
    model, cfg = loaded.model, loaded.cfg
    own = cfg.model.eval_crop
    view = lambda crop: dataclasses.replace(cfg.model, eval_crop=crop)  # noqa: E731
    crops = sorted(set(args.crops), reverse=True)
    picked, val = pick_view(model, cfg.model, dataset, crops)
    test = {crop: timed_evaluation(Predictor.of(model, view(crop)), dataset, "test") for crop in {picked, own, 1.0}}
    results |= {
        "model_eval_crop": own, "picked": picked, "train_mean_crop_side": mean_crop_side(cfg.augment.crop_scale),
        "rows": [{"eval_crop": crop, "val_acc": val[crop]["accuracy"], "val_macro_f1": val[crop]["macro_f1"],
                  "test_acc": test[crop]["accuracy"] if crop in test else None,
                  "test_macro_f1": test[crop]["macro_f1"] if crop in test else None} for crop in crops],
        "own": {"eval_crop": own, "test_acc": test[own]["accuracy"], "test_macro_f1": test[own]["macro_f1"]},
        "best": {"eval_crop": picked, "val_acc": val[picked]["accuracy"], "test_acc": test[picked]["accuracy"],
                 "test_macro_f1": test[picked]["macro_f1"], "test_recall": test[picked]["recall"]},
    }  # fmt: skip
    print_eval_crop(results, console)
    return results


def print_eval_crop(results: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{results['model']}: its view of a face, picked on PublicTest (single model, no TTA)")
    for column in ("centre crop", "PublicTest acc", "PublicTest macro-F1", "PrivateTest acc"):
        table.add_column(column, justify="right")
    for row in results["rows"]:
        marks = [m for m, on in (("picked", row["eval_crop"] == results["picked"]),
                                 ("the model's", row["eval_crop"] == results["model_eval_crop"])) if on]  # fmt: skip
        test = "" if row["test_acc"] is None else f"{row['test_acc']:.4f}"
        table.add_row(f"{row['eval_crop']:g}" + (f" ({', '.join(marks)})" if marks else ""), f"{row['val_acc']:.4f}",
                      f"{row['val_macro_f1']:.4f}", test)  # fmt: skip
    console.print(table)
    console.print(f"training's random crops average {results['train_mean_crop_side']:.3f} of the face's side; "
                  "PrivateTest scored only the pick, the model's own view and the whole face. Ship the pick with: "
                  f"python jobs/export.py --model {results['model']} --eval-crop {results['picked']:g} …",
                  highlight=False)  # fmt: skip
