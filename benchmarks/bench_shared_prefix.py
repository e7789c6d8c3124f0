"""Benchmark: the shared-prefix forward vs the repeated one, on the CPU, one run, side by side.

One prompt group at a shape wider than the demo's: a Qwen2.5-VL with text hidden 256, 4 layers
(4 heads, 2 KV heads, MLP 1024), vision hidden 128 and depth 4; a video prompt of 16 frames at
224x224 (grid 8 x 16 x 16: 2048 patches, 512 video tokens) in 540 prompt tokens; G = 8 completions
of 64 tokens. Providers:

  repeated  G sequences [prompt; c_i]: the vision tower and the prompt G times (train.shared_prefix false)
  shared    one packed sequence [prompt; c1; ...; cG]: the vision tower and the prompt once (the default)

Modes: policy (PolicyModule mode="loss" with reference log-probs, beta 0.04, forward + backward)
and reference (mode="logprobs", no grad). Metrics: time (p50 / p20 / p80 over --reps runs,
providers interleaved) and peak_mem_mb: the peak of torch-allocated bytes above the start of one
call (the CPU allocator's events under torch.profiler(profile_memory=True)), measured after a warm-up
call so the parameter gradients already exist: activations and temporaries. A x_vs_repeated row per
mode gives repeated / shared for each metric. Numbers, not tests; CPU float results and times
depend on the machine (AMD EPYC vs Intel Xeon).

    python benchmarks/bench_shared_prefix.py [--reps 5] [--threads 2] [--quick]
    python benchmarks/bench_shared_prefix.py --device cuda --dtype bfloat16 --tag cuda_<gpu>   # `make gpu-check`

Writes benchmarks/results/shared_prefix_cpu.csv (--quick: shared_prefix_cpu_quick.csv; --tag T:
shared_prefix_T.csv). On CUDA, times are synchronised wall times and peak_mem_mb is
torch.cuda.max_memory_allocated above the start of the call.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import cpu_name, write_csv  # noqa: E402

from videor1.forward import build_inputs  # noqa: E402
from videor1.policy import PolicyModule  # noqa: E402
from videor1.rollout import Prompt  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
FIELDS = ["kernel", "provider", "mode", "metric", "shape", "p50", "p20", "p80", "device", "threads", "versions"]
SIZES = dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024, vision_hidden=128, vision_depth=4,
             vision_heads=4, vision_intermediate=512)
QUICK_SIZES = dict(SIZES, hidden=64, layers=2, intermediate=256, vision_hidden=64, vision_depth=2)


def build_model(sizes: dict):
    """A randomly initialised Qwen2.5-VL of `sizes` (videor1.tiny's config and init), fp32, SDPA, train mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from videor1.mrope import install_original_rope_index
    from videor1.tiny import lecun_init_, tiny_config, tokenizer_corpus, train_tokenizer

    tok = train_tokenizer(tokenizer_corpus(), 1024)
    config = tiny_config(tok, **sizes)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).float()
    lecun_init_(model)
    return install_original_rope_index(model).train(), config


