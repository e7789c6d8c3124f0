"""Per-step metrics: one JSONL line per step, TensorBoard or Weights & Biases (train.report_to), a
sample of completions (completions.jsonl), a summary table and a PNG."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from contextlib import contextmanager

import torch

from videor1.config import ConfigError

log = logging.getLogger("videor1.metrics")


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


REPORT_TO = ("none", "tensorboard", "wandb")


def check_report_to(report_to: str) -> None:
    """Fail at startup, before any model loads, when train.report_to names a tracker that is not
    installed (neither is a dependency of videor1)."""
    if report_to not in REPORT_TO:
        raise ConfigError(f"train.report_to must be one of {list(REPORT_TO)}, got {report_to!r}")
    try:
        if report_to == "wandb":
            import wandb  # noqa: F401
        elif report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        package = "wandb" if report_to == "wandb" else "tensorboard"
        raise ConfigError(f"train.report_to={report_to} needs the {package} package, which is not installed "
                          f"({e}): pip install {package}, or set train.report_to none") from None


def _numeric(record: dict) -> dict:
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and k != "step" and math.isfinite(v)}


def completions_markdown(sample: dict) -> str:
    """A completions sample (train.completion_sample) as a markdown table, for TensorBoard's text tab."""
    head = f"**problem {sample['problem_id']}** ({sample['data_type']}): {sample['problem']}\n\n"
    rows = ["| # | completion | rewards | reward | advantage |", "|---|---|---|---|---|"]
    for i, c in enumerate(sample["completions"]):
        text = c["text"].replace("|", "\\|").replace("\n", "<br>")
        rewards = ", ".join(f"{k}={v:.3g}" for k, v in c["rewards"].items())
        rows.append(f"| {i} | {text} | {rewards} | {c['reward']:.4g} | {c['advantage']:.4g} |")
    return head + "\n".join(rows)


class MetricsLogger:
    """Rank 0 writes metrics.jsonl (appending on resume) and reports to train.report_to: "none",
    "tensorboard" (events in output_dir/tensorboard) or "wandb" (project $WANDB_PROJECT or "videor1",
    files in output_dir, mode from $WANDB_MODE, e.g. offline). log_completions appends samples to
    completions.jsonl (and to the tracker)."""

    def __init__(self, output_dir: str, report_to: str, enabled: bool, resume_step: int = 0,
                 run_config: dict | None = None):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.completions_path = os.path.join(output_dir, "completions.jsonl")
        self.writer = None
        self.wandb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        _keep_until(self.path, resume_step, strict=True)  # lines after the resumed step go
        _keep_until(self.completions_path, resume_step)
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        elif report_to == "wandb":
            import wandb  # optional: check_report_to said at startup whether it is installed

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "videor1"), dir=output_dir,
                                    config=run_config or {}, mode=os.environ.get("WANDB_MODE") or None)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in _numeric(record).items():
                self.writer.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(_numeric(record), step=record["step"])

    def log_completions(self, sample: dict) -> None:
        """Append one completions sample (train.completion_sample) to completions.jsonl; as text to
        TensorBoard, as a table to wandb."""
        if not self.enabled:
            return
        with open(self.completions_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(sample) + "\n")
        if self.writer is not None:
            self.writer.add_text("completions", completions_markdown(sample), sample["step"])
        if self.wandb is not None:
            import wandb

            table = wandb.Table(columns=["problem_id", "problem", "completion", "reward", "advantage"],
                                data=[[str(sample["problem_id"]), sample["problem"], c["text"], c["reward"], c["advantage"]]
                                      for c in sample["completions"]])
            self.wandb.log({"completions": table}, step=sample["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _keep_until(path: str, step: int, strict: bool = False) -> None:
    """A JSONL file of {"step": ...} lines kept up to `step` (resume), or removed (a fresh run, step 0).
    A torn last line (a write cut short by a crash) is dropped with a warning; a damaged line before
    it raises when `strict` (metrics.jsonl is the run's record) and is dropped otherwise (a sample)."""
    if not os.path.exists(path):
        return
    if not step:
        os.remove(path)
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for i, line in enumerate(lines):
        try:
            record_step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if i == len(lines) - 1:
                log.warning("%s: dropping a torn last line (%d bytes) on resume", path, len(line))
            elif strict:
                raise ValueError(f"{path} line {i + 1} is not valid JSON: the metrics file is damaged") from None
            continue
        if record_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)


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
