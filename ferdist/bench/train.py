"""``train`` measures training images/s of the real step (on-device augmentation, forward, backward, clip, AdamW,
schedule) on random uint8 batches, with the frozen prefix and with everything trainable, and Ray Train's overhead:
the same loop on the same shards run without Ray (in its own process) and as a 1-worker TorchTrainer, compared by
the median epoch cycle (train + evaluate + checkpoint + report) each run records; start-up is reported apart.
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

from ferdist.data.sharding import write_shards
from ferdist.data.sources import synthetic_source

# Peak dense bf16 tensor throughput, for model FLOP utilisation (NVIDIA datasheets, SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def forward_flops(backbone_config, *, image_size: int, blocks: range | None = None) -> float:
    """Forward FLOPs of one image through ViT blocks (2 x multiply-accumulates; attention included)."""
    d, dff = backbone_config.hidden_size, backbone_config.intermediate_size
    n = (image_size // backbone_config.patch_size) ** 2 + 1
    per_block = 2 * (n * (4 * d * d + 2 * d * dff) + 2 * n * n * d)
    blocks = blocks if blocks is not None else range(backbone_config.num_hidden_layers)
    embed = 2 * (n - 1) * 3 * backbone_config.patch_size**2 * d
    return embed + per_block * len(blocks)


def training_flops(backbone_config, *, image_size: int, freeze_blocks: int) -> float:
    """FLOPs per training image: the whole forward, plus 2x forward for the backward of the trainable blocks."""
    layers = backbone_config.num_hidden_layers
    trainable = forward_flops(backbone_config, image_size=image_size, blocks=range(freeze_blocks, layers))
    if freeze_blocks == 0:
        trainable = forward_flops(backbone_config, image_size=image_size)
    return forward_flops(backbone_config, image_size=image_size) + 2 * trainable


def step_rate(pretrained: str, *, image_size: int, freeze_blocks: int, batch: int, device: str, steps: int) -> float:
    """Training images/s of the loop's own `train_step` on random faces (after warm-up steps)."""
    import torch

    from ferdist.config import load_config
    from ferdist.train.loop import train_step
    from ferdist.train.model import build_model
    from ferdist.train.optim import build_optimizer, make_schedule

    dev = torch.device(device)
    cfg = load_config(None, [f"model.pretrained={pretrained}", f"model.image_size={image_size}",
                             f"model.freeze_blocks={freeze_blocks}", "workers.num_workers=1",
                             "tracking.backend=none"])  # fmt: skip
    model = build_model(cfg.model, seed=0).to(dev).train()
    schedule = make_schedule(cfg.optim, steps_per_epoch=steps, epochs=2)
    optimizer, scheduler = build_optimizer(model, cfg.optim, schedule=schedule)
    trainable = [p for p in model.parameters() if p.requires_grad]
    images = torch.randint(0, 256, (batch, 1, 48, 48), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 7, (batch,), device=dev)
    generator = torch.Generator().manual_seed(0)
    bf16 = cfg.loop.autocast_bf16(dev.type)

    def step() -> None:
        train_step(model, images, labels, cfg=cfg, optimizer=optimizer, scheduler=scheduler, weights=None,
                   trainable=trainable, bf16=bf16, generator=generator)  # fmt: skip

    for _ in range(3):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - started)


def epoch_cycle(cfg, *, with_ray: bool, root: Path) -> tuple[float, float]:
    """(median seconds per epoch cycle, wall seconds of the run) for a 1-worker TorchTrainer on the running Ray, or
    for the same loop without Ray in a fresh process (so the baseline shares nothing with the Ray driver).

    A cycle is train + evaluate + checkpoint + report, as recorded in the run's last checkpoint; the first epoch and
    the last (whose cycle is not saved) are left out.
    """
    from ferdist.config import to_yaml
    from ferdist.launch import trainer as launch
    from ferdist.train.checkpoint import read_history

    started = time.perf_counter()
    if with_ray:
        last = Path(launch.build_trainer(cfg).fit().checkpoint.path)
    else:
        config = root / f"{cfg.name}.yaml"
        config.write_text(to_yaml(cfg))
        code = (
            "import sys; from pathlib import Path; from ferdist.config import load_config; "
            "from ferdist.train.loop import LocalSession, run_training; "
            "run_training(load_config(sys.argv[1]), LocalSession(Path(sys.argv[2])))"
        )
        # Ray gives a worker with N CPUs OMP_NUM_THREADS=N; the baseline gets the same.
        env = os.environ | {"OMP_NUM_THREADS": str(int(cfg.workers.cpus_per_worker))}
        subprocess.run([sys.executable, "-c", code, str(config), str(root / cfg.name)], env=env, check=True,
                       capture_output=True)  # fmt: skip
        last = max((root / cfg.name).glob("checkpoint_epoch_*[0-9]"))
    wall = time.perf_counter() - started
    cycles = [m["perf/cycle_s"] for m in read_history(last).history[1:-1]]
    return statistics.median(cycles), wall