def video_group(config, frames: int, side: int, text: int, G: int, C: int):
    """A Prompt (text, one video of `frames` frames side x side, text) and G random completions of C tokens."""
    g = torch.Generator().manual_seed(1)
    grid = torch.tensor([[frames // 2, side // 14, side // 14]])
    video_tokens = int(grid.prod()) // 4
    before = torch.randint(10, 500, (text // 2,), generator=g)
    after = torch.randint(10, 500, (text - text // 2,), generator=g)
    ids = torch.cat([before, torch.tensor([config.vision_start_token_id]),
                     torch.full((video_tokens,), config.video_token_id), torch.tensor([config.vision_end_token_id]), after])
    vision = {"pixel_values_videos": torch.randn(int(grid.prod()), 1176, generator=g), "video_grid_thw": grid,
              "second_per_grid_ts": torch.tensor([0.25])}
    prompt = Prompt(row={"data_type": "video"}, input_ids=ids, vision=vision)
    completions = torch.randint(10, 500, (G, C), generator=g)
    return prompt, completions, video_tokens


def peak_bytes(fn, device: str) -> int:
    """Peak torch-allocated bytes above the start during fn(): on the CPU from the allocator's events,
    on CUDA from the caching allocator's peak statistic."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a smaller model and video, 2 reps: a smoke run")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--tag", default=None, help="results file shared_prefix_<tag>.csv (default cpu / cpu_quick)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes, frames, side, reps = (QUICK_SIZES, 8, 112, 2) if args.quick else (SIZES, 16, 224, args.reps)
    G, C, text = 8, 64, 26
    dev, dtype = args.device, getattr(torch, args.dtype)
    model, config = build_model(sizes)
    model = model.to(dev, dtype)
    policy = PolicyModule(model, kernel_backend="torch" if dev == "cpu" else "auto")
    prompt, completions, video_tokens = video_group(config, frames, side, text, G, C)
    prompt = prompt.to(dev)
    prompt.vision["pixel_values_videos"] = prompt.vision["pixel_values_videos"].to(dtype)
    completions = completions.to(dev)
    mask = torch.ones_like(completions)
    P = prompt.input_ids.numel()
    adv = torch.linspace(-1, 1, G, device=dev)
    ref = torch.full((G, C), -6.0, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    inputs = {name: build_inputs(prompt, completions, mask, shared=name == "shared") for name in ("repeated", "shared")}

    def policy_call(name):
        loss, _ = policy(inputs[name], P, completions, mode="loss", advantages=adv, completion_mask=mask,
                         loss_kwargs=dict(beta=0.04, ref_logprobs=ref))
        loss.backward()

    def reference_call(name):
        with torch.no_grad():
            policy(inputs[name], P, completions, mode="logprobs", completion_mask=mask)

    calls = {"policy": policy_call, "reference": reference_call}
    device = torch.cuda.get_device_name() if dev == "cuda" else f"{cpu_name()} ({os.cpu_count()} cores), no GPU"
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    shape = f"P={P} ({video_tokens} video tokens) G={G} C={C} hidden={sizes['hidden']} layers={sizes['layers']} " \
            f"vision_depth={sizes['vision_depth']} {args.dtype}"
    print(f"[{device}] {shape}, {args.threads} threads, {reps} reps", flush=True)
    rows, summary = [], {}
    for mode, call in calls.items():
        for name in ("repeated", "shared"):  # warm-up: the gradients exist before anything is measured
            call(name)
        times = {"repeated": [], "shared": []}
        for _ in range(reps):
            for name in ("repeated", "shared"):
                sync()
                t = time.perf_counter()
                call(name)
                sync()
                times[name].append(time.perf_counter() - t)
        peaks = {name: peak_bytes(lambda: call(name), dev) for name in ("repeated", "shared")}
        for name in ("repeated", "shared"):
            ts = sorted(times[name])
            q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [ts[0]] * 4
            common = dict(kernel="shared_prefix", provider=name, mode=mode, shape=shape, device=device,
                          threads=args.threads, versions=versions)
            rows.append(dict(common, metric="time_ms", p50=f"{statistics.median(ts) * 1e3:.1f}",
                             p20=f"{q[0] * 1e3:.1f}", p80=f"{q[3] * 1e3:.1f}"))
            rows.append(dict(common, metric="peak_mem_mb", p50=f"{peaks[name] / 2**20:.1f}", p20="", p80=""))
            summary[(mode, name)] = (statistics.median(ts), peaks[name])
        speed = summary[(mode, "repeated")][0] / summary[(mode, "shared")][0]
        memory = summary[(mode, "repeated")][1] / max(1, summary[(mode, "shared")][1])
        common = dict(kernel="shared_prefix", provider="shared", mode=mode, shape=shape, device=device,
                      threads=args.threads, versions=versions)
        rows.append(dict(common, metric="x_vs_repeated_time", p50=f"{speed:.2f}", p20="", p80=""))
        rows.append(dict(common, metric="x_vs_repeated_peak_mem", p50=f"{memory:.2f}", p20="", p80=""))
        print(f"{mode:9s} repeated {summary[(mode, 'repeated')][0] * 1e3:8.1f} ms {summary[(mode, 'repeated')][1] / 2**20:8.1f} MB"
              f" | shared {summary[(mode, 'shared')][0] * 1e3:8.1f} ms {summary[(mode, 'shared')][1] / 2**20:8.1f} MB"
              f" | {speed:.2f}x faster, {memory:.2f}x less peak memory", flush=True)
    tag = args.tag or ("cpu_quick" if args.quick else "cpu")
    path = os.path.join(args.out, f"shared_prefix_{tag}.csv")
    return write_csv(path, rows, FIELDS)


if __name__ == "__main__":
    main()
