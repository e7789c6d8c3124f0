"""Benchmark: the GRPO loss (forward, forward+backward) on logits and fused with the lm_head.

Kernels and providers:
  grpo_loss         input logits [B, L+1, V] (a model's output; the loss reads logits[:, :-1])
      torch-eager      TRL-style: logits / T -> log_softmax -> gather, then the GRPO math (autograd)
      torch-compile    torch.compile of torch-eager
      liger-triton     Liger's triton_grpo_loss (inplace=False)                        [CUDA only]
      ours-logits      kernels.grpo_loss on the full logits (Triton on CUDA; the chunked torch path on the CPU)
  linear_grpo_loss  input hidden [B, L, H] and the lm_head weight [V, H]
      torch-eager      hidden @ weight.T, then torch-eager above
      torch-compile    torch.compile of it
      liger-chunked    Liger's LigerFusedLinearGRPOLoss (compiled=True on CUDA, False on the CPU)
      trl-chunked      TRL's fused LM head (trl.kernels.chunked_logprob.ChunkedLogProbFunction, TRL 1.16) as
                       GRPOTrainer calls it: the counted rows compacted (hidden[mask], ids[mask]), vocabulary
                       tiles of 32768 (cuBLAS/MKL; a Triton fold on CUDA, torch elsewhere; fp32 statistics),
                       log-probs only (outputs=(): no entropy), scattered back into [B, L] zeros
                       (masked_scatter); then the GRPO loss in torch on those log-probs (as torch-eager).
                       TRL itself compacts only on Triton devices (CUDA/XPU): elsewhere it scores every
                       position; the provider compacts everywhere, so the CPU rows show the GPU algorithm
      ours-linear      kernels.linear_grpo_loss (cuBLAS/MKL GEMMs per chunk + Triton/torch epilogue)
Loss settings: Video-R1's (grpo, token level, beta 0.04, eps 0.2/0.2, kl_clamp 10, T = 1), old and ref
log-probs given.

Completion masks (--mask; every provider gets the same ones; the shape column ends in "counted=F", the
fraction of the B*L tokens counted):
  full   every token counted (counted=1.00)
  grpo   a right-padded GRPO batch: sequence i's completion has length ceil(L * (i + 1/2) / B) (the B
         quantiles of a uniform length over [1, L], shuffled over the sequences by a seeded permutation),
         the rest of its L positions padding. GRPO completions of one batch spread from a few tokens to the
         max_completion_length; a uniform spread is the plain model of that, and quantiles rather than
         random draws keep the counted fraction at 0.50 for every B (a batch of B = 2..16 random lengths
         would count anywhere from 0.3 to 0.7 and make the ratios noise). Padding positions hold a valid
         id (V - 1): GRPOTrainer pads completion_ids with the tokenizer's pad_token_id, a real token, and
         torch-eager's and Liger's gathers need ids in [0, V). Hidden states, logits and old/ref
         log-probs at padding positions are the same random values as at counted ones.
  both   (default) grpo then full in one run, side by side: the ratios of the summary come from one run
After the run a summary prints ratios of p50s from this run: ours at the grpo mask / ours at the full
mask, and every other provider / ours at the same mask (time; CPU time on the CPU; peak memory).

Shapes: Qwen2.5-VL-7B, H = 3584, V = 152064, completions of L = 1024 tokens, B*L in {2048, 4096, 8192,
16384}, bf16 on CUDA. On the CPU (no GPU): B*L = 4096 in fp32 (the shape of issue 3's CPU numbers);
--quick uses small shapes.

Metrics (one CSV row each, p50/p20/p80 over repeats):
  time_ms       wall time of one call (CUDA: triton.testing.do_bench; CPU: perf_counter, few repeats:
                a full-size CPU fwd+bwd takes over a minute)
  peak_mem_mb   peak memory allocated by torch during the call, above what existed before it (the
                inputs). CUDA: torch.cuda.max_memory_allocated. CPU: torch's profiler records every
                allocation and free of the CPU allocator (profile_memory=True); the peak of their
                running sum is the exact peak of torch-allocated bytes (tracemalloc cannot see them).
  grad_mem_mb   bytes of the gradients the call leaves behind (d_hidden, d_weight or d_logits)
  extra_mem_mb  peak_mem_mb - grad_mem_mb: memory beyond inputs and gradients
  cpu_time_ms   CPU only: process CPU time of the call (all threads); on a machine shared with other
                processes it compares providers more fairly than wall time
  peak_rss_mb   CPU cross-check: rise of the process's peak resident set size during the same call
                (VmHWM after resetting it through /proc/self/clear_refs); includes allocator slack
                and MKL's own buffers, so it is >= peak_mem_mb
Writes benchmarks/results/grpo_loss_<tag>.csv and .png. Numbers, not tests.

    python benchmarks/bench_grpo_loss.py            # CUDA if present, else the CPU run (~30 min on 2 cores)
    python benchmarks/bench_grpo_loss.py --quick    # small shapes, minutes
    python benchmarks/bench_grpo_loss.py --sizes 8192 --time-box 60   # what `make gpu-check` runs

--time-box SECONDS (the GPU check's mode): one measurement at a time, most important first (fwd+bwd
before fwd; ours, then torch eager, then the baselines that compile first (Liger, torch.compile);
trl-chunked before Liger before torch.compile; linear_grpo_loss before grpo_loss; at one size the grpo mask
before the full one), and no new measurement starts once SECONDS have passed; what was not measured is
written as a "time-box" row. Providers whose package is missing (Liger, TRL) are skipped with a row saying so.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import re
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import kernels  # noqa: E402
from kernels.reference import reference_grpo_from_logprobs  # noqa: E402

FIELDS = ["kernel", "provider", "mode", "metric", "shape", "p50", "p20", "p80", "device", "versions", "note"]
LOSS_KW = dict(beta=0.04, eps_low=0.2, eps_high=0.2, temperature=1.0, loss_type="grpo", importance_level="token",
               kl_clamp=10.0)


# ---- providers --------------------------------------------------------------------------------------------

def eager_from_logits(logits, ids, adv, mask, old, ref):
    """TRL-style: log_softmax of the float logits, gather, then the loss math (kernels.reference)."""
    logits = logits.float() / LOSS_KW["temperature"]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    loss, m = reference_grpo_from_logprobs(logp, adv, mask, old, ref, beta=LOSS_KW["beta"], eps_low=LOSS_KW["eps_low"],
                                           eps_high=LOSS_KW["eps_high"], kl_clamp=LOSS_KW["kl_clamp"])
    return loss, m["kl"], m["clip_ratio"]


def eager_linear(hidden, weight, ids, adv, mask, old, ref):
    return eager_from_logits(hidden @ weight.t(), ids, adv, mask, old, ref)


def _liger_missing() -> str:
    """Why the Liger baselines cannot run here ("" when liger_kernel is importable)."""
    import importlib.util

    return "" if importlib.util.find_spec("liger_kernel") is not None else "liger-kernel is not installed"


def _trl_missing() -> str:
    """Why the TRL baseline cannot run here ("" when it can). TRL's backward imports trl.trainer.utils, which
    imports pandas, datasets and accelerate: all must be installed (pip install trl pulls them in)."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return "trl is not installed"
    missing = [m for m in ("pandas", "datasets", "accelerate") if importlib.util.find_spec(m) is None]
    return f"trl's backward imports trl.trainer.utils, which needs {', '.join(missing)}" if missing else ""


