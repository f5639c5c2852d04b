"""What checkpointing costs the training loop per epoch, measured on the CPU and set against a GPU epoch.

The GPU's compute is simulated: each epoch the loop "trains" for ``epoch_s`` seconds (a sleep, as the host waits on
a GPU), and everything else it does at the epoch end is timed: copying state off the device, serialising, writing,
uploading, and waiting for a writer that is behind. The model is the ViT-B geometry (``random:base``, 85.8 M
parameters, blocks 0-3 frozen) at a small image size: the checkpoint is the same size as at 224 px.

* **before**: the policy up to this release, a full checkpoint (every weight, AdamW moments, progress) written
  synchronously every epoch and then copied to storage, as Ray's synchronous report does;
* **after**: `ferdist.train.checkpoint.CheckpointManager` with the shipped defaults: the best model whenever the
selection
  metric improves (here: every epoch, the worst case) and slim resume state every ``checkpoint.every_epochs``,
  written on background threads (the resume state by the thread that stands in for Ray's asynchronous upload).

Storage is a local folder or an S3 server (moto, on loopback) through pyarrow, the way Ray and ferdist reach it.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
import torch

from ferdist.config import CheckpointConfig, RunConfig, load_config
from ferdist.train import checkpoint as ckpt

# One H100 trains an FER2013 epoch of the ViT-B recipe (≈ 82 GFLOP per image, 28,709 images) in ≈ 6.5 s at 45 % of
# its ≈ 800 bf16 TFLOP/s; data-parallel GPUs divide it.
H100_EPOCH_S = {"1": 6.5, "4": 1.6, "8": 0.8}
RUN_EPOCHS = 80  # the recipe's trial length, over which costs are amortised


@dataclass(frozen=True)
class Storage:
    name: str
    filesystem: pyarrow.fs.FileSystem
    root: str


def base_model(image_size: int = 32) -> tuple[Any, RunConfig, torch.optim.Optimizer, Any]:
    """random:base with blocks 0-3 frozen and AdamW after one step (so its moments exist), on the CPU."""
    from ferdist.train.model import build_model
    from ferdist.train.optim import build_optimizer, make_schedule

    cfg = load_config(None, ["model.pretrained=random:base", f"model.image_size={image_size}", "model.freeze_blocks=4",
                             "tracking.backend=none"])  # fmt: skip
    model = build_model(cfg.model, seed=0)
    optimizer, scheduler = build_optimizer(model, cfg.optim, schedule=make_schedule(cfg.optim, steps_per_epoch=10,
                                                                                    epochs=80))  # fmt: skip
    model(torch.randn(2, 3, image_size, image_size)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, cfg, optimizer, scheduler


def _before(model: Any, cfg: RunConfig, optimizer: Any, scheduler: Any, state: ckpt.TrainState,
            storage: Storage) -> int:  # fmt: skip
    """Today's epoch end before this release: save everything into a temp folder, then copy it to storage."""
    with tempfile.TemporaryDirectory(prefix="ferdist-before-") as tmp:
        folder = Path(tmp)
        torch.save(model.state_dict(), folder / ckpt.MODEL_FILE)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "epochs_done": state.epochs_done, "history": state.history, "resumed_at": []},
                   folder / ckpt.STATE_FILE)  # fmt: skip
        (folder / ckpt.SUMMARY_FILE).write_text("{}")
        written = sum(f.stat().st_size for f in folder.iterdir())
        target = f"{storage.root}/before/checkpoint_{state.epochs_done:04d}"
        storage.filesystem.create_dir(target, recursive=True)
        pyarrow.fs.copy_files(tmp, target, source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=storage.filesystem)  # fmt: skip
    with contextlib.suppress(OSError):  # Ray keeps the newest two
        storage.filesystem.delete_dir(f"{storage.root}/before/checkpoint_{state.epochs_done - 2:04d}")
    return written


