"""Fine-tune ViT-MAE on sharded FER2013 with Ray Train (data-parallel DDP, a checkpoint every epoch).

On a cluster:   ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/fer2013-vitmae-base.yaml
Locally:        python jobs/train.py --config jobs/configs/quickstart.yaml      (starts Ray in this process)
Overrides:      --set optim.lr=1e-4 --set loop.epochs=20   --workers 2   --gpus-per-worker 1   --cpu

Re-running with the same name (and storage path) resumes the run from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.syntax import Syntax
from rich.text import Text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ferdist.config import RunConfig, load_config, to_yaml, worker_overrides  # noqa: E402
from ferdist.console import bold, job_console, path_arg, print_error, setup_logging  # noqa: E402
from ferdist.errors import FerdistError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=path_arg, default=None, help="YAML run config (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config value")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (workers.num_workers)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (turns workers.use_gpu on)")
    p.add_argument("--cpu", action="store_true", help="train on CPUs only (workers.use_gpu=false)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    overrides = [*args.set, *worker_overrides(args.workers, args.gpus_per_worker, args.cpu)]
    return load_config(args.config, overrides)


SCORE_NAMES = {"val/acc": "val accuracy", "val/macro_f1": "val macro-F1"}


def main(argv: list[str] | None = None) -> int:
    # MLflow draws a progress bar for every artefact download while it validates the logged model.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    console = job_console(stderr=True)
    setup_logging()
    try:
        cfg = config_from_args(parse_args(argv))
        console.print(Syntax(to_yaml(cfg), "yaml", theme="ansi_dark", background_color="default"))
        from ferdist.launch import cluster, preflight
        from ferdist.launch import trainer as launch

        cluster.check(cluster.address())  # before any check that takes time or opens a run
        cfg, steps = preflight.prepare(cfg)
        console.print(f"{cfg.name}: {steps} steps/epoch × {cfg.loop.epochs} epochs on {cfg.workers.num_workers} "
                      f"{'GPU' if cfg.workers.use_gpu else 'CPU'} worker(s)")  # fmt: skip
        # Inside `ray job submit` (or with RAY_ADDRESS) this joins that cluster; otherwise Ray starts here.
        cluster.join(cluster.address())
        result = launch.fit(launch.build_trainer(cfg))
        summary = launch.summarize(result, select_by=cfg.checkpoint.select_by)
        registration = track_result(cfg, result)
    except FerdistError as exn:
        print_error(console, exn)
        return 2
    last = summary.last_metrics
    console.print(Text.assemble(
        "\n", bold(cfg.name), f": {summary.last_epoch} epochs; best epoch {summary.best_epoch} with "
        f"{SCORE_NAMES[cfg.checkpoint.select_by]} {summary.best_metrics[cfg.checkpoint.select_by]:.4f} "
        f"(last: val acc {last['val/acc']:.4f}, macro-F1 {last['val/macro_f1']:.4f})",
    ), highlight=False)  # fmt: skip
    if cfg.model.pretrained.startswith("random:"):
        console.print(f"(backbone {cfg.model.pretrained}: randomly initialised, not pretrained)")
    console.print(f"best checkpoint: {summary.best_checkpoint}\nrun folder:      {summary.run_path}", highlight=False)
    if registration is not None:
        console.print(registration.describe(), highlight=False)
    return 0


def track_result(cfg: RunConfig, result):  # noqa: ANN001, ANN201
    """Reports, config and status to the run's MLflow run, then its best checkpoint as a registered model."""
    from ferdist.track import tracking

    run_id, best = tracking.finalize_run(cfg.tracking, run_name=cfg.name, run_path=result.path,
                                         filesystem=result.filesystem, status=tracking.COMPLETED,
                                         config_yaml=to_yaml(cfg), select_by=cfg.checkpoint.select_by)  # fmt: skip
    if run_id is None or best is None:
        return None
    return tracking.publish_model(cfg, run_id=run_id, best=best, tags={"manifest": cfg.data.manifest})


if __name__ == "__main__":
    sys.exit(main())
