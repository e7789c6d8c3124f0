"""Sweep the Triton row kernel's launch configuration (BLOCK_V, num_warps) on a GPU; the table follows it.

kernels/triton_rows.LAUNCH_TABLE holds one (BLOCK_V, num_warps) per logits dtype, chosen before any GPU
ran them. This measures the alternatives, one run side by side, at Qwen2.5-VL-7B's vocabulary
(V = 152064) on the launches the code paths make:
  logits-bf16   kernels.grpo_loss forward + backward on full bf16 logits [B, L + 1, V] (N = B * L tokens,
                half of them counted: a GRPO batch's padding)
  linear-fp32   the fused-linear epilogue: loss + d logits from an fp32 [c, V] chunk buffer into its bf16
                gradient twin (c = 1664 rows, the chunk chunk_rows picks at H = 3584 in bf16)
Writes benchmarks/results/row_kernel_sweep_cuda_<gpu>.csv (kernel, provider = "BLOCK_V=..,warps=..",
mode, metric time_ms, shape, p50/p20/p80, device, versions, note) and prints the best configuration per
launch beside the table's. Numbers, not tests.

    python benchmarks/sweep_row_kernel.py --time-box 40     # what `make gpu-check` runs
    python benchmarks/sweep_row_kernel.py --smoke           # the CPU, under TRITON_INTERPRET=1, tiny shapes:
                                                            # exercises the code, measures nothing
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (4096, 16), (8192, 8), (8192, 16)]
FIELDS = ["kernel", "provider", "mode", "metric", "shape", "p50", "p20", "p80", "device", "versions", "note"]


def launches(torch, kernels, device, smoke: bool):
    """(name, dtype of the logits, callable running one launch set) for each code path."""
    from kernels import _checks
    from kernels import triton_rows

    V = 1000 if smoke else 152064
    B, L = (2, 8) if smoke else (8, 1024)
    c = 16 if smoke else 1664
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(B, L + 1, V, device=device, dtype=torch.bfloat16, generator=g).requires_grad_(True)
    ids = torch.randint(0, V, (B, L), device=device, generator=g)
    lengths = torch.linspace(1, L, B, device=device).round()
    mask = torch.arange(L, device=device)[None, :] < lengths[:, None]
    adv = torch.randn(B, device=device, generator=g)
    old = torch.randn(B, L, device=device, generator=g) - 8
    ref = torch.randn(B, L, device=device, generator=g) - 8
    kw = dict(beta=0.04, eps_low=0.2, eps_high=0.28, temperature=0.9, backend="triton")

    def logits_path():
        loss, _ = kernels.grpo_loss(logits, ids, adv, mask, old, ref, **kw)
        loss.backward()
        logits.grad = None

    buf = torch.randn(c, V, device=device, generator=g)
    dbuf = torch.empty(c, V, device=device, dtype=torch.bfloat16)
    cids = torch.randint(0, V, (1, c), device=device, generator=g)
    prep = _checks.prepare_grpo((1, c), V, torch.device(device), torch.float32, cids, torch.ones(1, device=device),
                                torch.ones(1, c, device=device, dtype=torch.bool), old[:1, :1].expand(1, c).contiguous(),
                                ref[:1, :1].expand(1, c).contiguous(), 0.04, 0.2, 0.28, 0.9, "grpo", "token", 10.0,
                                None, None)
    out = {k: torch.empty(c, device=device) for k in ("lse", "logp", "loss", "kl", "clip", "coef")}

    def linear_epilogue():
        triton_rows.loss_rows(buf, prep.tok, prep.hp, out, dx=dbuf)

    shape_logits = f"B={B} L={L} V={V} counted={float(mask.float().mean()):.2f}"
    return [("logits-bf16", torch.bfloat16, shape_logits, logits_path),
            ("linear-fp32", torch.float32, f"c={c} V={V}", linear_epilogue)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes: exercise the code")
    ap.add_argument("--time-box", type=float, default=120.0, help="seconds; no new measurement starts after them")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--tag", help="results file suffix (default cuda_<gpu>, or cpu_smoke)")
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton

    import kernels
    from kernels import triton_rows

    if not args.smoke and not torch.cuda.is_available():
        print("sweep_row_kernel: needs a CUDA GPU (or --smoke on the CPU)", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    name = "cpu-interpreter" if args.smoke else torch.cuda.get_device_name()
    versions = f"torch {torch.__version__} triton {triton.__version__}"
    t0 = time.monotonic()
    rows, best = [], {}
    for kname, dtype, shape, fn in launches(torch, kernels, device, args.smoke):
        table = triton_rows.LAUNCH_TABLE[dtype]
        for cfg in (CONFIGS[:2] if args.smoke else CONFIGS):
            if time.monotonic() - t0 > args.time_box:
                rows.append(dict(kernel=kname, provider=f"BLOCK_V={cfg[0]},warps={cfg[1]}", mode="fwd+bwd",
                                 metric="time-box", shape=shape, p50="", p20="", p80="", device=name, versions=versions,
                                 note=f"not measured: the {args.time_box:.0f} s time box ran out"))
                continue
            triton_rows.LAUNCH_OVERRIDE = cfg
            try:
                if args.smoke:
                    fn()
                    p50 = p20 = p80 = float("nan")
                else:
                    p50, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
            finally:
                triton_rows.LAUNCH_OVERRIDE = None
            note = "the table's choice" if cfg == table else ""
            rows.append(dict(kernel=kname, provider=f"BLOCK_V={cfg[0]},warps={cfg[1]}", mode="fwd+bwd" if
                             kname.startswith("logits") else "epilogue", metric="time_ms", shape=shape, p50=p50,
                             p20=p20, p80=p80, device=name, versions=versions, note=note))
            print(f"  {kname:12s} BLOCK_V={cfg[0]:5d} warps={cfg[1]:2d}: {p50:9.3f} ms {note}")
            if p50 == p50 and (kname not in best or p50 < best[kname][1]):
                best[kname] = (cfg, p50)
    for kname, (cfg, p50) in best.items():
        t_row = next((r for r in rows if r["kernel"] == kname and r["note"] == "the table's choice"), None)
        ratio = float(t_row["p50"]) / p50 if t_row else float("nan")
        print(f"best {kname}: BLOCK_V={cfg[0]} warps={cfg[1]} {p50:.3f} ms; the table's choice takes {ratio:.2f}x")
    tag = args.tag or ("cpu_smoke" if args.smoke else
                       "cuda_" + "".join(ch if ch.isalnum() else "_" for ch in name).strip("_"))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"row_kernel_sweep_{tag}.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
