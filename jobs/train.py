"""Fine-tune ViT-MAE on sharded FER2013 with Ray Train (data-parallel DDP, a checkpoint every epoch).

On a cluster:   ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/fer2013-vitmae-base.yaml
Locally:        python jobs/train.py --config jobs/configs/quickstart.yaml      (starts Ray in this process)
Overrides:      --set optim.lr=1e-4 --set loop.epochs=20   --workers 2   --gpus-per-worker 1   --cpu

Re-running with the same name (and storage path) resumes the run from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.syntax import Syntax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ferdist.config import RunConfig, load_config, to_yaml  # noqa: E402
from ferdist.errors import FerdistError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="YAML run config (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config value")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (workers.num_workers)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (turns workers.use_gpu on)")
    p.add_argument("--cpu", action="store_true", help="train on CPUs only (workers.use_gpu=false)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.set)
    if args.workers is not None:
        overrides.append(f"workers.num_workers={args.workers}")
    if args.gpus_per_worker is not None:
        overrides += ["workers.use_gpu=true", f"workers.gpus_per_worker={args.gpus_per_worker}"]
    if args.cpu:
        overrides.append("workers.use_gpu=false")
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    console = Console(stderr=True, soft_wrap=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = config_from_args(parse_args(argv))
        console.print(Syntax(to_yaml(cfg), "yaml", theme="ansi_dark", background_color="default"))
        from ferdist import launch

        cfg = launch.with_absolute_paths(cfg)
        steps = launch.preflight(cfg)
        console.print(f"{cfg.name}: {steps} steps/epoch × {cfg.loop.epochs} epochs on {cfg.workers.num_workers} "
                      f"{'GPU' if cfg.workers.use_gpu else 'CPU'} worker(s)")  # fmt: skip
        import ray

        # Inside `ray job submit` (or with RAY_ADDRESS) this joins that cluster; otherwise Ray starts here.
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, configure_logging=False)
        summary = launch.summarize(launch.build_trainer(cfg).fit())
    except FerdistError as exn:
        console.print(f"[bold red]error:[/] {exn}", highlight=False)
        return 2
    last = summary.last_metrics
    console.print(
        f"\n[bold]{cfg.name}[/]: {summary.last_epoch} epochs; best epoch {summary.best_epoch} with val accuracy "
        f"{summary.best_val_acc:.4f} (last: val acc {last['val/acc']:.4f}, macro-F1 {last['val/macro_f1']:.4f})",
        highlight=False,
    )
    if cfg.model.pretrained.startswith("random:"):
        console.print(f"(backbone {cfg.model.pretrained}: randomly initialised, not pretrained)")
    console.print(f"best checkpoint: {summary.best_checkpoint}\nrun folder:      {summary.run_path}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
