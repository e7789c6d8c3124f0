"""Evaluate a checkpoint on a Video-R1-format JSON: answers, scores per problem type and source.

    python -m videor1.eval --model runs/demo/sft/final --data runs/demo/data/heldout.json \
        [--shuffle-frames] [--benchmark mmvu] [--out results.jsonl] [--config configs/tiny_cpu.yaml]
    torchrun --nproc_per_node=8 -m videor1.eval ...      # rows split over ranks, gathered on rank 0

Decoding is greedy by default; --sampling video-r1 uses Video-R1's evaluation setting (temperature
0.1, top_p 0.001). Scores follow Video-R1's evaluation: the <answer> text (the whole output when the
tags are missing) scored with our reward rules per problem type, and regression by Mean Relative
Accuracy over the thresholds 0.50, 0.55, ..., 0.95. --shuffle-frames evaluates on a random
permutation of each video's sampled frames (seeded), which removes the temporal signal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch

from videor1 import distributed as D
from videor1.config import Config, load_config
from videor1.data import DataError, extract_answer, load_rows, validate_row
from videor1.rewards import accuracy_reward

# Video-R1's evaluation sets (src/r1-v/Evaluation/eval_<name>.json) carry data_type, path,
# problem_type, problem, options, solution and benchmark-specific fields; the ones below group the
# table by the benchmark's own categories. Rows need no problem_id, process or data_source there.
BENCHMARKS = {
    "vsibench": ("question_type",),
    "videommmu": ("question_type", "category", "subject"),
    "mmvu": ("subject",),
    "mvbench": ("task_type", "question_type", "category"),
    "tempcompass": ("dim", "task_type", "question_type"),
    "videomme": ("duration", "domain", "task_type"),
}
EVAL_FIELDS = ("data_type", "path", "problem_type", "problem", "options", "solution")


def load_benchmark(path: str, benchmark: str | None = None) -> list[dict]:
    """Rows of an evaluation file as full Video-R1 rows (validated; errors name file, row, field).

    benchmark=None reads our own/training format (every field present). A benchmark name reads
    Video-R1's evaluation format: problem_id from "problem_id"/"id"/index, process "", data_source
    "<benchmark>/<category>" from the benchmark's category field when present.
    """
    if benchmark is None:
        return load_rows(path)
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {sorted(BENCHMARKS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"evaluation file not found: {path}")
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        raw = [json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl") else json.load(f)
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{name}: expected a non-empty JSON list of rows")
    rows = []
    for i, item in enumerate(raw):
        where = f"{name} row {i}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: a row must be a JSON object")
        for field in EVAL_FIELDS:
            if field not in item:
                raise DataError(f"{where}: missing field '{field}'")
        category = next((str(item[k]) for k in BENCHMARKS[benchmark] if item.get(k) not in (None, "")), None)
        row = {field: item[field] for field in EVAL_FIELDS}
        pid = item.get("problem_id", i)
        row["problem_id"] = pid if isinstance(pid, int) and not isinstance(pid, bool) else i
        row["process"] = item.get("process", "")
        row["data_source"] = item.get("data_source") or (f"{benchmark}/{category}" if category else benchmark)
        row["source_id"] = item.get("id", item.get("problem_id", i))
        rows.append(validate_row(row, where))
    return rows


def mean_relative_accuracy(pred: float, target: float, start: float = 0.5, end: float = 0.95,
                           interval: float = 0.05) -> float:
    """Fraction of thresholds t in start..end (step interval) with |pred - target| / |target| < 1 - t."""
    rel = abs(pred - target) / (abs(target) + 1e-8)
    n = int(round((end - start) / interval)) + 1
    return sum(rel < 1 - (start + k * interval) for k in range(n)) / n


def score(output: str, row: dict) -> float:
    """Video-R1's evaluation score of one model output (the whole output if it has no <answer>)."""
    answer = extract_answer(output) or output.strip()
    ptype = row["problem_type"]
    if ptype == "regression":
        try:
            pred = float(answer.replace(",", ""))
            target = float(extract_answer(row["solution"]).replace(",", ""))
        except ValueError:
            return 0.0
        return mean_relative_accuracy(pred, target)
    return accuracy_reward(f"<answer>{answer}</answer>", row["solution"], ptype)


