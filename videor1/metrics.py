"""Per-step metrics: one JSONL line per step, TensorBoard when enabled, a summary table and a PNG."""

from __future__ import annotations

import json
import math
import os
import resource
import time
from contextlib import contextmanager

import torch


class StepTimer:
    """Wall time per phase of a step: `with timer("rollout"): ...`, then `timer.times`."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


def peak_memory_gb() -> float:
    """Peak GPU memory allocated on this device, or the process's peak RSS on the CPU (GB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


class MetricsLogger:
    """Rank 0 writes metrics.jsonl (appending on resume) and, optionally, TensorBoard events."""

    def __init__(self, output_dir: str, tensorboard: bool, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.writer = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if resume_step and os.path.exists(self.path):  # drop lines after the resumed step
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        elif os.path.exists(self.path):
            os.remove(self.path)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summary_table(records: list[dict], keys: list[str]) -> str:
    """A small text table: first, last and mean of each metric over the run."""
    rows = []
    for key in keys:
        vals = [r[key] for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if vals:
            rows.append((key, vals[0], vals[-1], sum(vals) / len(vals)))
    width = max((len(r[0]) for r in rows), default=10)
    lines = [f"{'metric':<{width}}  {'first':>10}  {'last':>10}  {'mean':>10}"]
    lines += [f"{k:<{width}}  {a:>10.4g}  {b:>10.4g}  {m:>10.4g}" for k, a, b, m in rows]
    return "\n".join(lines)


def plot_curves(records: list[dict], keys: list[str], path: str, title: str) -> str:
    """A PNG with one panel per metric against the step (moving average over 5 steps drawn on top)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)]
    cols = 3
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, alpha=0.35, lw=1)
        k = 5
        smooth = [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]
        ax.plot(xs, smooth, lw=2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