def bench_train(args: argparse.Namespace, console: Console) -> dict:
    import ray
    import torch

    from ferdist.config import load_config
    from ferdist.train.model import random_backbone_config

    results: dict = {"cpu_threads": torch.get_num_threads()}
    table = Table(title="training (random weights: speed only)", show_header=True)
    table.add_column("measurement")
    table.add_column("value", justify="right")
    for freeze in (0, 4):
        rate = step_rate("random:tiny", image_size=32, freeze_blocks=freeze, batch=64, device="cpu", steps=20)
        results[f"cpu_tiny32_freeze{freeze}_img_s"] = rate
        table.add_row(f"CPU random:tiny @32, batch 64, freeze_blocks={freeze}", f"{rate:,.0f} img/s")
    if args.gpu:
        config = random_backbone_config("base", image_size=224)
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        for freeze in (4, 0):
            rate = step_rate("random:base", image_size=224, freeze_blocks=freeze, batch=args.gpu_batch,
                             device="cuda", steps=30)  # fmt: skip
            flops = training_flops(config, image_size=224, freeze_blocks=freeze)
            mfu = rate * flops / peak if peak else float("nan")
            results[f"gpu_base224_freeze{freeze}"] = {"img_s": rate, "gflop_per_img": flops / 1e9, "mfu": mfu,
                                                      "device": name}  # fmt: skip
            table.add_row(f"{name} ViT-B/16 @224 bf16, batch {args.gpu_batch}, freeze_blocks={freeze}",
                          f"{rate:,.0f} img/s, {flops / 1e9:.0f} GFLOP/img, MFU {mfu:.1%}")  # fmt: skip

    # Ray Train overhead on the quick start's model and a SYNTHETIC shard set.
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shards(synthetic_source(args.synthetic_rows, seed=0), str(root / "shards"), samples_per_shard=64)
        measured = {}
        for with_ray in (False, True):
            if with_ray:
                ray.init(num_cpus=os.cpu_count(), configure_logging=False, log_to_driver=False)
            cfg = load_config(Path(__file__).resolve().parents[2] / "jobs" / "configs" / "quickstart.yaml", [
                f"name=bench-{'ray' if with_ray else 'local'}", f"data.manifest={root / 'shards'}",
                f"checkpoint.storage_path={root / 'runs'}", f"loop.epochs={args.epochs}", "workers.num_workers=1",
                f"workers.cpus_per_worker={os.cpu_count()}", "data.loader_workers=1", "tracking.backend=none",
            ])  # fmt: skip
            measured[with_ray] = epoch_cycle(cfg, with_ray=with_ray, root=root)
        ray.shutdown()
    (local_epoch, local_wall), (ray_epoch, ray_wall) = measured[False], measured[True]
    overhead = ray_epoch / local_epoch - 1
    results |= {"epoch_s_without_ray": local_epoch, "epoch_s_ray_1_worker": ray_epoch, "ray_overhead": overhead,
                "run_wall_s_without_ray": local_wall, "run_wall_s_ray": ray_wall, "epochs": args.epochs}  # fmt: skip
    table.add_row("epoch without Ray (same loop, own process), median", f"{local_epoch:.2f} s")
    table.add_row("epoch under Ray Train (1 worker), median", f"{ray_epoch:.2f} s")
    table.add_row("Ray Train overhead per epoch", f"{overhead:+.1%}")
    table.add_row(f"whole {args.epochs}-epoch run: Ray / without Ray", f"{ray_wall:.1f} s / {local_wall:.1f} s")
    console.print(table)
    return results
