"""The README's main command (`make demo`): Video-R1's two stages on the tiny model, on the CPU.

    python -m videor1.demo                 # what `make demo` runs
    python -m videor1.demo --no-temporal   # the same with plain GRPO (temporal: false)

Stages, each skipped when its output already exists (delete the folder to redo it; an interrupted
SFT or T-GRPO run resumes from its last checkpoint):
  1. build   the tiny Qwen2.5-VL checkpoint and the synthetic train / held-out videos (runs/demo)
  2. sft     CoT SFT, `torchrun --nproc_per_node=2 videor1/sft.py --config configs/tiny_sft_cpu.yaml`
  3. eval    held-out accuracy before and after SFT, on ordered and on shuffled frames
  4. tgrpo   T-GRPO from the SFT model, `torchrun ... videor1/train.py --config configs/tiny_cpu.yaml`
  5. eval    held-out accuracy after T-GRPO, ordered and shuffled
  6. report  a per-task table (printed, and saved as results.md / results.json) and demo.png with
             the SFT loss, the T-GRPO reward curves and the accuracies

The held-out split is never trained on: the generator puts a scene in the split given by the parity
of its content hash, so the splits share no scene.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The demo's tasks: the three temporal multiple-choice tasks, whose answers change when the frames
# are reordered (motion direction, which colour came first, appears vs disappears).
DEMO_TASKS = ("motion_direction", "color_first", "appear_disappear")
# Synthetic data: 64x64 frames, 8 frames at 8 fps (every frame is read: each 2-frame temporal patch
# shows one step of the change, which the tiny model can see).
DATA = {"size": 64, "frames": 8, "fps": 8}
# The tiny model at 8 fps: 8 M-RoPE time positions per second, so each 2-frame temporal patch gets its
# own time (0, 2, 4, 6; with Qwen's 2, patches share them in pairs: 0, 0, 1, 1). docs/demo.md has the runs.
MODEL = {"tokens_per_second": 8}


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_assets(out: str, n_train: int, n_heldout: int, tasks=DEMO_TASKS, data_seed: int = 0,
                 option_order: str = "fixed") -> dict:
    """Tiny checkpoint and train / held-out JSONs under `out` (each built only if absent)."""
    from videor1 import synthetic
    from videor1.tiny import build_tiny_checkpoint

    paths = {"tiny": os.path.join(out, "tiny"), "train": os.path.join(out, "data", "train.json"),
             "heldout": os.path.join(out, "heldout", "heldout.json")}
    if not os.path.exists(os.path.join(paths["tiny"], "model.safetensors")):
        _say(f"building the tiny Qwen2.5-VL checkpoint -> {paths['tiny']}")
        build_tiny_checkpoint(paths["tiny"], seed=0, overwrite=True, **MODEL)
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        if os.path.exists(paths[split]):
            continue
        _say(f"generating {n} synthetic {split} samples ({', '.join(tasks)}) -> {os.path.dirname(paths[split])}")
        t0 = time.perf_counter()
        synthetic.generate_dataset(os.path.dirname(paths[split]), n, seed=data_seed, split=split, tasks=tasks,
                                   option_order=option_order, **DATA)
        _say(f"  done in {time.perf_counter() - t0:.0f} s")
    return paths


def torchrun(script: str, config: str, overrides: list[str], nproc: int, log_file: str) -> None:
    """Run a torchrun job with live output (also copied to `log_file`); a failure stops the demo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           os.path.join(ROOT, script), "--config", config, *overrides]
    _say("$ " + " ".join(cmd[2:]))
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log_file, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        for line in proc.stdout:
            log.write(line)
            if not line.startswith(("Loading weights", "Writing model")) and "real_accelerator" not in line:
                sys.stdout.write(line)
                sys.stdout.flush()
        if proc.wait() != 0:
            raise SystemExit(f"demo: {script} failed (exit {proc.returncode}); its output is in {log_file}")


