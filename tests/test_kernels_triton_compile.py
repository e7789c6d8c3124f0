"""The Triton kernel compiles for real GPUs (sm_80, sm_90) down to a cubin, with no GPU here.

The interpreter runs the kernels' semantics on the CPU; this checks what the interpreter cannot:
that the GPU compiler (TTIR -> TTGIR -> LLVM -> PTX -> ptxas) accepts every mode of the kernel.
It runs in a subprocess without TRITON_INTERPRET, so @triton.jit builds real JIT functions.
"""

import os
import subprocess
import sys

SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.triton_rows import _grpo_rows_kernel

def signature(x, c):
    sig = {"X": "*" + x, "x_rows": "i32", "x_sb": "i64", "x_sl": "i64",
           "DX": "*" + x, "dx_rows": "i32", "dx_sb": "i64", "dx_sl": "i64", "IDS": "*i64"}
    sig.update({n: "*" + c for n in ["ADV", "WGT", "MSK", "OLD", "REF", "LSE", "LOGP", "LOSS", "KL", "CLIP", "COEF"]})
    sig["V"] = "i32"
    return sig

modes = {"loss+dlogits": (True, True, True), "logprobs": (True, False, False), "dlogits": (False, False, True)}
n = 0
for arch in (80, 90):
    for x, c in (("bf16", "fp32"), ("fp32", "fp32")):
        for name, (lse, loss, dx) in modes.items():
            for has_old, has_ref, clamp in ((True, True, True), (False, False, False)):
                constexprs = dict(INV_T=1 / 0.7, BETA=0.04, LO=0.8, HI=1.28, KL_CLAMP=10.0, HAS_OLD=has_old,
                                  HAS_REF=has_ref, HAS_CLAMP=clamp, COMPUTE_LSE=lse, COMPUTE_LOSS=loss,
                                  WRITE_DX=dx, BLOCK_V=4096)
                sig = signature(x, c)
                sig.update({k: "constexpr" for k in constexprs})
                compiled = triton.compile(ASTSource(fn=_grpo_rows_kernel, signature=sig, constexprs=constexprs),
                                          target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
                assert len(compiled.asm["cubin"]) > 0 and ".entry" in compiled.asm["ptx"]
                n += 1
print("compiled", n)
"""


def test_kernel_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "compiled 24" in out.stdout
