"""Run reports as files: confusion matrix PNG, per-class precision/recall/F1 table, learning curves PNG.

Pure functions of a confusion matrix or a metric history (what ``summary.json`` in a checkpoint holds), drawn with
matplotlib's Agg backend so they work on a headless driver. MLflow logs the folder `write_reports` fills.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ferdist.constants import FER_CLASSES
from ferdist.metrics import report_from_confusion

CONFUSION_PNG, CURVES_PNG, REPORT_MD = "confusion_matrix.png", "learning_curves.png", "class_report.md"


def class_report_markdown(confusion: Any, *, title: str) -> str:
    """A Markdown table: precision, recall, F1 and support per class, then accuracy and macro-F1."""
    report = report_from_confusion(np.asarray(confusion))
    lines = [f"# {title}", "", "| class | precision | recall | F1 | support |", "| --- | ---: | ---: | ---: | ---: |"]
    for i, name in enumerate(FER_CLASSES):
        lines.append(f"| {name} | {report.precision[i]:.4f} | {report.recall[i]:.4f} | {report.f1[i]:.4f} | "
                     f"{report.support[i]} |")  # fmt: skip
    total = sum(report.support)
    lines += ["", f"accuracy {report.accuracy:.4f} · macro-F1 {report.macro_f1:.4f} · {total} samples", ""]
    return "\n".join(lines)


def plot_confusion(confusion: Any, path: Path, *, title: str) -> None:
    """Row-normalised confusion matrix (recall on the diagonal) with the raw counts written in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(confusion, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=100)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(FER_CLASSES)), FER_CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(FER_CLASSES)), FER_CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for t in range(counts.shape[0]):
        for p in range(counts.shape[1]):
            ax.text(p, t, str(counts[t, p]), ha="center", va="center", fontsize=8,
                    color="white" if share[t, p] > 0.5 else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(history: list[dict[str, float]], path: Path, *, title: str) -> None:
    """Loss (train, val) and accuracy (train, val) and val macro-F1 per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    evaluated = [h for h in history if "val/acc" in h]  # loop.eval_every > 1 leaves epochs without val
    val_epochs = [h["epoch"] for h in evaluated]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    loss_ax.plot(epochs, [h["train/loss"] for h in history], label="train")
    loss_ax.plot(val_epochs, [h["val/loss"] for h in evaluated], label="val")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc_ax.plot(epochs, [h["train/acc"] for h in history], label="train acc")
    acc_ax.plot(val_epochs, [h["val/acc"] for h in evaluated], label="val acc")
    acc_ax.plot(val_epochs, [h["val/macro_f1"] for h in evaluated], label="val macro-F1", linestyle="--")
    acc_ax.set(xlabel="epoch", ylim=(0, 1), title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(folder: Path, *, best: dict[str, Any], history: list[dict[str, float]], run_name: str) -> list[Path]:
    """The three report files for a run into ``folder``: ``best`` is the best checkpoint's summary.json."""
    folder.mkdir(parents=True, exist_ok=True)
    title = f"{run_name}: val, epoch {best['epoch']}"
    (folder / REPORT_MD).write_text(class_report_markdown(best["confusion"], title=title))
    plot_confusion(best["confusion"], folder / CONFUSION_PNG, title=title)
    plot_curves(history, folder / CURVES_PNG, title=run_name)
    return [folder / REPORT_MD, folder / CONFUSION_PNG, folder / CURVES_PNG]