def evaluate_both(model_dir: str, heldout: str, data_cfg, out_dir: str, batch_size: int = 32) -> dict:
    """Held-out accuracy on ordered and shuffled frames: {"ordered": summary, "shuffled": summary}
    (summaries of videor1.eval.summarize); cached as out_dir/eval.json."""
    from videor1 import eval as ev

    cache = os.path.join(out_dir, "eval.json")
    if os.path.exists(cache):
        with open(cache, encoding="utf-8") as f:
            return json.load(f)
    result = {}
    for name, shuffled in (("ordered", False), ("shuffled", True)):
        t0 = time.perf_counter()
        result[name] = ev.run(model_dir, heldout, data_cfg=data_cfg, shuffle_frames=shuffled, quiet=True,
                              max_new_tokens=48, batch_size=batch_size,
                              out_file=os.path.join(out_dir, f"eval_{name}.jsonl"))
        _say(f"  {name} frames: accuracy {result[name]['overall']:.3f} on {result[name]['n']} rows "
             f"({time.perf_counter() - t0:.0f} s)")
    tmp = cache + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, cache)
    return result


def results_table(evals: dict[str, dict]) -> str:
    """Markdown table: one row per task, ordered / shuffled / gap for each stage in `evals`."""
    stages = list(evals)
    tasks = sorted({src for e in evals.values() for src in e["ordered"]["by_source"]})
    head = "| task | " + " | ".join(f"{s} ordered | {s} shuffled | {s} gap" for s in stages) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(stages))]

    def cells(stage: str, key: str | None) -> str:
        e = evals[stage]
        o = e["ordered"]["overall"] if key is None else e["ordered"]["by_source"][key][1]
        s = e["shuffled"]["overall"] if key is None else e["shuffled"]["by_source"][key][1]
        return f"{o:.3f} | {s:.3f} | {o - s:+.3f}"

    for t in tasks:
        n = evals[stages[0]]["ordered"]["by_source"][t][0]
        lines.append(f"| {t.split('/')[-1]} (n={n}) | " + " | ".join(cells(s, t) for s in stages) + " |")
    n = evals[stages[0]]["ordered"]["n"]
    lines.append(f"| **all (n={n})** | " + " | ".join(cells(s, None) for s in stages) + " |")
    return "\n".join(lines)


