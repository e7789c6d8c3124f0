"""Evaluate one checkpoint on several benchmarks, resumably, and print Video-R1's results table.

    python -m videor1.eval_suite --model CKPT --eval-dir src/r1-v/Evaluation --out-dir results/ckpt \
        [--benchmarks vsibench,videommmu,mmvu,mvbench,tempcompass,videomme] [--frames 32]
    torchrun --nproc_per_node=8 -m videor1.eval_suite ...     # rows split over ranks

Each benchmark's file is <eval-dir>/eval_<name>.json (Video-R1's names; --file NAME=PATH overrides)
and its media paths resolve against the eval dir (Video-R1 joins "./..." paths to its Evaluation
folder). The protocol is videor1.eval's "video-r1" (--protocol ours for ours).

Outputs in --out-dir, per benchmark: <name>.jsonl (one scored row per line, "row_index" = the row's
index in the benchmark file) and <name>.summary.json (videor1.eval.summarize: mean_acc, mean_mra,
n_failed, ...); summary.json holds every benchmark's summary and the table.

Resume: rows found in <name>.jsonl or in any <name>.rank<k>.jsonl part file are not answered again;
a torn (unparsable) line is dropped. While running, each rank appends its finished rows to its own
part file (flushed per batch); rank 0 merges the parts into <name>.jsonl before and after, so a run
resumes correctly under any number of ranks. run.json records the settings; resuming with other
settings (model, protocol, frames, tokens, sampling) is refused.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

from videor1 import distributed as D
from videor1 import eval as ev

# The columns of Video-R1's results table, in its order, with its headers.
VIDEO_R1_TABLE = ("vsibench", "videommmu", "mmvu", "mvbench", "tempcompass", "videomme")
TITLES = {"vsibench": "VSI-Bench", "videommmu": "VideoMMMU", "mmvu": "MMVU", "mvbench": "MVBench",
          "tempcompass": "TempCompass", "videomme": "VideoMME"}


def read_results(path: str) -> tuple[dict[int, dict], int]:
    """The results of a per-row JSONL by row_index, and how many lines were dropped (torn or
    without a row_index). A missing file reads as no results."""
    done: dict[int, dict] = {}
    dropped = 0
    if not os.path.exists(path):
        return done, 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                done[int(r["row_index"])] = r
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                dropped += 1
    return done, dropped


def part_files(out_dir: str, name: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out_dir, f"{name}.rank*.jsonl")))


def consolidate(out_dir: str, name: str) -> tuple[dict[int, dict], int]:
    """Merge <name>.jsonl and its part files into <name>.jsonl (rows in file order, torn lines
    dropped), atomically, then remove the parts. Rank 0 only. Returns (results, lines dropped)."""
    main = os.path.join(out_dir, f"{name}.jsonl")
    done, dropped = read_results(main)
    parts = part_files(out_dir, name)
    for part in parts:
        more, d = read_results(part)
        done.update(more)
        dropped += d
    tmp = f"{main}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i in sorted(done):
            f.write(json.dumps(done[i], ensure_ascii=False) + "\n")
    os.replace(tmp, main)
    for part in parts:
        os.remove(part)
    return done, dropped


def format_results_table(summaries: dict[str, dict], model: str, frames: int | None = None) -> str:
    """Video-R1's results table: one line per model, the benchmarks as columns (in its order), then
    the mean over them; accuracy in percent. A benchmark's cell is the mean score over all its rows
    (mean_acc, and for VSI-Bench mean_acc and mean_mra pooled by row count; the per-benchmark lines
    below give both)."""
    names = [n for n in VIDEO_R1_TABLE if n in summaries] + [n for n in summaries if n not in VIDEO_R1_TABLE]
    heads = [TITLES.get(n, n) for n in names] + ["Mean"]
    cells = [100 * summaries[n]["overall"] for n in names]
    label = f"{model}" + (f" ({frames} frames)" if frames else "")
    width = max(len(label), 5)
    lines = [f"{'Model':<{width}} | " + " | ".join(f"{h:>11}" for h in heads),
             "-" * (width + 1) + "|" + "|".join("-" * 13 for _ in heads),
             f"{label:<{width}} | " + " | ".join(f"{c:>11.1f}" for c in cells + [sum(cells) / max(1, len(cells))])]
    lines.append("")
    for n in names:
        s = summaries[n]
        acc = "-" if s["mean_acc"] is None else f"{100 * s['mean_acc']:.1f}"
        mra = f"  mean_mra {100 * s['mean_mra']:.1f} ({s['n_mra']} rows)" if s["n_mra"] else ""
        lines.append(f"{TITLES.get(n, n):<12} mean_acc {acc} ({s['n_acc']} rows){mra}; "
                     f"{s['n_failed']} rows with media not decoded (scored 0, counted)")
    return "\n".join(lines)


def benchmark_file(name: str, eval_dir: str | None, files: dict[str, str]) -> str:
    if name in files:
        return files[name]
    if not eval_dir:
        raise ValueError(f"no file for benchmark {name!r}: give --eval-dir or --file {name}=PATH")
    for ext in (".json", ".jsonl"):
        path = os.path.join(eval_dir, f"eval_{name}{ext}")
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"benchmark {name!r}: {os.path.join(eval_dir, f'eval_{name}.json')} not found")


def run_suite(model_dir: str, benchmarks, *, out_dir: str, eval_dir: str | None = None,
              files: dict[str, str] | None = None, data_root: str | None = None, data_cfg=None,
              protocol: str = "video-r1", frames: int | None = None, max_new_tokens: int | None = None,
              sampling: str | None = None, seed: int = 0, limit: int | None = None, batch_size: int = 16,
              quiet: bool = False, model=None, processor=None) -> dict | None:
    """Evaluate `benchmarks` (names of videor1.eval.BENCHMARKS) in turn, resuming from out_dir.
    Returns {"benchmarks": {name: summary}, "table": str} on rank 0, None elsewhere. `model` /
    `processor` skip loading from model_dir (tests pass stand-ins)."""
    files = dict(files or {})
    for name in benchmarks:
        if name not in ev.BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r}; known: {sorted(ev.BENCHMARKS)}")
    settings = ev.protocol_settings(protocol, data_cfg, frames=frames, max_new_tokens=max_new_tokens,
                                    sampling=sampling)
    record = {"model": os.path.abspath(model_dir), **ev.describe_settings(settings, seed=seed)}
    device = D.init_distributed()
    os.makedirs(out_dir, exist_ok=True)
    run_json = os.path.join(out_dir, "run.json")
    if D.is_main():
        if os.path.exists(run_json):
            with open(run_json, encoding="utf-8") as f:
                before = json.load(f)
            if before != record:
                diff = sorted(k for k in set(before) | set(record) if before.get(k) != record.get(k))
                raise SystemExit(f"{out_dir} holds results made with other settings ({', '.join(diff)}); "
                                 f"use another --out-dir or remove it")
        else:
            ev.write_json(run_json, record)
    D.barrier()
    if model is None:
        from videor1.model import load_model, load_processor

        model = load_model(model_dir, "float32" if device.type == "cpu" else "bfloat16").to(device).eval()
        processor = load_processor(model_dir)
    summaries: dict[str, dict] = {}
    for name in benchmarks:
        path = benchmark_file(name, eval_dir, files)
        rows = ev.load_benchmark(path, name)[:limit]
        root = data_root or eval_dir or os.path.dirname(os.path.abspath(path))
        if D.is_main():
            _, dropped = consolidate(out_dir, name)
            if dropped and not quiet:
                print(f"{name}: dropped {dropped} torn line(s) of an interrupted run")
        D.barrier()
        done, _ = read_results(os.path.join(out_dir, f"{name}.jsonl"))
        todo = [i for i in range(len(rows)) if i not in done]
        mine = todo[D.rank()::D.world_size()]
        if D.is_main() and not quiet:
            print(f"{name}: {len(rows)} rows, {len(rows) - len(todo)} already answered, {len(todo)} to answer "
                  f"over {D.world_size()} rank(s)")
        t0 = time.perf_counter()
        if mine:
            part = os.path.join(out_dir, f"{name}.rank{D.rank()}.jsonl")
            with open(part, "a", encoding="utf-8") as f:
                def append(indices, results):
                    for i, r in zip(indices, results):
                        f.write(json.dumps({**r, "row_index": mine[i], "benchmark": name}, ensure_ascii=False) + "\n")
                    f.flush()

                ev.evaluate(model, processor, [rows[i] for i in mine], settings["data"], root,
                            max_new_tokens=settings["max_new_tokens"], sampling=settings["sampling"],
                            seed=seed + D.rank(), progress=D.is_main() and not quiet, batch_size=batch_size,
                            protocol=protocol, on_results=append)
        D.barrier()
        if D.is_main():
            done, _ = consolidate(out_dir, name)
            results = [done[i] for i in range(len(rows)) if i in done]
            if len(results) != len(rows):
                raise RuntimeError(f"{name}: {len(rows) - len(results)} rows have no result after the run")
            summary = ev.summarize(results)
            summary.update(benchmark=name, file=os.path.abspath(path), seconds=time.perf_counter() - t0,
                           settings=record)
            ev.write_json(os.path.join(out_dir, f"{name}.summary.json"), summary)
            summaries[name] = summary
            if not quiet:
                acc = "-" if summary["mean_acc"] is None else f"{summary['mean_acc']:.4f}"
                print(f"{name}: mean_acc {acc}, mean_mra {summary['mean_mra']:.4f}, "
                      f"{summary['n_failed']} of {summary['n']} rows with media not decoded (scored 0)")
        D.barrier()
    if not D.is_main():
        return None
    table = format_results_table(summaries, os.path.basename(os.path.normpath(model_dir)),
                                 settings["data"].max_frames if protocol == "video-r1" else None)
    out = {"benchmarks": summaries, "table": table, "settings": record}
    ev.write_json(os.path.join(out_dir, "summary.json"), out)
    if not quiet:
        print(table)
    return out


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(prog="python -m videor1.eval_suite", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF checkpoint directory")
    ap.add_argument("--eval-dir", default=None, help="folder of Video-R1's eval_<name>.json files and their media")
    ap.add_argument("--benchmarks", default=",".join(VIDEO_R1_TABLE),
                    help=f"comma-separated, of {sorted(ev.BENCHMARKS)} (default: Video-R1's table)")
    ap.add_argument("--file", action="append", default=[], metavar="NAME=PATH", help="a benchmark's file")
    ap.add_argument("--data-root", default=None, help="media root (default: --eval-dir, else each file's folder)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--protocol", default="video-r1", choices=ev.PROTOCOLS)
    ap.add_argument("--frames", type=int, default=None, help="max frames per video: 16, 32 or 64 (default 16)")
    ap.add_argument("--config", default=None, help="base data section (video-r1 overrides its media settings)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the protocol's")
    ap.add_argument("--sampling", default=None, choices=("greedy", "video-r1"), help="default: the protocol's")
    ap.add_argument("--limit", type=int, default=None, help="only the first N rows of each benchmark")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    files = {}
    for item in args.file:
        name, sep, path = item.partition("=")
        if not sep:
            ap.error(f"--file takes NAME=PATH, got {item!r}")
        files[name] = path
    data_cfg = ev.load_config(args.config).data if args.config else None
    out = run_suite(args.model, [b for b in args.benchmarks.split(",") if b], out_dir=args.out_dir,
                    eval_dir=args.eval_dir, files=files, data_root=args.data_root, data_cfg=data_cfg,
                    protocol=args.protocol, frames=args.frames, max_new_tokens=args.max_new_tokens,
                    sampling=args.sampling, seed=args.seed, limit=args.limit, batch_size=args.batch_size)
    D.cleanup()
    return out


if __name__ == "__main__":
    main()
