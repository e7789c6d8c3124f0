"""T-GRPO vs plain GRPO after the same CoT SFT, over several seeds (numbers, not a test).

    python benchmarks/compare_tgrpo_grpo.py --seeds 0 1 2          # ~15 min per seed on 2 CPU cores

For each training seed: one CoT SFT run (the demo's configs/tiny_sft_cpu.yaml), then from that same
checkpoint T-GRPO (algo.temporal: true) and plain GRPO (algo.temporal: false) with the same config,
budget (steps, rollouts) and seed; each model is evaluated on the same held-out split on ordered and on
shuffled frames. The tiny checkpoint and the data are shared by all seeds (built once, as the demo's).
Writes OUT/compare.md (per-seed rows and mean +- sample std over seeds) and OUT/compare.json.
Stages already done are reused (delete OUT/seed<k> to redo a seed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from videor1 import demo  # noqa: E402

METHODS = ("SFT", "GRPO", "T-GRPO")


def run_seed(out: str, seed: int, extra: list[str]) -> dict[str, dict]:
    """{method: {"ordered": acc, "shuffled": acc, "gap": ordered - shuffled, "by_task": {...}}}."""
    sft_dir = os.path.join(out, f"seed{seed}", "sft")
    results = {}
    for method, flags in (("T-GRPO", []), ("GRPO", ["--no-temporal"])):
        name = f"seed{seed}/{'tgrpo' if not flags else 'grpo'}"
        summary = demo.main(["--out", out, "--seed", str(seed), "--sft-dir", sft_dir, "--rl-name", name,
                             *flags, *extra])
        evals = summary["evals"]
        results["SFT"] = evals["SFT"]
        results[method] = evals["GRPO" if flags else "T-GRPO"]
    return {m: {"ordered": e["ordered"]["overall"], "shuffled": e["shuffled"]["overall"],
                "gap": e["ordered"]["overall"] - e["shuffled"]["overall"],
                "by_task": {t.split("/")[-1]: (e["ordered"]["by_source"][t][1], e["shuffled"]["by_source"][t][1])
                            for t in e["ordered"]["by_source"]}}
            for m, e in results.items()}


def table(per_seed: dict[int, dict]) -> str:
    """Markdown: one row per (seed, method), then mean +- std over seeds per method."""
    lines = ["| seed | method | held-out ordered | held-out shuffled | gap (ordered - shuffled) |",
             "|---|---|---:|---:|---:|"]
    for seed, res in per_seed.items():
        for m in METHODS:
            r = res[m]
            lines.append(f"| {seed} | {m} | {r['ordered']:.3f} | {r['shuffled']:.3f} | {r['gap']:+.3f} |")

    def ms(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    for m in METHODS:
        cols = [ms([res[m][k] for res in per_seed.values()]) for k in ("ordered", "shuffled", "gap")]
        lines.append(f"| **mean ± std ({len(per_seed)} seeds)** | **{m}** | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "compare"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("demo_args", nargs=argparse.REMAINDER,
                    help="after --: extra arguments for videor1.demo (e.g. -- --n-train 600)")
    args = ap.parse_args(argv)
    extra = [a for a in args.demo_args if a != "--"]
    per_seed = {seed: run_seed(os.path.abspath(args.out), seed, extra) for seed in args.seeds}
    text = table(per_seed)
    cmd = "python benchmarks/compare_tgrpo_grpo.py --seeds " + " ".join(map(str, args.seeds))
    if extra:
        cmd += " -- " + " ".join(extra)
    report = f"{cmd}\n\n{text}\n"
    print("\n" + report)
    with open(os.path.join(args.out, "compare.md"), "w", encoding="utf-8") as f:
        f.write(report)
    with open(os.path.join(args.out, "compare.json"), "w", encoding="utf-8") as f:
        json.dump({"command": cmd, "per_seed": per_seed}, f, indent=1)
    return per_seed


if __name__ == "__main__":
    main()
