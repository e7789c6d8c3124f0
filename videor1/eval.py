"""Evaluate a checkpoint on a Video-R1-format JSON: answers, scores per problem type and source.

    python -m videor1.eval --model runs/demo/sft/final --data runs/demo/data/heldout.json \
        [--shuffle-frames] [--benchmark mmvu] [--out results.jsonl] [--config configs/tiny_cpu.yaml]
    torchrun --nproc_per_node=8 -m videor1.eval ...      # rows split over ranks, gathered on rank 0

Two protocols (--protocol; the default is video-r1 when --benchmark is given, ours otherwise):

  ours      greedy decoding, 256 new tokens, the training prompt, the media settings of --config (or
            the defaults); the <answer> text (the whole output when the tags are missing) scored
            with our reward rules per problem type (OCR by WER, free-form by ROUGE), regression by
            Mean Relative Accuracy over the thresholds 0.50, 0.55, ..., 0.95.
  video-r1  Video-R1's src/eval_bench.py: its evaluation prompt ("... between the <think> and
            </think> tags ..."), 1024 new tokens, temperature 0.1 / top_p 0.001, videos at 2 fps,
            4 to --frames (16, 32 or 64) frames of 128*28*28 to 256*28*28 pixels, images of
            4*28*28 to 256*28*28 pixels (its qwen-vl-utils as its README sets it for inference);
            scores by its reward_fn: multiple choice strict letter match, numerical by its decimal
            and 2-decimal rule, regression by MRA, OCR and free-form 0. The summary reports
            mean_acc (every row but regression) and mean_mra (regression rows) separately.

A row whose media cannot be decoded scores 0 and stays in the denominator (Video-R1 replaces a
failed batch's outputs with "<answer>error</answer>", which scores 0 and is counted); such rows are
counted as "n_failed" (with their paths under "failed") in the summary and on the console.
--out writes the per-row JSONL and, beside it, <out without .jsonl>.summary.json.
--shuffle-frames evaluates on a random permutation of each video's sampled frames (seeded), which
removes the temporal signal. python -m videor1.eval_suite runs several benchmarks (resumable).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections import defaultdict

import torch

from videor1 import distributed as D
from videor1.config import Config, load_config
from videor1.data import DataError, extract_answer, load_rows, validate_row
from videor1.rewards import _to_float, accuracy_reward

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
PROTOCOLS = ("ours", "video-r1")
VIDEO_R1_MAX_NEW_TOKENS = 1024  # eval_bench.py: SamplingParams(max_tokens=1024)
VIDEO_R1_FRAMES = (16, 32, 64)  # the frame counts of Video-R1's tables


def video_r1_data_config(data_cfg=None, frames: int = 16):
    """A copy of `data_cfg` (default: Config().data) with Video-R1's evaluation media settings: its
    qwen-vl-utils (FPS 2.0, FPS_MIN_FRAMES 4, FPS_MAX_FRAMES = `frames`, VIDEO_MIN_PIXELS 128*28*28,
    VIDEO_MAX_PIXELS raised to 256*28*28 for inference, images MIN_PIXELS 4*28*28 / MAX_PIXELS
    256*28*28), and second_per_grid_ts 2 / fps (vLLM gets the sampled fps there)."""
    if frames < 2:
        raise ValueError(f"frames must be >= 2, got {frames}")
    cfg = copy.deepcopy(data_cfg if data_cfg is not None else Config().data)
    cfg.fps, cfg.min_frames, cfg.max_frames = 2.0, 4, int(frames)
    cfg.video_min_pixels, cfg.video_max_pixels = 128 * 28 * 28, 256 * 28 * 28
    cfg.image_min_pixels, cfg.image_max_pixels = 4 * 28 * 28, 256 * 28 * 28
    # Its fetch_video bound: max(min(VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS / T * 2), 1.05 * VIDEO_MIN_PIXELS)
    # = 256*28*28 for T <= 64 (the "qwen_vl_utils" mode; "fixed" gives the same bounds here).
    cfg.video_pixels, cfg.video_total_pixels = "qwen_vl_utils", int(128000 * 28 * 28 * 0.9)
    cfg.second_per_grid_ts = "fps"  # 2 / sample fps: vLLM is given the sampled fps in eval_bench.py
    return cfg


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
    """Fraction of thresholds t in start..end (step interval) with |pred - target| / (|target| + 1e-8)
    < 1 - t, computed in float32 as Video-R1's eval_bench.py does (so ties at a threshold agree)."""
    pred_t = torch.tensor(pred, dtype=torch.float32)
    target_t = torch.tensor(target, dtype=torch.float32)
    rel = torch.abs(pred_t - target_t) / (torch.abs(target_t) + 1e-8)
    thresholds = torch.arange(start, end + interval / 2, interval, dtype=torch.float32)
    return (rel < (1 - thresholds)).float().mean().item()


