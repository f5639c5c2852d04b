"""Sweep hyperparameters with Ray Tune: each trial a Ray Train run, ASHA stopping laggards, MLflow tracking them all.

On a cluster:  ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/fer2013-sweep.yaml
Locally:       python jobs/tune.py --config jobs/configs/quickstart-sweep.yaml --samples 4
Crashed?       python jobs/tune.py --config … --resume        (finished trials are kept, unfinished ones resume)

The search space is the config's `search:` section, the scheduler its `sweep:` section. The sweep is one MLflow
experiment (named like the sweep) with a parent run and a child run per trial; the best trial's best checkpoint is
registered as `fer-vitmae` and becomes `@champion` if it beats the current champion's val accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ferdist.config import worker_overrides  # noqa: E402
from ferdist.console import job_console, path_arg, print_error, setup_logging  # noqa: E402
from ferdist.errors import FerdistError  # noqa: E402
from ferdist.tune.sweep import Sweep, load_sweep  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=path_arg, default=None, help="YAML sweep config: a run config + sweep: + search:")
    p.add_argument("--samples", type=int, default=None, help="trials to draw (sweep.samples)")
    p.add_argument("--name", default=None, help="sweep name: its MLflow experiment and storage folder (name)")
    p.add_argument("--resume", action="store_true", help="continue the crashed or stopped sweep of this name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run setting (optim.lr=…) or a sweep setting (sweep.grace_period=…)")  # fmt: skip
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers per trial (workers.num_workers)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (turns workers.use_gpu on)")
    p.add_argument("--cpu", action="store_true", help="train on CPUs only (workers.use_gpu=false)")
    return p.parse_args(argv)


def sweep_from_args(args: argparse.Namespace) -> Sweep:
    overrides = list(args.set)
    if args.samples is not None:
        overrides.append(f"sweep.samples={args.samples}")
    if args.name is not None:
        overrides.append(f"name={args.name}")
    overrides += worker_overrides(args.workers, args.gpus_per_worker, args.cpu)
    sweep = load_sweep(args.config, overrides)
    # One MLflow experiment per sweep, named like it.
    base = sweep.base
    return dataclasses.replace(
        sweep, base=dataclasses.replace(base, tracking=dataclasses.replace(base.tracking, experiment=base.name))
    )


def main(argv: list[str] | None = None) -> int:
    # MLflow draws a progress bar for every artefact download while it validates the logged model.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    console = job_console(stderr=True)
    setup_logging()
    try:
        args = parse_args(argv)
        sweep = sweep_from_args(args)
        from ferdist.launch import cluster, preflight
        from ferdist.track import tracking
        from ferdist.tune import tuning

        cluster.check(cluster.address())  # before any check that takes time or opens a run
        base = preflight.with_absolute_paths(sweep.base)
        steps = preflight.preflight(base)
        sweep = dataclasses.replace(sweep, search=tuning.check_searched_sources(base, sweep.search))
        path, filesystem = tuning.experiment_path(base)
        import ray.tune

        exists = ray.tune.Tuner.can_restore(path, storage_filesystem=filesystem)
        if exists and not args.resume:
            raise FerdistError(f"a sweep named '{base.name}' already exists at {path}; pass --resume to continue it, "
                               "or --name NEW for a new sweep")  # fmt: skip
        if args.resume and not exists:
            raise FerdistError(f"there is no sweep named '{base.name}' to resume at {path}; drop --resume to start it")
        base = preflight.with_tracking(base, sweep=True)  # only now: a refused sweep leaves no experiment behind
        parent = None
        if base.tracking.backend == "mlflow":
            parent = tracking.open_sweep_run(base.tracking, sweep_name=base.name, params=tuning.sweep_params(sweep))
            base = dataclasses.replace(base, tracking=dataclasses.replace(base.tracking, parent_run_id=parent))
        sweep = dataclasses.replace(sweep, base=base)
        for dim in sweep.search:
            console.print(f"  search {dim.key}: {dim.describe()}", highlight=False)

        import ray

        cluster.join(cluster.address())
        concurrent = sweep.sweep.max_concurrent_trials or tuning.concurrent_trials(
            base, driver_cpus=sweep.sweep.driver_cpus, resources=ray.cluster_resources()
        )
        console.print(f"{base.name}: {sweep.sweep.samples} sample(s), {steps} steps/epoch × up to {base.loop.epochs} "
                      f"epochs per trial, {concurrent} trial(s) at a time, scheduler {sweep.sweep.scheduler}",
                      highlight=False)  # fmt: skip
        results = tuning.build_tuner(sweep, max_concurrent=concurrent, resume=args.resume).fit()
        summary = tuning.summarize(results, sweep)
        print_summary(console, summary, sweep)
        if parent is not None:
            registration = tuning.publish_best(sweep, summary, parent_run_id=parent)
            if registration is not None:
                console.print(registration.describe(), highlight=False)
    except FerdistError as exn:
        print_error(console, exn)
        return 2
    if summary.best is None:
        print_error(console, "no trial finished an epoch; see the errors above")
        return 1
    return 0


def print_summary(console: Console, summary, sweep: Sweep) -> None:  # noqa: ANN001
    table = Table(title=f"sweep {sweep.base.name}")
    score = f"best {sweep.base.checkpoint.select_by}"
    for column in ("trial", "status", "epochs", score, "s", *[d.key for d in sweep.search]):
        table.add_column(column)
    for t in summary.trials:
        table.add_row(t.trial_id, t.status, str(t.epochs), f"{t.best_score:.4f}", f"{t.seconds:.0f}",
                      *[f"{v:.4g}" if isinstance(v, float) else str(v) for v in t.config.values()])  # fmt: skip
    console.print(table)
    unit = "GPU" if sweep.base.workers.use_gpu else "worker"
    console.print(
        f"{len(summary.trials)} trials: {summary.count('completed')} completed, {summary.count('early-stopped')} "
        f"stopped early, {summary.count('failed')} failed; {summary.run_trial_epochs} of "
        f"{summary.budget_trial_epochs} trial-epochs run, {summary.saved_trial_epochs} saved "
        f"(≈ {summary.saved_device_hours:.3f} {unit}-hours)", highlight=False,
    )  # fmt: skip
    if sweep.base.model.pretrained.startswith("random:"):
        console.print(f"(backbone {sweep.base.model.pretrained}: randomly initialised, not pretrained)")


if __name__ == "__main__":
    sys.exit(main())