def simulate(policy: str, storage: Storage, *, epochs: int, epoch_s: float, image_size: int = 32) -> dict[str, Any]:
    """Runs ``epochs`` simulated epochs of ``epoch_s`` GPU seconds under ``policy`` ("before"/"after")."""
    model, cfg, optimizer, scheduler = base_model(image_size)
    policy_cfg = CheckpointConfig()
    frozen = ckpt.frozen_sha256(model)
    frozen_weights = ckpt.frozen_state(model)  # the loop copies these once per run
    manager = ckpt.CheckpointManager(policy_cfg, epochs=RUN_EPOCHS, eval_every=1, history=[],
                                     store=ckpt.ModelStore(storage.filesystem, f"{storage.root}/after"))  # fmt: skip
    uploads = ThreadPoolExecutor(max_workers=1)  # stands in for Ray's checkpoint upload thread
    pending: Future[None] | None = None
    state, blocked, written, writes = ckpt.TrainState(), [], 0, {"model": 0, "resume": 0}
    confusion = [[0] * 7 for _ in range(7)]
    for epoch in range(epochs):
        time.sleep(epoch_s)  # the GPU trains the epoch; the host is free (background writes run now)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(1e-6)  # the weights change every epoch
        state.history.append({"epoch": epoch + 1, "val/acc": 0.3 + 0.005 * epoch, "val/macro_f1": 0.2})
        state.epochs_done = epoch + 1
        last = epoch + 1 == epochs
        started = time.perf_counter()
        if policy == "before":
            written += _before(model, cfg, optimizer, scheduler, state, storage)
        else:
            model_snapshot = None
            if manager.improves(state.history[-1]):  # every epoch here: the worst case for model writes
                model_snapshot = manager.save_model(lambda: ckpt.take_snapshot(
                    model, cfg=cfg, state=state, confusion=confusion, frozen=frozen_weights))  # fmt: skip
                writes["model"] += 1
            if manager.resumes(epoch) or last:
                if pending is not None:
                    pending.result()  # a writer that is behind makes the loop wait: that is counted
                snapshot = ckpt.take_snapshot(model, cfg=cfg, state=state, confusion=confusion,
                                              resume=(optimizer, scheduler, frozen), reuse=model_snapshot)  # fmt: skip
                path = f"{storage.root}/after/{ckpt.RESUME_PREFIX}{snapshot.epoch:04d}"
                pending = uploads.submit(ckpt.persist, snapshot, storage.filesystem, path)
                writes["resume"] += 1
            if last:  # the run is done only once its last checkpoints are committed
                manager.finish()
                if pending is not None:
                    pending.result()
        blocked.append(time.perf_counter() - started)
    uploads.shutdown()
    # Amortised over an 80-epoch run: the per-epoch pattern repeats; the final flush happens once.
    steady = blocked[:-1]
    per_epoch = (statistics.fmean(steady) * (RUN_EPOCHS - 1) + blocked[-1]) / RUN_EPOCHS
    return {
        "policy": policy, "storage": storage.name, "epochs_simulated": epochs, "simulated_epoch_s": epoch_s,
        "blocked_s": [round(b, 4) for b in blocked], "overhead_s_per_epoch": per_epoch,
        "max_blocking_s": max(steady) if steady else blocked[-1], "final_flush_s": blocked[-1],
        "mb_written_per_epoch": written / epochs / 1e6 if policy == "before" else None, "writes": writes,
        "pct_of_h100_epoch": {gpus: 100 * per_epoch / s for gpus, s in H100_EPOCH_S.items()},
    }  # fmt: skip


def checkpoint_sizes(image_size: int = 32) -> dict[str, float]:
    """MB of one checkpoint as written before (model.pt + train_state.pt) and after (the model; the resume state)."""
    model, cfg, optimizer, scheduler = base_model(image_size)
    state = ckpt.TrainState(epochs_done=1, history=[{"epoch": 1, "val/acc": 0.3, "val/macro_f1": 0.2}])
    sizes = {}
    with tempfile.TemporaryDirectory(prefix="ferdist-sizes-") as tmp:
        local = Storage("local", pyarrow.fs.LocalFileSystem(), tmp)
        before = _before(model, cfg, optimizer, scheduler, state, local)
        sizes["before_mb"] = before / 1e6
        confusion = [[0] * 7 for _ in range(7)]
        for kind, resume in (("model", None), ("resume", (optimizer, scheduler, ckpt.frozen_sha256(model)))):
            folder = Path(tmp) / kind
            ckpt.write_snapshot(ckpt.take_snapshot(model, cfg=cfg, state=state, confusion=confusion, resume=resume),
                                folder)  # fmt: skip
            sizes[f"after_{kind}_mb"] = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    return sizes


