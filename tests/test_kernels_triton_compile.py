"""The Triton kernels as a real launch builds them, compiled for sm_80 and sm_90 with no GPU here.

The interpreter runs the kernels' semantics on the CPU; this checks what it cannot. In a subprocess
without TRITON_INTERPRET (so @triton.jit builds real JIT functions), the launch arguments are made by
the same code a launch uses (kernels.triton_rows.kernel_args, on CPU tensors of the real dtypes), bound
by Triton's own binder for a CUDA target (the specialisation a launch computes: dtypes, divisibility
by 16 of V = 152064 and of the strides, the constexprs), compiled by Triton's real compiler + ptxas
for each variant, and ptxas's resource report is read: no spills, registers within budget. The
same binder's cache key shows that distinct float hyperparameters (beta, eps, temperature, kl_clamp)
map to one compiled kernel, while a different block size does not.
"""

import os
import subprocess
import sys

SCRIPT = r"""
import re, subprocess, tempfile
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import compute_cache_key, create_function_from_signature
from triton.backends.nvidia.compiler import get_ptxas

from kernels import triton_rows
from kernels._checks import Hyper, Tokens

K = triton_rows._grpo_rows_kernel
N, L, V = 64, 32, 152064  # 2 sequences of 32 tokens (a tiny N: only dtypes and divisibility matter)
REG_BUDGET = 64  # per thread: 4 programs of 256 threads fit an SM's 65536 registers (50% occupancy or more)


def tokens(c):
    f = lambda: torch.zeros(N, dtype=c)
    return Tokens(ids=torch.zeros(N, dtype=torch.int64), adv=f(), weight=f(), mask=f(), old=f(), ref=f())


def out(c):
    return {k: torch.zeros(N, dtype=c) for k in ("lse", "logp", "loss", "kl", "clip", "coef")}


def hyper(beta=0.04, eps=(0.2, 0.28), t=0.9, clamp=10.0):
    return Hyper(beta=beta, eps_low=eps[0], eps_high=eps[1], inv_temperature=1 / t, kl_clamp=clamp, has_old=True,
                 has_ref=True, loss_type="grpo", sequence_level=False)


def launches():
    # (name, x, dx, mode flags) as the code paths launch them
    full_bf16 = torch.zeros(2, L + 1, V, dtype=torch.bfloat16)  # the model's full logits
    x = full_bf16[:, :L]
    buf = torch.zeros(N, V, dtype=torch.float32)  # fused-linear chunk buffer, and its bf16 gradient twin
    dbuf = torch.zeros(N, V, dtype=torch.bfloat16)
    full_fp32 = torch.zeros(2, L + 1, V, dtype=torch.float32)
    c = torch.float32
    yield "logits bf16 forward", (x, None, tokens(c).ids, out(c), hyper(), 1 / 0.9, tokens(c), True, True, False)
    yield "logits bf16 backward", (x, full_bf16[:, :L], tokens(c).ids, out(c), None, 1 / 0.9, None, False, False, True)
    yield "logits bf16 inplace", (x, x, tokens(c).ids, out(c), hyper(), 1 / 0.9, tokens(c), True, True, True)
    yield "logits bf16 logprobs (masked)", (x, None, tokens(c).ids, out(c), None, 1 / 0.9, None, True, False, False,
                                            tokens(c).mask)
    yield "linear fp32 logits -> bf16 grad", (buf, dbuf, tokens(c).ids, out(c), hyper(), 1 / 0.9, tokens(c), True,
                                              True, True)
    yield "linear fp32 logits -> fp32 grad", (buf, buf, tokens(c).ids, out(c), hyper(), 1 / 0.9, tokens(c), True,
                                              True, True)
    yield "linear logprobs", (buf, None, tokens(c).ids, out(c), None, 1 / 0.9, None, True, False, False)
    yield "linear dlogits (sequence level)", (buf, dbuf, tokens(c).ids, out(c), None, 1 / 0.9, None, False, False,
                                              True)
    yield "logits fp32 forward", (full_fp32[:, :L], None, tokens(c).ids, out(c), hyper(), 1 / 0.9, tokens(c), True,
                                  True, False)


def bind(backend, largs, **override):
    args, kwargs = triton_rows.kernel_args(*largs)
    kwargs.update(override)
    binder = create_function_from_signature(K.signature, K.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    return bound, spec, options, kwargs


def resources(ptx, arch):
    with tempfile.TemporaryDirectory() as d:
        src = f"{d}/k.ptx"
        open(src, "w").write(ptx)
        res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", src,
                              "-o", f"{d}/k.cubin"], capture_output=True, text=True, check=True)
    text = res.stderr + res.stdout
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return regs, sum(spills)


n = 0
for arch in (80, 90):
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    for name, largs in launches():
        bound, spec, options, kwargs = bind(backend, largs)
        sigkeys = [p.name for p in K.params]
        opts, signature, constexprs, attrs = K._pack_args(backend, kwargs, bound, spec, options)
        assert signature["V"] == "i32" and signature["beta_hi"] == "fp32", signature
        compiled = triton.compile(ASTSource(K, signature, constexprs, attrs), target=target, options=opts.__dict__)
        regs, spills = resources(compiled.asm["ptx"], arch)
        print(f"sm_{arch} {name}: BLOCK_V={kwargs['BLOCK_V']} num_warps={kwargs['num_warps']} registers={regs} "
              f"spill_bytes={spills}")
        assert spills == 0, f"sm_{arch} {name}: {spills} bytes of spills"
        assert regs <= REG_BUDGET, f"sm_{arch} {name}: {regs} registers > {REG_BUDGET}"
        n += 1

# one compiled kernel across hyperparameter values; a different block size is a different kernel
backend = make_backend(GPUTarget("cuda", 90, 32))
name, largs = next(iter(launches()))
keys = set()
for beta, eps, t, clamp in ((0.0, (0.2, 0.2), 1.0, 10.0), (0.04, (0.2, 0.28), 0.9, 10.0), (0.1, (0.1, 0.3), 0.7, 5.0),
                            (1e-3, (0.25, 0.25), 1.3, 20.0), (0.5, (0.05, 0.4), 0.6, 2.5)):
    largs = list(largs)
    largs[4] = hyper(beta, eps, t, clamp)
    largs[5] = 1 / t
    _, spec, options, _ = bind(backend, largs)
    keys.add(compute_cache_key({}, spec, options))
assert len(keys) == 1, keys
_, spec, options, _ = bind(backend, largs, BLOCK_V=2048)
assert compute_cache_key({}, spec, options) not in keys
print("compiled", n, "| one kernel for 5 hyperparameter sets")
"""


def test_kernel_variants_compile_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    assert "compiled 18 | one kernel for 5 hyperparameter sets" in out.stdout, out.stdout
    print(out.stdout)
