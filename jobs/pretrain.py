"""MAE-pretrain the ViT-MAE backbone on the train split's faces with Ray Train (data-parallel DDP), then write it as a
save_pretrained folder that fine-tuning loads with --set model.pretrained=THAT_FOLDER.

Locally:        python jobs/pretrain.py --config jobs/configs/pretrain-quickstart.yaml
On a cluster:   ray job submit --working-dir . -- python jobs/pretrain.py \
                    --config jobs/configs/pretrain-fer2013-gpu.yaml --output s3://BUCKET/backbones/fer2013-mae
Overrides:      --set loop.epochs=100 --set model.mask_ratio=0.6   --workers 2   --gpus-per-worker 1   --cpu

Re-running with the same name (and storage path) resumes the run from its latest checkpoint and rewrites its own
output; an --output that holds anything else is refused. --publish-latest writes the output from the newest checkpoint
of a run (stopped or still running elsewhere) without training, e.g. to fine-tune on a long pretraining so far.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from rich.syntax import Syntax
from rich.text import Text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ferdist.config import PretrainConfig, load_config, to_yaml, worker_overrides  # noqa: E402
from ferdist.console import bold, job_console, nonempty, path_arg, print_error, setup_logging  # noqa: E402
from ferdist.errors import FerdistError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=path_arg, default=None, help="YAML pretraining config (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config value")
    p.add_argument("--output", type=nonempty, default=None, metavar="DIR_OR_S3",
                   help="where the pretrained model goes (default: pretrained/<name>)")  # fmt: skip
    p.add_argument("--publish-latest", action="store_true",
                   help="write --output from the run's newest checkpoint and stop, without training: a long "
                        "pretraining's backbone so far (the same command without it resumes the training)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (workers.num_workers)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (turns workers.use_gpu on)")
    p.add_argument("--cpu", action="store_true", help="train on CPUs only (workers.use_gpu=false)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    console = job_console(stderr=True)
    setup_logging()
    try:
        args = parse_args(argv)
        overrides = [*args.set, *worker_overrides(args.workers, args.gpus_per_worker, args.cpu)]
        cfg = load_config(args.config, overrides, root=PretrainConfig)
        console.print(Syntax(to_yaml(cfg), "yaml", theme="ansi_dark", background_color="default"))
        from ferdist.launch import cluster, preflight
        from ferdist.launch import trainer as launch
        from ferdist.train import backbone_output
        from ferdist.train.runs import SUMMARY_FILE

        cluster.check(cluster.address())  # before any check that takes time or opens a run
        output = args.output or str(Path("pretrained") / cfg.name)
        cfg = preflight.with_absolute_paths(cfg)
        mine = backbone_output.owner(cfg.name, cfg.checkpoint.storage_path)
        # First: an hour of pretraining must not end on "that folder holds something else".
        backbone_output.check_output(output, mine=mine, endpoint_url=cfg.checkpoint_endpoint)
        if args.publish_latest:
            run_path = f"{cfg.checkpoint.storage_path.rstrip('/')}/{cfg.name}"
            written, epoch = backbone_output.publish_latest(run_path, output, mine=mine,
                                                            endpoint_url=cfg.checkpoint_endpoint)  # fmt: skip
            console.print(f"{cfg.name}: wrote the backbone after epoch {epoch} of {cfg.loop.epochs} to {written}; "
                          "the same command without --publish-latest resumes the pretraining", highlight=False)
            return 0
        cfg, steps = preflight.prepare(cfg)
        console.print(f"{cfg.name}: {steps} steps/epoch × {cfg.loop.epochs} epochs on {cfg.workers.num_workers} "
                      f"{'GPU' if cfg.workers.use_gpu else 'CPU'} worker(s), masking {cfg.model.mask_ratio:.0%} of "
                      f"each face from {cfg.model.pretrained}")  # fmt: skip
        cluster.join(cluster.address())
        result = launch.fit(launch.build_trainer(cfg))
        if result.error is not None:
            raise result.error
        if result.checkpoint is None:
            raise FerdistError(f"run {cfg.name} finished without a checkpoint in {result.path}; re-submit it")
        with result.checkpoint.as_directory() as folder:  # [ray] the last epoch's state, from storage_path
            written = backbone_output.publish(Path(folder), output, mine=mine, endpoint_url=cfg.checkpoint_endpoint)
            history = json.loads((Path(folder) / SUMMARY_FILE).read_text())["history"]
        from ferdist.track import tracking

        tracking.record_finished(cfg.tracking, cfg.name, history, kept=result.path)
        tracking.tag_run(cfg.tracking, cfg.name, {"ferdist.output": written})
    except FerdistError as exn:
        print_error(console, exn)
        return 2
    last = result.metrics or {}
    console.print(Text.assemble("\n", bold(cfg.name), f": {last.get('epoch', cfg.loop.epochs)} epochs, reconstruction "
                                f"loss {last.get('train/loss', float('nan')):.4f}"), highlight=False)  # fmt: skip
    command = shlex.join(["python", "jobs/train.py", "--config", "CONFIG", "--set", f"model.pretrained={written}",
                          "--set", f"model.image_size={cfg.model.image_size}"])  # fmt: skip
    console.print(f"fine-tune from it: {command}", highlight=False)
    print(written)  # the last stdout line: scripts capture the path with `| tail -1`
    return 0


if __name__ == "__main__":
    sys.exit(main())
