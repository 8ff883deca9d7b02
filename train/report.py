"""What a run leaves in its workdir: metrics as JSON lines, TensorBoard events, a PNG of the curves.

Only JAX process 0 writes; the other processes get a reporter that does nothing.
"""

from __future__ import annotations

import json
import os
from typing import Any


class Reporter:
    """Appends epoch metrics to ``metrics.jsonl`` and TensorBoard, and plots them at the end."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.workdir = workdir
        self.enabled = enabled
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        self.plot_path = os.path.join(workdir, "curves.png")
        self._writer = None
        if enabled:
            import tensorflow as tf

            os.makedirs(workdir, exist_ok=True)
            self._writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Records training progress (loss, lr, images/s) at ``step`` to ``train_log.jsonl`` and TensorBoard."""
        if not self.enabled:
            return
        import tensorflow as tf

        with open(os.path.join(self.workdir, "train_log.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        with self._writer.as_default(step=step):
            for key, value in metrics.items():
                tf.summary.scalar(f"train/{key}", value)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Records one epoch's metrics (numbers) at ``step``."""
        if not self.enabled:
            return
        import tensorflow as tf

        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        with self._writer.as_default(step=step):
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    tf.summary.scalar(key, value)
        self._writer.flush()

    def history(self) -> list[dict[str, Any]]:
        """All records written so far (including those of earlier, resumed runs)."""
        if not os.path.exists(self.metrics_path):
            return []
        with open(self.metrics_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def plot(self) -> str | None:
        """Draws loss and accuracy per epoch into ``curves.png``; returns its path."""
        records = self.history()
        if not self.enabled or not records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in records]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        ax_loss.plot(epochs, [r["train_loss"] for r in records], label="train loss")
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("cross-entropy")
        ax_loss.legend()
        for key in ("train_top1", "eval_top1", "eval_top5", "ema_top1"):
            if key in records[0]:
                ax_acc.plot(epochs, [100 * r[key] for r in records], label=key.replace("_", " "))
        ax_acc.set_xlabel("epoch")
        ax_acc.set_ylabel("accuracy (%)")
        ax_acc.legend()
        fig.tight_layout()
        fig.savefig(self.plot_path, dpi=100)
        plt.close(fig)
        return self.plot_path


def plot_protocols(results: list[dict[str, Any]], path: str) -> str:
    """Draws top-1 and top-5 of each evaluation protocol side by side into ``path`` (PNG); returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [f"{r['protocol']}\n({r['views']} views)" for r in results]
    x = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(1.6 * len(results) + 2, 4))
    for offset, key in ((-0.2, "top1"), (0.2, "top5")):
        values = [100 * r[key] for r in results]
        bars = ax.bar(x + offset, values, width=0.4, label=key.replace("top", "top-"))
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    low = min(100 * r["top1"] for r in results)
    ax.set_ylim(max(0.0, low - 10), 118)
    ax.set_xticks(x, names)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{results[0]['dataset']} {results[0]['split']}: {results[0]['count']} images", pad=10)
    ax.legend(loc="upper center", ncols=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