def plot(out_png: str, sft_metrics: str, rl_metrics: str, evals: dict[str, dict]) -> str:
    """demo.png: SFT loss, T-GRPO reward / ordered and shuffled rollout accuracy, held-out accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from videor1.metrics import read_metrics

    def smooth(ys, k=5):
        return [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    sft = read_metrics(sft_metrics) if os.path.exists(sft_metrics) else []
    if sft:
        axes[0].plot([r["step"] for r in sft], smooth([r["loss"] for r in sft], 20))
    axes[0].set(title="SFT loss (assistant tokens)", xlabel="step")
    rl = read_metrics(rl_metrics) if os.path.exists(rl_metrics) else []
    for key, ax in (("reward", axes[1]), ("acc/ordered", axes[2]), ("acc/shuffled", axes[2])):
        pts = [(r["step"], r[key]) for r in rl if key in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, smooth(list(ys)), label=key)
    axes[1].set(title="T-GRPO mean reward (ordered rollouts)", xlabel="step")
    axes[2].set(title="T-GRPO rollout accuracy", xlabel="step")
    axes[2].legend(fontsize=8)
    stages = list(evals)
    tasks = sorted({src for e in evals.values() for src in e["ordered"]["by_source"]})
    width = 0.8 / (2 * len(stages))
    for i, stage in enumerate(stages):
        for j, frames in enumerate(("ordered", "shuffled")):
            ys = [evals[stage][frames]["by_source"][t][1] for t in tasks]
            xs = [k + (2 * i + j) * width for k in range(len(tasks))]
            axes[3].bar(xs, ys, width, label=f"{stage}, {frames}", hatch="//" if frames == "shuffled" else None)
    axes[3].set_xticks([k + 0.4 - width / 2 for k in range(len(tasks))], [t.split("/")[-1] for t in tasks], fontsize=8)
    axes[3].set(title="held-out accuracy", ylim=(0, 1.05))
    axes[3].axhline(0.25, color="grey", lw=0.8, ls=":")
    axes[3].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m videor1.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"))
    ap.add_argument("--nproc", type=int, default=2, help="torchrun processes for SFT and T-GRPO")
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-heldout", type=int, default=150)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1,
                    help="training seed (SFT and T-GRPO); 1: with 0 the SFT stays on its plateau (docs/demo.md)")
    ap.add_argument("--sft-config", default=os.path.join(ROOT, "configs", "tiny_sft_cpu.yaml"))
    ap.add_argument("--rl-config", default=os.path.join(ROOT, "configs", "tiny_cpu.yaml"))
    ap.add_argument("--no-temporal", action="store_true", help="plain GRPO instead of T-GRPO")
    ap.add_argument("--rl-name", default=None, help="folder of the RL stage (default tgrpo or grpo)")
    ap.add_argument("--sft-dir", default=None, help="reuse this SFT run folder (default OUT/sft)")
    ap.add_argument("--sft-override", action="append", default=[], metavar="--KEY=VALUE",
                    help="extra config override for sft.py (repeatable)")
    ap.add_argument("--rl-override", action="append", default=[], metavar="--KEY=VALUE",
                    help="extra config override for train.py (repeatable)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    from videor1.config import load_config

    paths = build_assets(out, args.n_train, args.n_heldout, data_seed=args.data_seed)
    data_cfg = load_config(args.rl_config).data
    # Continue an interrupted stage from its last checkpoint, or restart it over its own outputs.
    common = ["--data.train_file", paths["train"], "--train.seed", str(args.seed), "--train.resume_from", "auto",
              "--train.overwrite_output_dir", "true"]

    # Before SFT: the fresh model has never seen the <think>/<answer> format, so it scores ~0.
    base_dir = os.path.join(out, "base_eval")
    os.makedirs(base_dir, exist_ok=True)
    _say("evaluating the untrained tiny model on the held-out split")
    evals = {"before SFT": evaluate_both(paths["tiny"], paths["heldout"], data_cfg, base_dir)}

    # CoT SFT.
    sft_dir = os.path.abspath(args.sft_dir or os.path.join(out, "sft"))
    sft_final = os.path.join(sft_dir, "final")
    if os.path.exists(os.path.join(sft_final, "model.safetensors")):
        _say(f"SFT: reusing {sft_final} (delete {sft_dir} to retrain)")
    else:
        _say("stage 1/2: CoT SFT")
        overrides = [o for kv in args.sft_override for o in kv.split("=", 1)]
        torchrun("videor1/sft.py", args.sft_config,
                 ["--model.path", paths["tiny"], "--train.output_dir", sft_dir, *common, *overrides],
                 args.nproc, os.path.join(sft_dir, "sft.log"))
    _say("evaluating the SFT model on the held-out split")
    evals["SFT"] = evaluate_both(sft_final, paths["heldout"], data_cfg, sft_dir)

    # T-GRPO (or plain GRPO) from the SFT model.
    name = args.rl_name or ("grpo" if args.no_temporal else "tgrpo")
    rl_dir = os.path.join(out, name)
    rl_final = os.path.join(rl_dir, "final")
    label = "GRPO" if args.no_temporal else "T-GRPO"
    if os.path.exists(os.path.join(rl_final, "model.safetensors")):
        _say(f"{label}: reusing {rl_final} (delete {rl_dir} to retrain)")
    else:
        _say(f"stage 2/2: {label}")
        overrides = [o for kv in args.rl_override for o in kv.split("=", 1)]
        torchrun("videor1/train.py", args.rl_config,
                 ["--model.path", sft_final, "--train.output_dir", rl_dir,
                  "--algo.temporal", "false" if args.no_temporal else "true", *common, *overrides],
                 args.nproc, os.path.join(rl_dir, "train.log"))
    _say(f"evaluating the {label} model on the held-out split")
    evals[label] = evaluate_both(rl_final, paths["heldout"], data_cfg, rl_dir)

    table = results_table(evals)
    tag = "" if not args.rl_name else "_" + name.replace("/", "_")
    png = plot(os.path.join(out, f"demo{tag}.png"),
               os.path.join(sft_dir, "metrics.jsonl"), os.path.join(rl_dir, "metrics.jsonl"), evals)
    minutes = (time.perf_counter() - start) / 60
    report = (f"Held-out accuracy ({args.n_heldout} rows, never trained on), ordered vs shuffled frames\n\n"
              f"{table}\n\nchance: 0.25 (4 options: motion_direction, color_first), 0.5 (appear_disappear)\n"
              f"demo wall time {minutes:.1f} min; plot {png}")
    print("\n" + report, flush=True)
    with open(os.path.join(out, f"results{tag}.md"), "w", encoding="utf-8") as f:
        f.write(report + "\n")
    summary = {"evals": evals, "minutes": minutes, "png": png, "sft": sft_final, "rl": rl_final}
    with open(os.path.join(out, f"results{tag}.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