TRL_CHUNK_SIZE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE: GRPOTrainer's vocabulary tile width


def trl_linear(hidden, weight, ids, adv, mask, old, ref):
    """TRL's fused LM head as GRPOTrainer calls it (counted rows compacted, no bias, no softcap, logit scale 1,
    log-probs only), then the GRPO loss of torch-eager on the per-token log-probs."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    m = mask != 0
    x = ChunkedLogProbFunction.apply(hidden[m], weight, None, ids[m], LOSS_KW["temperature"], TRL_CHUNK_SIZE, None,
                                     1.0, ())[0]
    logp = x.new_zeros(m.shape).masked_scatter(m, x)
    loss, metrics = reference_grpo_from_logprobs(logp, adv, mask, old, ref, beta=LOSS_KW["beta"],
                                                 eps_low=LOSS_KW["eps_low"], eps_high=LOSS_KW["eps_high"],
                                                 kl_clamp=LOSS_KW["kl_clamp"])
    return loss, metrics["kl"], metrics["clip_ratio"]


def make_providers(device: str, kernel: str):
    """name -> fn(inputs) returning the loss, for this device; plus the names skipped and why."""
    cuda = device == "cuda"
    provs, skipped = {}, {}
    if kernel == "grpo_loss":
        provs["torch-eager"] = lambda d: eager_from_logits(d["logits"][:, :-1], d["ids"], d["adv"], d["mask"],
                                                           d["old"], d["ref"])[0]
        compiled = torch.compile(eager_from_logits)
        provs["torch-compile"] = lambda d: compiled(d["logits"][:, :-1], d["ids"], d["adv"], d["mask"], d["old"],
                                                    d["ref"])[0]
        if cuda and _liger_missing():
            skipped["liger-triton"] = _liger_missing()
        elif cuda:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss

            provs["liger-triton"] = lambda d: triton_grpo_loss(
                d["logits"], d["old"], d["ref"], d["ids"], d["adv"], d["mask"].int(), temperature=LOSS_KW["temperature"],
                beta=LOSS_KW["beta"], eps_low=LOSS_KW["eps_low"], eps_high=LOSS_KW["eps_high"], inplace=False,
                loss_type="grpo", reduce=True)[0]
        else:
            skipped["liger-triton"] = "Triton kernel: needs a GPU"
        # the full [B, L + 1, V] logits: the gradient is written at that shape (no slice backward)
        provs["ours-logits"] = lambda d: kernels.grpo_loss(d["logits"], d["ids"], d["adv"], d["mask"],
                                                           old_logprobs=d["old"], ref_logprobs=d["ref"], **LOSS_KW)[0]
        if not cuda:
            skipped["ours-logits (triton)"] = "the Triton interpreter is far too slow at these shapes; ran the torch path"
    else:
        provs["torch-eager"] = lambda d: eager_linear(d["hidden"], d["weight"], d["ids"], d["adv"], d["mask"],
                                                      d["old"], d["ref"])[0]
        compiled = torch.compile(eager_linear)
        provs["torch-compile"] = lambda d: compiled(d["hidden"], d["weight"], d["ids"], d["adv"], d["mask"], d["old"],
                                                    d["ref"])[0]
        if _liger_missing():
            skipped["liger-chunked"] = _liger_missing()
        else:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            liger = LigerFusedLinearGRPOLoss(beta=LOSS_KW["beta"], compiled=cuda, use_ref_model=True,
                                             epsilon_low=LOSS_KW["eps_low"], epsilon_high=LOSS_KW["eps_high"],
                                             loss_type="grpo", temperature=LOSS_KW["temperature"])
            provs["liger-chunked"] = lambda d: liger(d["hidden"], d["weight"], d["ids"], d["mask"], d["adv"],
                                                     ref_per_token_logps=d["ref"], old_per_token_logps=d["old"])[0]
        if _trl_missing():
            skipped["trl-chunked"] = _trl_missing()
        else:
            import trl.trainer.utils  # noqa: F401  (TRL's backward imports it on its first call: ~3 s, untimed here)

            provs["trl-chunked"] = lambda d: trl_linear(d["hidden"], d["weight"], d["ids"], d["adv"], d["mask"],
                                                        d["old"], d["ref"])[0]
        provs["ours-linear"] = lambda d: kernels.linear_grpo_loss(d["hidden"], d["weight"], d["ids"], d["adv"],
                                                                  d["mask"], old_logprobs=d["old"],
                                                                  ref_logprobs=d["ref"], **LOSS_KW)[0]
        if not cuda:
            skipped["ours-linear (triton)"] = "the Triton interpreter is far too slow at these shapes; ran the torch path"
    return provs, skipped


# ---- inputs -----------------------------------------------------------------------------------------------

def make_inputs(kernel, n_tokens, seq_len, H, V, dtype, device, seed=0):
    """The inputs, drawn on the device (a CPU generator for the CPU runs, a CUDA one on the GPU, where
    drawing 1.25e9 logits on the CPU would take longer than the measurements)."""
    g = torch.Generator(device=device).manual_seed(seed)
    B = max(1, n_tokens // seq_len)
    L = n_tokens // B
    d = dict(ids=torch.randint(0, V, (B, L), generator=g, device=device),
             adv=torch.randn(B, generator=g, device=device),
             mask=torch.ones(B, L, dtype=torch.bool, device=device))
    if kernel == "grpo_loss":
        d["logits"] = (torch.randn(B, L + 1, V, generator=g, dtype=torch.float32, device=device) * 2).to(dtype)
        d["logits"].requires_grad_(True)
        with torch.no_grad():
            lp = kernels.selective_logprobs(d["logits"][:, :-1], d["ids"], backend="torch" if device == "cpu" else "auto")
    else:
        d["hidden"] = (torch.randn(B, L, H, generator=g, device=device) * 0.5).to(dtype).requires_grad_(True)
        d["weight"] = (torch.randn(V, H, generator=g, device=device) * H ** -0.5).to(dtype).requires_grad_(True)
        with torch.no_grad():
            lp = kernels.linear_selective_logprobs(d["hidden"], d["weight"], d["ids"])
    d["old"] = (lp + 0.1 * torch.randn(lp.shape, generator=g, device=device)).float()
    d["ref"] = (lp + 0.1 * torch.randn(lp.shape, generator=g, device=device)).float()
    return d, B, L


MASK_KINDS = ("grpo", "full")  # the order --mask both measures them in


def completion_lengths(kind: str, B: int, L: int, seed: int = 0) -> torch.Tensor:
    """[B] completion lengths (CPU int64) of mask `kind`; see the module docstring."""
    if kind == "full":
        return torch.full((B,), L, dtype=torch.long)
    if kind != "grpo":
        raise ValueError(f"unknown mask {kind!r}")
    i = torch.arange(B, dtype=torch.float64)
    lengths = torch.ceil(L * (i + 0.5) / B).long().clamp(1, L)
    return lengths[torch.randperm(B, generator=torch.Generator().manual_seed(seed + 1))]


def counted_fraction(kind: str, B: int, L: int) -> float:
    return float(completion_lengths(kind, B, L).sum()) / (B * L)


def with_mask(d, kind, V):
    """d with the completion mask `kind` (right padding) and the pad id V - 1 at the padding positions; the
    big tensors (logits / hidden, weight) are shared with d. Returns (inputs, counted fraction)."""
    B, L = d["ids"].shape
    device = d["ids"].device
    lengths = completion_lengths(kind, B, L).to(device)
    mask = torch.arange(L, device=device).unsqueeze(0) < lengths.unsqueeze(1)
    out = dict(d, mask=mask, ids=torch.where(mask, d["ids"], torch.full_like(d["ids"], V - 1)))
    return out, counted_fraction(kind, B, L)


def mask_kinds(arg: str) -> list:
    return list(MASK_KINDS) if arg == "both" else [arg]


def leaves(d):
    return [d[k] for k in ("logits", "hidden", "weight") if k in d]


def clear_grads(d):
    for t in leaves(d):
        t.grad = None


def grad_bytes(d):
    return sum(t.numel() * t.element_size() for t in leaves(d))


def step(fn, d, mode):
    loss = fn(d)
    if mode == "fwd+bwd":
        loss.backward()
    return loss


# ---- measurement ------------------------------------------------------------------------------------------

def quantiles(values):
    values = sorted(values)
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), q[1], q[7]


def _rss():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def cpu_memory(fn, d, mode):
    """(peak torch-allocated bytes above the start, peak RSS rise) of one call; see the module docstring."""
    from torch.profiler import ProfilerActivity, profile

    clear_grads(d)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        rss0 = _rss()["VmRSS"]
    except OSError:
        rss0 = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = step(fn, d, mode)
        del loss
    rss_peak = None if rss0 is None else _rss()["VmHWM"] - rss0
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak, rss_peak


def cuda_memory(fn, d, mode):
    clear_grads(d)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = step(fn, d, mode)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del loss
    return peak, None


def time_cpu(fn, d, mode):
    """(wall ms, process CPU ms) of one call: CPU time is far less sensitive to other processes
    time-slicing the cores than wall time (on a shared machine compare providers by it)."""
    clear_grads(d)
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    loss = step(fn, d, mode)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    del loss
    return elapsed * 1e3, cpu * 1e3


def time_cuda(fn, d, mode, reps):
    import triton

    ms = triton.testing.do_bench(lambda: step(fn, d, mode), grad_to_none=leaves(d), rep=reps * 100,
                                 quantiles=[0.5, 0.2, 0.8])
    return list(ms)


def copy_bandwidth():
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    import triton

    ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=200)
    return 2 * src.numel() / (ms * 1e-3)  # bytes read + written per second


# ---- main -------------------------------------------------------------------------------------------------

def versions():
    import importlib.metadata as md

    parts = [f"torch {torch.__version__}"]
    for pkg in ("triton", "liger-kernel", "trl"):
        try:
            parts.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    return "; ".join(parts)


def measure_round_robin(providers, d, mode, cuda, reps, common, label):
    """Every provider on the inputs d in one mode: time (round-robin over the providers on the CPU, so they
    share the same noisy minutes) then memory. Returns the CSV rows (common: their shared columns)."""
    rows = []
    times = {p: [] for p in providers}
    cpu_times = {p: [] for p in providers}
    for p, fn in providers.items():  # warm-up (compilation, autotuning) outside the numbers
        if cuda or p == "torch-compile":
            step(fn, d, mode)
            clear_grads(d)
    if cuda:
        for p, fn in providers.items():
            times[p] = time_cuda(fn, d, mode, reps)
    else:
        for _ in range(reps):
            for p, fn in providers.items():
                wall, cpu = time_cpu(fn, d, mode)
                times[p].append(wall)
                cpu_times[p].append(cpu)
    for p, fn in providers.items():
        peak, rss = (cuda_memory if cuda else cpu_memory)(fn, d, mode)
        grads = grad_bytes(d) if mode == "fwd+bwd" else 0
        t50, t20, t80 = (times[p] if cuda else quantiles(times[p]))
        row = dict(common, provider=p, mode=mode)
        rows.append(dict(row, metric="time_ms", p50=round(t50, 2), p20=round(t20, 2), p80=round(t80, 2)))
        if cpu_times[p]:
            c50, c20, c80 = quantiles(cpu_times[p])
            rows.append(dict(row, metric="cpu_time_ms", p50=round(c50, 2), p20=round(c20, 2), p80=round(c80, 2)))
        for metric, value in (("peak_mem_mb", peak), ("grad_mem_mb", grads), ("extra_mem_mb", peak - grads),
                              ("peak_rss_mb", rss)):
            if value is not None:
                mb = round(value / 2**20, 1)
                rows.append(dict(row, metric=metric, p50=mb, p20=mb, p80=mb))
        cpu_txt = f" (cpu {quantiles(cpu_times[p])[0]:10.1f} ms)" if cpu_times[p] else ""
        print(f"  {common['kernel']:16s} {p:14s} {mode:8s} {label}: {t50:10.1f} ms{cpu_txt}"
              f"  peak {peak / 2**20:9.1f} MB  extra {(peak - grads) / 2**20:9.1f} MB"
              + (f"  rss {rss / 2**20:9.1f} MB" if rss else ""), flush=True)
        clear_grads(d)
    return rows


def run(args):
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    if args.quick:
        H, V, seq_len, sizes = 512, 32768, 128, [256, 1024]
    else:
        H, V, seq_len = 3584, 152064, 1024
        sizes = [2048, 4096, 8192, 16384] if cuda else [4096]
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    if cuda:
        device_name = torch.cuda.get_device_name()
        note = args.note or ""
    else:
        device_name = f"{os.cpu_count()}-core CPU, no GPU"
        note = args.note or "other processes shared the CPU cores during the run: times are noisy"
        torch.set_num_threads(os.cpu_count())
    tag = args.tag or (("cuda_" + re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")) if cuda else "cpu") + \
        ("_quick" if args.quick else "")
    reps = args.reps or (20 if cuda else (3 if args.quick else 1))
    kernels_to_run = [k for k in ("grpo_loss", "linear_grpo_loss") if not args.kernel or k == args.kernel]
    rows, ver = [], versions()
    print(f"[{device_name}] dtype={dtype} H={H} V={V} sizes={sizes} reps={reps} ({ver})", flush=True)

    if cuda:
        bw = copy_bandwidth()
        print(f"device-to-device copy: {bw / 1e9:.0f} GB/s", flush=True)
    if args.time_box is not None:  # one measurement at a time, most important first (see the docstring)
        rows += run_time_boxed(args, kernels_to_run, sizes, seq_len, H, V, dtype, device, device_name, ver, note, reps,
                               bw if cuda else None, flush=lambda partial: write_csv(rows + partial, args.out, tag))
        kernels_to_run = []  # measured above
    for kernel in kernels_to_run:
        providers, skipped = make_providers(device, kernel)
        if args.providers:
            providers = {k: v for k, v in providers.items() if k in args.providers.split(",")}
        for name, why in skipped.items():
            print(f"  skipped {kernel}/{name}: {why}", flush=True)
        for n in sizes:
            d_all, B, L = make_inputs(kernel, n, seq_len, H, V, dtype, device)
            dt = str(dtype).replace("torch.", "")
            base_shape = f"B={B} L={L} V={V} {dt}" if kernel == "grpo_loss" else f"B={B} L={L} H={H} V={V} {dt}"
            if cuda and kernel == "grpo_loss":  # three passes over N x V: read (fwd), read + write (bwd)
                bound_ms = 3 * B * L * V * d_all["logits"].element_size() / bw * 1e3
                rows.append(dict(kernel=kernel, provider="bandwidth-bound", mode="fwd+bwd", metric="time_ms",
                                 shape=base_shape + " counted=1.00", p50=round(bound_ms, 3), p20="", p80="",
                                 device=device_name, versions=ver, note="3 x N x V x bytes / device copy bandwidth"))
            for kind in mask_kinds(args.mask):
                d, frac = with_mask(d_all, kind, V)
                common = dict(kernel=kernel, shape=f"{base_shape} counted={frac:.2f}", device=device_name,
                              versions=ver, note=note)
                for mode in args.modes.split(","):
                    rows += measure_round_robin(providers, d, mode, cuda, reps, common,
                                                label=f"N={B * L:6d} counted={frac:.2f}")
                del d
            del d_all
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        if skipped:
            rows.append(dict(kernel=kernel, provider="skipped: " + ", ".join(skipped), mode="", metric="", shape="",
                             p50="", p20="", p80="", device=device_name, versions=ver,
                             note="; ".join(f"{k}: {v}" for k, v in skipped.items())))
    csv_path = write_csv(rows, args.out, tag)
    print_summary(rows)
    try:
        plot(rows, csv_path[: -len(".csv")] + ".png", device_name)
    except ImportError as e:  # a borrowed GPU machine may have no matplotlib: the CSV is what matters
        print(f"no plot ({e})", flush=True)
    print(f"wrote {csv_path}", flush=True)


def write_csv(rows, out, tag) -> str:
    out_dir = out or os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"grpo_loss_{tag}.csv")
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(csv_path + ".tmp", csv_path)
    return csv_path


TIME_BOX_PROVIDER_ORDER = ["ours-linear", "ours-logits", "torch-eager", "trl-chunked", "liger-chunked", "liger-triton",
                           "torch-compile"]


def run_time_boxed(args, kernels_to_run, sizes, seq_len, H, V, dtype, device, device_name, ver, note, reps, bw,
                   flush=lambda rows: None):
    """--time-box: measure (kernel, mode, provider) one at a time, most important first; none starts after the
    box has run out (those get a "time-box" row). A provider that raises gets an "error" row. flush(rows) is
    called after every measurement (the CSV so far survives a kill by an outer timeout)."""
    cuda = device == "cuda"
    t_end = time.monotonic() + args.time_box
    modes = sorted(args.modes.split(","), key=lambda m: m != "fwd+bwd")
    kernels_in_order = sorted(kernels_to_run, key=lambda k: k != "linear_grpo_loss")
    providers = {k: make_providers(device, k) for k in kernels_in_order}
    wanted = args.providers.split(",") if args.providers else None
    rows, inputs, dt = [], {}, str(dtype).replace("torch.", "")
    for kernel in kernels_in_order:
        for name, why in providers[kernel][1].items():
            print(f"  skipped {kernel}/{name}: {why}", flush=True)
            rows.append(dict(kernel=kernel, provider="skipped: " + name, mode="", metric="", shape="", p50="", p20="",
                             p80="", device=device_name, versions=ver, note=f"{name}: {why}"))

    masks = mask_kinds(args.mask)

    def rank(job):  # fwd+bwd before fwd; ours, eager, TRL, then the compiling baselines; the trainer's kernel first
        mode, kernel, n, kind, p = job
        cls = 0 if p.startswith("ours") else 1 if p == "torch-eager" else 2
        return modes.index(mode), cls, kernels_in_order.index(kernel), TIME_BOX_PROVIDER_ORDER.index(p) \
            if p in TIME_BOX_PROVIDER_ORDER else 99, sizes.index(n), masks.index(kind)

    jobs = sorted(((mode, kernel, n, kind, p) for mode in modes for kernel in kernels_in_order for n in sizes
                   for kind in masks for p in providers[kernel][0] if wanted is None or p in wanted), key=rank)
    for mode, kernel, n, kind, p in jobs:
        provs = providers[kernel][0]
        B = max(1, n // seq_len)
        L = n // B
        frac = counted_fraction(kind, B, L)
        shape = (f"B={B} L={L} V={V} {dt}" if kernel == "grpo_loss" else f"B={B} L={L} H={H} V={V} {dt}") + \
            f" counted={frac:.2f}"
        common = dict(kernel=kernel, provider=p, mode=mode, shape=shape, device=device_name, versions=ver, note=note)
        label = f"N={n:6d} counted={frac:.2f}"
        if time.monotonic() > t_end:
            rows.append(dict(common, provider="time-box", metric="", p50="", p20="", p80="",
                             note=f"{p} {mode}: not measured, the {args.time_box:.0f} s time box ran out"))
            print(f"  {kernel:16s} {p:14s} {mode:8s} {label}: not measured (time box)", flush=True)
            continue
        if (kernel, n) not in inputs:
            inputs[(kernel, n)] = make_inputs(kernel, n, seq_len, H, V, dtype, device)
            if cuda and kernel == "grpo_loss" and bw:
                bound_ms = 3 * n * V * inputs[(kernel, n)][0]["logits"].element_size() / bw * 1e3
                rows.append(dict(common, provider="bandwidth-bound", mode="fwd+bwd", metric="time_ms",
                                 shape=shape.rsplit(" counted=", 1)[0] + " counted=1.00", p50=round(bound_ms, 3),
                                 p20="", p80="", note="3 x N x V x bytes / device copy bandwidth"))
        if (kernel, n, kind) not in inputs:  # shares the big tensors with inputs[(kernel, n)]
            inputs[(kernel, n, kind)] = with_mask(inputs[(kernel, n)][0], kind, V)
        d = inputs[(kernel, n, kind)][0]
        fn = provs[p]
        try:
            step(fn, d, mode)  # warm-up: compilation, autotuning
            clear_grads(d)
            if cuda:
                t50, t20, t80 = time_cuda(fn, d, mode, reps)
            else:
                t50, t20, t80 = quantiles([time_cpu(fn, d, mode)[0] for _ in range(reps)])
            peak, _ = (cuda_memory if cuda else cpu_memory)(fn, d, mode)
        except Exception as e:  # e.g. out of memory, or a baseline that breaks on this stack
            rows.append(dict(common, metric="error", p50="", p20="", p80="", note=f"{type(e).__name__}: {str(e)[:300]}"))
            print(f"  {kernel:16s} {p:14s} {mode:8s} {label}: ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
            clear_grads(d)
            if cuda:
                torch.cuda.empty_cache()
            flush(rows)
            continue
        grads = grad_bytes(d) if mode == "fwd+bwd" else 0
        rows.append(dict(common, metric="time_ms", p50=round(t50, 3), p20=round(t20, 3), p80=round(t80, 3)))
        for metric, value in (("peak_mem_mb", peak), ("grad_mem_mb", grads), ("extra_mem_mb", peak - grads)):
            mb = round(value / 2**20, 1)
            rows.append(dict(common, metric=metric, p50=mb, p20=mb, p80=mb))
        print(f"  {kernel:16s} {p:14s} {mode:8s} {label}: {t50:10.2f} ms  peak {peak / 2**20:9.1f} MB  "
              f"extra {(peak - grads) / 2**20:9.1f} MB", flush=True)
        clear_grads(d)
        flush(rows)
    return rows


def print_summary(rows):
    """Ratios of p50s from this run's rows: ours at the grpo mask / ours at the full mask, and every other
    provider / ours at the same mask (time_ms, cpu_time_ms where measured, peak_mem_mb)."""
    val = {}
    for r in rows:
        if r.get("metric") in ("time_ms", "cpu_time_ms", "peak_mem_mb") and " counted=" in r.get("shape", "") \
                and r["p50"] != "" and not r["provider"].startswith(("bandwidth", "time-box", "skipped")):
            base, counted = r["shape"].rsplit(" counted=", 1)
            val[(r["kernel"], r["mode"], base, counted, r["provider"], r["metric"])] = float(r["p50"])
    if not val:
        return
    groups = list(dict.fromkeys(k[:3] for k in val))
    metric_names = {"time_ms": "time", "cpu_time_ms": "cpu", "peak_mem_mb": "peak"}

    def ratio(a, b):
        return f"{a / b:.2f}x" if b > 0 else "-"

    def ratios(key_a, key_b):  # "time 0.52x  cpu 0.50x  peak 0.93x" for the metrics both have
        return "  ".join(f"{name} {ratio(val[key_a + (m,)], val[key_b + (m,)])}" for m, name in metric_names.items()
                         if key_a + (m,) in val and key_b + (m,) in val)

    print("summary (ratios of p50s from this run):", flush=True)
    for kernel, mode, base in groups:
        keys = [k for k in val if k[:3] == (kernel, mode, base)]
        fracs = sorted({k[3] for k in keys})
        ours = next((p for p in ("ours-linear", "ours-logits") if any(k[4] == p for k in keys)), None)
        print(f"  {kernel} {mode} {base}:", flush=True)
        if ours is None:
            print("    (ours not measured)", flush=True)
            continue
        full = "1.00" if "1.00" in fracs else None
        for c in fracs:
            if full and c != full and (kernel, mode, base, c, ours, "time_ms") in val:
                print(f"    {ours} counted={c} / counted={full}: "
                      f"{ratios((kernel, mode, base, c, ours), (kernel, mode, base, full, ours))}", flush=True)
        for c in fracs:
            others = sorted({k[4] for k in keys if k[3] == c and k[4] != ours})
            for p in others:
                if (kernel, mode, base, c, ours, "time_ms") in val:
                    print(f"    counted={c}: {p} / {ours}: "
                          f"{ratios((kernel, mode, base, c, p), (kernel, mode, base, c, ours))}", flush=True)


def plot(rows, path, device_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, m) for k in ("grpo_loss", "linear_grpo_loss") for m in ("time_ms", "peak_mem_mb")
              if any(r["kernel"] == k and r["metric"] == m for r in rows)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (kernel, metric) in zip(axes[0], panels):
        sel = [r for r in rows if r["kernel"] == kernel and r["metric"] == metric and r["mode"] == "fwd+bwd"]
        shapes = list(dict.fromkeys(r["shape"] for r in sel))
        provs = list(dict.fromkeys(r["provider"] for r in sel))
        width = 0.8 / max(1, len(provs))
        for i, p in enumerate(provs):
            vals = [next((float(r["p50"]) for r in sel if r["shape"] == s and r["provider"] == p), 0.0) for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        labels = [s.split(" H=")[0].split(" V=")[0] + ("\ncounted=" + s.rsplit(" counted=", 1)[1]
                                                     if " counted=" in s else "") for s in shapes]
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(f"{kernel} fwd+bwd: {metric}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(device_name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (H=512, V=32768, B*L in {256, 1024})")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is present")
    ap.add_argument("--sizes", help="comma-separated B*L values (overrides the defaults)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--kernel", choices=["grpo_loss", "linear_grpo_loss"], help="only this kernel")
    ap.add_argument("--providers", help="comma-separated subset of providers")
    ap.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated subset of fwd,fwd+bwd")
    ap.add_argument("--reps", type=int, help="CPU: timed repeats (default 1, 3 with --quick); CUDA: do_bench time budget in units of 100 ms (default 20)")
    ap.add_argument("--tag", help="results file suffix (default: cpu / cpu_quick / cuda_<gpu>)")
    ap.add_argument("--note", help="free-text note stored in every row")
    ap.add_argument("--time-box", type=float, help="seconds: measure one (kernel, mode, provider) at a time, most "
                                                   "important first, and start none after this (the GPU check's mode)")
    ap.add_argument("--mask", choices=["full", "grpo", "both"], default="both",
                    help="completion masks: full (every token counted), grpo (right-padded, ~50%% counted), both "
                         "(default: grpo then full, side by side)")
    ap.add_argument("--out", help="results directory (default benchmarks/results)")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