def summarize(results: list[dict]) -> dict:
    """{"overall": mean, "by_type": {type: (n, mean)}, "by_source": {source: (n, mean)}}."""
    out = {"overall": sum(r["score"] for r in results) / max(1, len(results)), "n": len(results)}
    for key, field in (("by_type", "problem_type"), ("by_source", "data_source")):
        groups = defaultdict(list)
        for r in results:
            groups[r[field]].append(r["score"])
        out[key] = {k: (len(v), sum(v) / len(v)) for k, v in sorted(groups.items())}
    return out


def format_table(summary: dict, title: str) -> str:
    lines = [title, f"{'group':<40} {'n':>6} {'score':>8}"]
    for key in ("by_type", "by_source"):
        for name, (n, mean) in summary[key].items():
            lines.append(f"{name:<40} {n:>6} {mean:>8.3f}")
        lines.append("-" * 56)
    lines.append(f"{'overall':<40} {summary['n']:>6} {summary['overall']:>8.3f}")
    return "\n".join(lines)


def _left_padded(prompts: list, shuffle_frames: bool, pad_id: int) -> dict:
    """generate() kwargs for a batch of prompts of one data_type: input_ids / attention_mask [B, P]
    left-padded to the longest prompt, and the samples' vision tensors concatenated in order."""
    length = max(p.input_ids.numel() for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        n = p.input_ids.numel()
        ids[i, length - n:], attn[i, length - n:] = p.input_ids, 1
    visions = [p.shuffled_vision if (shuffle_frames and p.shuffled_vision is not None) else p.vision for p in prompts]
    batch = {"input_ids": ids, "attention_mask": attn}
    for key in visions[0]:
        batch[key] = torch.cat([v[key] for v in visions])
    return batch


@torch.no_grad()
def evaluate(model, processor, rows: list[dict], data_cfg, data_root: str, *, shuffle_frames: bool = False,
             max_new_tokens: int = 256, sampling: str = "greedy", seed: int = 0, progress: bool = True,
             batch_size: int = 16) -> list[dict]:
    """Answer and score `rows` with an HF model (no engine: evaluation holds one full copy per rank).

    Rows are answered `batch_size` at a time (left-padded prompts of one data_type per batch); the
    results keep the rows' order. A row whose media cannot be decoded scores 0 with an "error" field.
    """
    from videor1.generation import sampling_config
    from videor1.policy import with_mm_token_types
    from videor1.rollout import Prompt, completion_mask, prepare_prompt, vision_token_ids
    from videor1.session import special_ids
    from videor1.vision import MediaDecodeError

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tok = processor.tokenizer
    eos_ids, pad_id = special_ids(tok)
    gen = torch.Generator().manual_seed(seed)
    # Built from these arguments alone: nothing is inherited from the checkpoint's generation_config.json.
    sample = dict(do_sample=False) if sampling == "greedy" else dict(do_sample=True, temperature=0.1, top_p=0.001)
    gen_cfg = sampling_config(max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                              suppress_ids=vision_token_ids(tok), **sample)
    device = next(model.parameters()).device
    results: list[dict | None] = [None] * len(rows)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), desc="eval (shuffled frames)" if shuffle_frames else "eval", dynamic_ncols=True,
                   leave=False)
    pending: dict[str, list[tuple[int, Prompt]]] = {}  # data_type -> prompts waiting for a full batch

    def answer(batch: list[tuple[int, Prompt]]) -> None:
        inputs = _left_padded([p for _, p in batch], shuffle_frames, pad_id)
        inputs = with_mm_token_types({k: v.to(device) for k, v in inputs.items()}, model.config)  # one crossing in
        out = model.generate(**inputs, generation_config=gen_cfg, synced_gpus=False)
        completion = out[:, inputs["input_ids"].shape[1]:].cpu()  # and one out
        masks = completion_mask(completion, eos_ids).bool() if completion.shape[1] else None
        for j, (i, p) in enumerate(batch):
            ids = completion[j][masks[j]].tolist() if masks is not None else []
            text = tok.decode(ids, skip_special_tokens=True)
            results[i] = {**p.row, "output": text, "prediction": extract_answer(text) or text.strip(),
                          "score": score(text, p.row), "shuffled_frames": shuffle_frames}
        if bar is not None:
            bar.update(len(batch))

    for i, row in enumerate(rows):
        try:
            p: Prompt = prepare_prompt(row, processor, data_cfg, data_root, shuffled=shuffle_frames, generator=gen)
        except (MediaDecodeError, FileNotFoundError) as e:
            results[i] = {**row, "output": "", "score": 0.0, "error": str(e)}
            if bar is not None:
                bar.update(1)
            continue
        waiting = pending.setdefault(row["data_type"], [])
        waiting.append((i, p))
        if len(waiting) == batch_size:
            answer(waiting)
            pending[row["data_type"]] = []
    for waiting in pending.values():
        if waiting:
            answer(waiting)
    if bar is not None:
        bar.close()
    return results