@contextlib.contextmanager
def s3_storage() -> Iterator[tuple[Storage, Storage]]:
    """A bucket on an S3 server (moto, its own process, on loopback), reached through pyarrow: as Ray reached
    storage_path before this release (a plain S3 filesystem), and through the filesystem a run is given now
    (`ferdist.launch.trainer.storage_target`: writes in the calling thread, every call retried through an outage). Out
    of
    process, as real storage is: an in-process server would compete with the loop for the GIL."""
    import os
    import socket
    import subprocess
    import sys

    import boto3
    from botocore.exceptions import EndpointConnectionError

    from ferdist.outage import resilient
    from ferdist.train.runs import s3_filesystem

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                          aws_secret_access_key="bench")  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:  # until the server answers (a benchmark's start-up, not a test's synchronisation)
            try:
                client.create_bucket(Bucket="cycle")
                break
            except EndpointConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        plain = pyarrow.fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                                        access_key="bench", secret_key="bench")  # fmt: skip
        for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                           ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
            os.environ.setdefault(key, value)
        retrying = resilient(s3_filesystem(endpoint), budget_s=300)
        yield Storage("s3", plain, "cycle/runs"), Storage("s3, retrying", retrying, "cycle/runs2")
    finally:
        server.terminate()
        server.wait(timeout=30)


def bench_cycle(*, epochs: int, epoch_s: float, s3: bool = True) -> dict[str, Any]:
    """before/after × local/S3: the JSON behind the README's checkpoint table."""
    results: dict[str, Any] = {"h100_epoch_s": H100_EPOCH_S, "run_epochs": RUN_EPOCHS, **checkpoint_sizes()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="ferdist-cycle-") as tmp:
        local = Storage("local", pyarrow.fs.LocalFileSystem(), tmp)
        for policy in ("before", "after"):
            rows.append(simulate(policy, local, epochs=epochs, epoch_s=epoch_s))
        shutil.rmtree(tmp, ignore_errors=True)
    if s3:
        with s3_storage() as (plain, retrying):
            for policy in ("before", "after"):
                rows.append(simulate(policy, plain, epochs=epochs, epoch_s=epoch_s))
            rows.append(simulate("after", retrying, epochs=epochs, epoch_s=epoch_s))
    for row in rows:
        if row["policy"] == "after":  # model every epoch (worst case) + resume state every checkpoint.every_epochs
            every = CheckpointConfig().every_epochs
            row["mb_written_per_epoch"] = results["after_model_mb"] + results["after_resume_mb"] / every
    results["runs"] = rows
    local_rows = {r["policy"]: r for r in rows if r["storage"] == "local"}
    results["before"] = {"overhead_s_per_epoch": local_rows["before"]["overhead_s_per_epoch"],
                         "max_blocking_s": local_rows["before"]["max_blocking_s"],
                         "checkpoint_mb": results["before_mb"]}  # fmt: skip
    results["after"] = {"overhead_s_per_epoch": local_rows["after"]["overhead_s_per_epoch"],
                        "max_blocking_s": local_rows["after"]["max_blocking_s"],
                        "checkpoint_mb": results["after_model_mb"] + results["after_resume_mb"],
                        "model_mb": results["after_model_mb"], "resume_mb": results["after_resume_mb"]}  # fmt: skip
    return results


def run(args: Any, console: Any) -> dict[str, Any]:
    """``jobs/benchmark.py cycle``: measure, then print the table the README shows."""
    from rich.table import Table

    results = bench_cycle(epochs=args.epochs, epoch_s=args.epoch_s, s3=not args.no_s3)
    table = Table(title=f"checkpointing per epoch, ViT-B geometry ({results['before_mb']:.0f} MB before; model "
                        f"{results['after_model_mb']:.0f} MB + resume state {results['after_resume_mb']:.0f} MB "
                        f"after), {args.epochs} epochs of {args.epoch_s} s simulated GPU compute")  # fmt: skip
    for column in ("policy", "storage", "overhead s/epoch (80 epochs)", "max blocked s", "final flush s",
                   "MB/epoch", "% of 1 / 4 / 8 H100 epoch"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("policy", "storage") else "right")
    for row in results["runs"]:
        pct = " / ".join(f"{row['pct_of_h100_epoch'][g]:.1f}" for g in ("1", "4", "8"))
        table.add_row(row["policy"], row["storage"], f"{row['overhead_s_per_epoch']:.3f}",
                      f"{row['max_blocking_s']:.3f}", f"{row['final_flush_s']:.2f}",
                      f"{row['mb_written_per_epoch']:.0f}", pct)  # fmt: skip
    console.print(table)
    return results