def score_video_r1(output: str, row: dict) -> float:
    """Video-R1's evaluation score (eval_bench.py reward_fn): the <answer> text, or the whole output
    when it has none; multiple choice and numerical by its reward rules exactly (our accuracy_reward
    with video_r1_compat: strict stripped match; 0 when exactly one side has "." or ",", else 1 when
    both agree rounded to 2 decimals); regression MRA; OCR, free-form and anything else 0."""
    answer = extract_answer(output) or output
    ptype = row["problem_type"]
    if ptype in ("multiple choice", "numerical"):
        return accuracy_reward(f"<answer>{answer}</answer>", row.get("solution", ""), ptype, video_r1_compat=True)
    if ptype == "regression":
        g, o = _to_float(extract_answer(row.get("solution", "")), True), _to_float(answer, True)
        return 0.0 if g is None or o is None else mean_relative_accuracy(o, g)
    return 0.0


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
    """{"overall": mean, "n", "by_type": {type: (n, mean)}, "by_source": {source: (n, mean)},
    "mean_acc" (rows but regression; None without any), "n_acc", "mean_mra" (regression rows; 0.0
    without any, as Video-R1), "n_mra", "n_failed", "failed": [{problem_id, path, error}]}.
    Rows whose media failed to decode score 0 and are counted in every mean."""
    out = {"overall": sum(r["score"] for r in results) / max(1, len(results)), "n": len(results)}
    acc = [r["score"] for r in results if r["problem_type"] != "regression"]
    mra = [r["score"] for r in results if r["problem_type"] == "regression"]
    out["mean_acc"] = sum(acc) / len(acc) if acc else None
    out["n_acc"] = len(acc)
    out["mean_mra"] = sum(mra) / len(mra) if mra else 0.0
    out["n_mra"] = len(mra)
    failed = [r for r in results if r.get("error")]
    out["n_failed"] = len(failed)
    out["failed"] = [{"problem_id": r.get("problem_id"), "path": r.get("path"), "error": r["error"]} for r in failed]
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
    if summary.get("mean_acc") is not None:
        lines.append(f"{'mean_acc (without regression)':<40} {summary['n_acc']:>6} {summary['mean_acc']:>8.3f}")
    if summary.get("n_mra"):
        lines.append(f"{'mean_mra (regression)':<40} {summary['n_mra']:>6} {summary['mean_mra']:>8.3f}")
    if summary.get("n_failed"):
        lines.append(f"{'media not decoded (scored 0, counted)':<40} {summary['n_failed']:>6}")
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
             batch_size: int = 16, protocol: str = "ours", on_results=None) -> list[dict]:
    """Answer and score `rows` with an HF model (no engine: evaluation holds one full copy per rank).

    Rows are answered `batch_size` at a time (left-padded prompts of one data_type per batch); the
    results keep the rows' order. A row whose media cannot be decoded scores 0 with an "error" field
    ("failed": true). protocol "video-r1" asks with Video-R1's evaluation prompt and scores by its
    rules (score_video_r1); sampling and media settings are the caller's (run() sets them).
    on_results(indices, results), when given, is called as rows finish (indices into `rows`), e.g.
    to append them to a file.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "video-r1":
        from videor1.prompts import EVAL_TEMPLATE_KEY

        rows = [{**row, EVAL_TEMPLATE_KEY: "video-r1-eval"} for row in rows]
    score_fn = score_video_r1 if protocol == "video-r1" else score
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
            value = score_fn(text, p.row)
            results[i] = {**p.row, "output": text, "prediction": extract_answer(text) or text.strip(),
                          "score": value, "correct": value == 1.0, "shuffled_frames": shuffle_frames}
        if on_results is not None:
            on_results([i for i, _ in batch], [results[i] for i, _ in batch])
        if bar is not None:
            bar.update(len(batch))

    for i, row in enumerate(rows):
        try:
            p: Prompt = prepare_prompt(row, processor, data_cfg, data_root, shuffled=shuffle_frames, generator=gen)
        except (MediaDecodeError, FileNotFoundError) as e:
            results[i] = {**row, "output": "", "prediction": "", "score": 0.0, "correct": False,
                          "shuffled_frames": shuffle_frames, "failed": True, "error": str(e)}
            if on_results is not None:
                on_results([i], [results[i]])
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
        shuffle_frames: bool = False, out_file: str | None = None, max_new_tokens: int | None = None,
        sampling: str | None = None, seed: int = 0, limit: int | None = None, quiet: bool = False,
        batch_size: int = 16, protocol: str = "ours", frames: int | None = None) -> dict | None:
    """Evaluate on every row (split over ranks when distributed); rank 0 writes the JSONL (and the
    summary JSON beside it) and returns the summary (other ranks return None).

    protocol "ours": max_new_tokens 256 and greedy unless given, media as `data_cfg` (frames, when
    given, sets its max_frames). protocol "video-r1": 1024 tokens and Video-R1's sampling unless
    given, media as video_r1_data_config(data_cfg, frames or 16)."""
    from videor1.model import load_model, load_processor

    settings = protocol_settings(protocol, data_cfg, frames=frames, max_new_tokens=max_new_tokens,
                                 sampling=sampling)
    data_cfg, max_new_tokens, sampling = settings["data"], settings["max_new_tokens"], settings["sampling"]
    rows = load_benchmark(data_file, benchmark)[:limit]
    data_root = data_root or os.path.dirname(os.path.abspath(data_file))
    device = D.init_distributed()
    model = load_model(model_dir, "float32" if device.type == "cpu" else "bfloat16").to(device).eval()
    processor = load_processor(model_dir)
    mine = rows[D.rank()::D.world_size()]
    t0 = time.perf_counter()
    results = evaluate(model, processor, mine, data_cfg, data_root, shuffle_frames=shuffle_frames,
                       max_new_tokens=max_new_tokens, sampling=sampling, seed=seed + D.rank(),
                       progress=D.is_main() and not quiet, batch_size=batch_size, protocol=protocol)
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
    summary["settings"] = describe_settings(settings, shuffle_frames=shuffle_frames)
    if out_file:
        write_json(summary_path(out_file), summary)
    if not quiet:
        order = "shuffled frames" if shuffle_frames else "ordered frames"
        print(format_table(summary, f"{os.path.basename(data_file)} on {order} ({model_dir}, protocol {protocol})"))
        if summary["n_failed"]:
            print(f"{summary['n_failed']} of {summary['n']} rows: media not decoded (scored 0, counted in the means); "
                  f"first: {summary['failed'][0]['path']}: {summary['failed'][0]['error']}")
    return summary


def protocol_settings(protocol: str, data_cfg=None, *, frames: int | None = None, max_new_tokens: int | None = None,
                      sampling: str | None = None) -> dict:
    """{"protocol", "data": DataConfig, "max_new_tokens", "sampling"} of a protocol, explicit arguments winning."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "video-r1":
        data = video_r1_data_config(data_cfg, frames or VIDEO_R1_FRAMES[0])
        default_tokens, default_sampling = VIDEO_R1_MAX_NEW_TOKENS, "video-r1"
    else:
        data = copy.deepcopy(data_cfg) if data_cfg is not None else Config().data
        if frames:
            data.max_frames = int(frames)
        default_tokens, default_sampling = 256, "greedy"
    return {"protocol": protocol, "data": data, "max_new_tokens": max_new_tokens or default_tokens,
            "sampling": sampling or default_sampling}