def run(model_dir: str, data_file: str, *, data_cfg=None, data_root: str | None = None, benchmark: str | None = None,
        shuffle_frames: bool = False, out_file: str | None = None, max_new_tokens: int = 256,
        sampling: str = "greedy", seed: int = 0, limit: int | None = None, quiet: bool = False,
        batch_size: int = 16) -> dict | None:
    """Evaluate on every row (split over ranks when distributed); rank 0 writes the JSONL and returns
    the summary (other ranks return None)."""
    from videor1.model import load_model, load_processor

    data_cfg = data_cfg or Config().data
    rows = load_benchmark(data_file, benchmark)[:limit]
    data_root = data_root or os.path.dirname(os.path.abspath(data_file))
    device = D.init_distributed()
    model = load_model(model_dir, "float32" if device.type == "cpu" else "bfloat16").to(device).eval()
    processor = load_processor(model_dir)
    mine = rows[D.rank()::D.world_size()]
    t0 = time.perf_counter()
    results = evaluate(model, processor, mine, data_cfg, data_root, shuffle_frames=shuffle_frames,
                       max_new_tokens=max_new_tokens, sampling=sampling, seed=seed + D.rank(),
                       progress=D.is_main() and not quiet, batch_size=batch_size)
    parts = D.all_gather_objects(results)
    if not D.is_main():
        return None
    world = len(parts)
    gathered = [parts[i % world][i // world] for i in range(len(rows))]  # back to the file's row order
    if out_file:
        os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
        with open(out_file, "w", encoding="utf-8") as f:
            for r in gathered:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    summary = summarize(gathered)
    summary["seconds"] = time.perf_counter() - t0
    if not quiet:
        frames = "shuffled frames" if shuffle_frames else "ordered frames"
        print(format_table(summary, f"{os.path.basename(data_file)} on {frames} ({model_dir})"))
    return summary


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(prog="python -m videor1.eval", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF checkpoint directory")
    ap.add_argument("--data", required=True, help="Video-R1-format JSON / JSONL")
    ap.add_argument("--data-root", default=None, help="media paths resolve against this (default: the file's folder)")
    ap.add_argument("--benchmark", default=None, choices=sorted(BENCHMARKS), help="read Video-R1's eval format")
    ap.add_argument("--config", default=None, help="take frame sampling and pixel limits from this config's data section")
    ap.add_argument("--shuffle-frames", action="store_true")
    ap.add_argument("--sampling", default="greedy", choices=("greedy", "video-r1"))
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts answered together (left-padded)")
    ap.add_argument("--out", default=None, help="per-row JSONL output")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    data_cfg = load_config(args.config).data if args.config else Config().data
    summary = run(args.model, args.data, data_cfg=data_cfg, data_root=args.data_root, benchmark=args.benchmark,
                  shuffle_frames=args.shuffle_frames, out_file=args.out, max_new_tokens=args.max_new_tokens,
                  sampling=args.sampling, seed=args.seed, limit=args.limit,
                  batch_size=args.batch_size)
    D.cleanup()
    return summary


if __name__ == "__main__":
    main()
