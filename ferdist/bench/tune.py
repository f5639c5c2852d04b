"""``tune`` runs N trials (a grid over the learning rate, FIFO, one trial at a time, tracking off) under Ray Tune and
the same N runs back to back as plain TorchTrainer runs in the same Ray instance, and compares wall times; then
runs jobs/configs/quickstart-sweep.yaml with ASHA and counts the trials and trial-epochs it stopped and the
worker-hours (GPU-hours on a GPU cluster) that saved.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ferdist.data.sharding import write_shards
from ferdist.data.sources import synthetic_source


def bench_tune(args: argparse.Namespace, console: Console) -> dict:
    import dataclasses

    import numpy as np
    import ray

    from ferdist.launch.trainer import build_trainer
    from ferdist.tune import tuning
    from ferdist.tune.sweep import Dimension, load_sweep

    table = Table(title="sweeps (random weights, SYNTHETIC faces: overhead and savings only)", show_header=True)
    table.add_column("measurement")
    table.add_column("value", justify="right")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shards(synthetic_source(args.synthetic_rows, seed=0), str(root / "shards"), samples_per_shard=64)
        ray.init(configure_logging=False, log_to_driver=False)
        common = [f"data.manifest={root / 'shards'}", f"checkpoint.storage_path={root / 'runs'}",
                  "tracking.backend=none"]  # fmt: skip
        config = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "quickstart-sweep.yaml"
        lrs = tuple(float(v) for v in np.geomspace(5e-4, 3e-3, args.trials))
        fifo = load_sweep(config, [*common, "name=bench-tune", f"loop.epochs={args.epochs}", "sweep.samples=1",
                                   "sweep.scheduler=fifo"])  # fmt: skip
        fifo = dataclasses.replace(fifo, search=(Dimension("optim.lr", "grid", lrs),))
        started = time.perf_counter()
        for i, lr in enumerate(lrs):
            build_trainer(dataclasses.replace(fifo.base, name=f"bench-seq-{i}",
                                              optim=dataclasses.replace(fifo.base.optim, lr=lr))).fit()  # fmt: skip
        back_to_back = time.perf_counter() - started
        started = time.perf_counter()
        tuning.build_tuner(fifo, max_concurrent=1, resume=False).fit()
        under_tune = time.perf_counter() - started
        overhead = under_tune / back_to_back - 1
        results |= {"trials": args.trials, "epochs": args.epochs, "back_to_back_s": back_to_back,
                    "tune_s": under_tune, "tune_overhead": overhead}  # fmt: skip
        table.add_row(f"{args.trials} runs × {args.epochs} epochs back to back (TorchTrainer.fit each)",
                      f"{back_to_back:.1f} s")  # fmt: skip
        table.add_row(f"the same {args.trials} runs as Tune trials (FIFO, one at a time)", f"{under_tune:.1f} s")
        table.add_row("Tune overhead", f"{overhead:+.1%}")

        if not args.asha_samples:
            ray.shutdown()
            console.print(table)
            return results
        asha = load_sweep(config, [*common, "name=bench-asha", f"sweep.samples={args.asha_samples}"])
        concurrent = tuning.concurrent_trials(asha.base, driver_cpus=asha.sweep.driver_cpus,
                                              resources=ray.cluster_resources())  # fmt: skip
        started = time.perf_counter()
        summary = tuning.summarize(tuning.build_tuner(asha, max_concurrent=concurrent, resume=False).fit(), asha)
        asha_wall = time.perf_counter() - started
        ray.shutdown()
    stopped = summary.count("early-stopped")
    results |= {
        "asha_trials": len(summary.trials), "asha_early_stopped": stopped, "asha_wall_s": asha_wall,
        "asha_trial_epochs_run": summary.run_trial_epochs, "asha_trial_epochs_budget": summary.budget_trial_epochs,
        "asha_trial_epochs_saved": summary.saved_trial_epochs, "asha_worker_hours_saved": summary.saved_device_hours,
        "asha_best_val_acc": summary.best.best_score if summary.best else None,
    }  # fmt: skip
    table.add_row(f"ASHA sweep ({asha.sweep.samples} samples × ≤{asha.base.loop.epochs} epochs, grace "
                  f"{asha.sweep.grace_period}, rf {asha.sweep.reduction_factor:g}, {concurrent} at a time)",
                  f"{asha_wall:.1f} s")  # fmt: skip
    table.add_row("trials stopped early", f"{stopped} of {len(summary.trials)}")
    table.add_row("trial-epochs run / budget / saved",
                  f"{summary.run_trial_epochs} / {summary.budget_trial_epochs} / {summary.saved_trial_epochs}")
    table.add_row("worker-hours saved (saved trial-epochs × median s/epoch × workers)",
                  f"{summary.saved_device_hours:.4f}")  # fmt: skip
    console.print(table)
    return results