def describe_settings(settings: dict, **extra) -> dict:
    """The JSON-able record of an evaluation's settings (written into its summary)."""
    import dataclasses

    data = dataclasses.asdict(settings["data"]) if dataclasses.is_dataclass(settings["data"]) else dict(settings["data"])
    data = {k: v for k, v in data.items() if k not in ("train_file", "data_root")}
    sample = ({"do_sample": True, "temperature": 0.1, "top_p": 0.001} if settings["sampling"] == "video-r1"
              else {"do_sample": False})
    return {"protocol": settings["protocol"], "max_new_tokens": settings["max_new_tokens"],
            "sampling": settings["sampling"], **sample, "data": data, **extra}


def summary_path(out_file: str) -> str:
    """The summary JSON beside a per-row JSONL: results.jsonl -> results.summary.json."""
    base = out_file[:-len(".jsonl")] if out_file.endswith(".jsonl") else out_file
    return base + ".summary.json"


def write_json(path: str, obj) -> None:
    """Write JSON atomically (a temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(prog="python -m videor1.eval", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF checkpoint directory")
    ap.add_argument("--data", required=True, help="Video-R1-format JSON / JSONL")
    ap.add_argument("--data-root", default=None, help="media paths resolve against this (default: the file's folder)")
    ap.add_argument("--benchmark", default=None, choices=sorted(BENCHMARKS), help="read Video-R1's eval format")
    ap.add_argument("--config", default=None, help="take frame sampling and pixel limits from this config's data section")
    ap.add_argument("--shuffle-frames", action="store_true")
    ap.add_argument("--protocol", default=None, choices=PROTOCOLS,
                    help="video-r1: Video-R1's eval_bench.py (prompt, 1024 tokens, sampling, pixels, scoring); "
                         "ours: greedy, 256 tokens, --config's media. Default: video-r1 with --benchmark, else ours")
    ap.add_argument("--frames", type=int, default=None,
                    help="max frames per video (video-r1: 16, 32 or 64 as its tables; default 16)")
    ap.add_argument("--sampling", default=None, choices=("greedy", "video-r1"), help="default: the protocol's")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the protocol's (256 / 1024)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts answered together (left-padded)")
    ap.add_argument("--out", default=None, help="per-row JSONL output")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    data_cfg = load_config(args.config).data if args.config else Config().data
    protocol = args.protocol or ("video-r1" if args.benchmark else "ours")
    summary = run(args.model, args.data, data_cfg=data_cfg, data_root=args.data_root, benchmark=args.benchmark,
                  shuffle_frames=args.shuffle_frames, out_file=args.out, max_new_tokens=args.max_new_tokens,
                  sampling=args.sampling, seed=args.seed, limit=args.limit,
                  batch_size=args.batch_size, protocol=protocol, frames=args.frames)
    D.cleanup()
    return summary


if __name__ == "__main__":
    main()
