"""Triton row kernels: one program per token (grid axis 0), streaming the token's V logits in blocks.

One kernel, three modes chosen by constexpr flags:
  log-probs  sweep 1: online log-sum-exp over vocabulary blocks (fp32, or fp64 for fp64 input) -> lse, logp
  loss       sweep 1 + the token-level GRPO terms (ratio, clip, k3 KL, weight) -> loss_t, kl_t, clip_t, coef_t;
             with WRITE_DX a second sweep writes d loss / d logits = coef * (onehot - softmax) / T
  dlogits    given lse and coef (the backward of the logits path, pass 2 of sequence-level): sweep 2 only
Padding costs nothing: a masked row runs no sweep 1 (its loop bound is 0) and stores zeros; in sweep 2
a row whose coef is 0 (every masked row) stores zeros without reading its logits.
Float hyperparameters are runtime arguments (a schedule changing beta compiles nothing new), cast to
fp32 inside the kernel (torch.compile may pass Python floats as fp64: harmless). For fp64 checks each
comes as an fp32 pair (hi, lo) with hi + lo = the fp64 value to ~1e-15, so fp64 results stay exact.
Row r of X is at X + (r // x_rows) * x_sb + (r % x_rows) * x_sl, so a [B, L, V] slice of a bigger
logits tensor (e.g. logits[:, :-1]) needs no copy; the vocabulary dimension must be contiguous.
Every launch runs under the tensors' CUDA device (Triton launches on the current device).
"""

from __future__ import annotations

import contextlib
import os
import struct

import torch
import triton
import triton.language as tl

from ._checks import Hyper, Tokens

_NEG_BIG = tl.constexpr(-1e30)  # finite "minus infinity" for the running max: exp(-inf - _NEG_BIG) = 0, never NaN


@triton.jit
def _hp(hi, lo, cdt: tl.constexpr):
    """A hyperparameter in the compute dtype from its fp32 pair (lo vanishes when cdt is fp32)."""
    return tl.cast(tl.cast(hi, tl.float32), cdt) + tl.cast(tl.cast(lo, tl.float32), cdt)


@triton.jit
def _token_terms(logp, adv, w, counted, old, ref, beta, lo, hi, kl_clamp,
                 HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_CLAMP: tl.constexpr):
    """GRPO terms of one token: (w * per_token, kl, clipped, coef = d loss / d logp); 0 when masked."""
    lp = tl.where(counted, logp, 0.0)
    if HAS_OLD:
        ratio = tl.exp(tl.where(counted, logp - old, 0.0))
    else:
        ratio = tl.full([], 1.0, logp.dtype)  # old = logp.detach(): ratio 1, d ratio / d logp = 1
    clipped_ratio = tl.minimum(tl.maximum(ratio, lo), hi)
    per = -tl.minimum(ratio * adv, clipped_ratio * adv)
    clipped = ((ratio < lo) & (adv < 0)) | ((ratio > hi) & (adv > 0))
    dper = tl.where(clipped, 0.0, -adv * ratio)
    kl = tl.zeros([], logp.dtype)
    if HAS_REF:
        x = ref - lp
        if HAS_CLAMP:
            inside = tl.abs(x) < kl_clamp
            x = tl.minimum(tl.maximum(x, -kl_clamp), kl_clamp)
        else:
            inside = x == x
        ex = tl.exp(x)
        kl = ex - x - 1.0
        per = per + beta * kl
        dper = dper + beta * tl.where(inside, 1.0 - ex, 0.0)
    loss_t = tl.where(counted, w * per, 0.0)
    coef = tl.where(counted, w * dper, 0.0)
    return loss_t, tl.where(counted, kl, 0.0), tl.where(counted & clipped, 1.0, 0.0), coef


@triton.jit(do_not_specialize=["x_rows", "dx_rows"])  # L's divisibility does not matter: no variant per length
def _grpo_rows_kernel(
    X, x_rows, x_sb, x_sl,
    DX, dx_rows, dx_sb, dx_sl,
    IDS, ADV, WGT, MSK, OLD, REF,
    LSE, LOGP, LOSS, KL, CLIP, COEF,
    V,
    inv_t_hi, inv_t_lo, beta_hi, beta_lo, lo_hi, lo_lo, hi_hi, hi_lo, clamp_hi, clamp_lo,
    HAS_MSK: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_CLAMP: tl.constexpr,
    COMPUTE_LSE: tl.constexpr, COMPUTE_LOSS: tl.constexpr, WRITE_DX: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # tokens on axis 0 (axes 1, 2 stop at 65535)
    x_ptr = X + (row // x_rows) * x_sb + (row % x_rows) * x_sl
    cdt: tl.constexpr = LSE.dtype.element_ty  # fp32 (fp64 for fp64 logits)
    inv_t = _hp(inv_t_hi, inv_t_lo, cdt)
    tid = tl.load(IDS + row)
    counted = row >= 0  # every row, unless a mask says otherwise
    if HAS_MSK:
        counted = tl.load(MSK + row) != 0

    if COMPUTE_LSE:
        # sweep 1: online log-sum-exp; one exp per logit plus one per block; none at all for a masked row
        v_end = tl.where(counted, V, 0)
        m = tl.full([], _NEG_BIG, cdt)
        s = tl.zeros([], cdt)
        for start in range(0, v_end, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(x_ptr + cols, mask=cols < V, other=-float("inf")).to(cdt) * inv_t
            m_new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        lse = tl.where(counted, m + tl.log(tl.where(counted, s, 1.0)), 0.0)
        target = tl.load(x_ptr + tid, mask=counted, other=0.0).to(cdt) * inv_t
        logp = tl.where(counted, target - lse, 0.0)
        tl.store(LSE + row, lse)
        tl.store(LOGP + row, logp)
    else:
        lse = tl.load(LSE + row)

    if COMPUTE_LOSS:
        old = tl.zeros([], cdt)
        ref = tl.zeros([], cdt)
        if HAS_OLD:
            old = tl.load(OLD + row)
        if HAS_REF:
            ref = tl.load(REF + row)
        loss_t, kl_t, clip_t, coef = _token_terms(
            logp, tl.load(ADV + row), tl.load(WGT + row), counted, old, ref,
            _hp(beta_hi, beta_lo, cdt), _hp(lo_hi, lo_lo, cdt), _hp(hi_hi, hi_lo, cdt), _hp(clamp_hi, clamp_lo, cdt),
            HAS_OLD, HAS_REF, HAS_CLAMP)
        tl.store(LOSS + row, loss_t)
        tl.store(KL + row, kl_t)
        tl.store(CLIP + row, clip_t)
        tl.store(COEF + row, coef)
    else:
        coef = tl.load(COEF + row).to(cdt)

    if WRITE_DX:
        # sweep 2: recompute softmax from lse and write the gradient (DX may alias X: read before write).
        # A row with coef 0 (masked, or a zero advantage without KL) has gradient 0: zeros, no reads.
        dx_ptr = DX + (row // dx_rows) * dx_sb + (row % dx_rows) * dx_sl
        scale = coef * inv_t
        live = scale != 0
        v_read = tl.where(live, V, 0)  # columns to read: all, or none
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(x_ptr + cols, mask=cols < v_read, other=0.0).to(cdt) * inv_t
            g = tl.where(live, scale * (tl.where(cols == tid, 1.0, 0.0) - tl.exp(z - lse)), 0.0)
            tl.store(dx_ptr + cols, g.to(DX.dtype.element_ty), mask=cols < V)


@triton.jit
def _scale_kernel(X, R, n, BLOCK: tl.constexpr):
    """X *= R[0] in the compute dtype, unless R[0] == 1 (then nothing is read or written)."""
    cdt: tl.constexpr = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    r = tl.load(R).to(cdt)
    if r != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        keep = offs < n
        x = tl.load(X + offs, mask=keep, other=0.0).to(cdt)
        tl.store(X + offs, (x * r).to(X.dtype.element_ty), mask=keep)


# ---- launch configuration ------------------------------------------------------------------------------

# (BLOCK_V, num_warps) per logits dtype for a vocabulary of >= 8192 (Qwen's 151936 / 152064), chosen from the
# kernel's shape (16 bf16 or 8 fp32 elements = 32 bytes per thread per block: two 16-byte loads, registers
# for the row's running max and sum only) before any GPU measured them; `make gpu-check` sweeps the
# alternatives (benchmarks/sweep_row_kernel.py) and this table follows its results.
LAUNCH_TABLE = {
    torch.bfloat16: (4096, 8),
    torch.float16: (4096, 8),
    torch.float32: (2048, 8),
    torch.float64: (1024, 4),
}
SMALL_VOCAB = 8192  # below it: one block of next_power_of_2(V), 4 warps
LAUNCH_OVERRIDE: tuple[int, int] | None = None  # (BLOCK_V, num_warps) for every launch: the sweep sets it


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_config(V: int, dtype: torch.dtype) -> dict:
    """BLOCK_V and num_warps of a launch over rows of V logits of this dtype."""
    if _interpreting():  # numpy executes a block per op: few, large blocks
        return dict(BLOCK_V=min(triton.next_power_of_2(V), 1 << 18))
    if LAUNCH_OVERRIDE is not None:
        block, warps = LAUNCH_OVERRIDE
        return dict(BLOCK_V=block, num_warps=warps)
    if V < SMALL_VOCAB:
        return dict(BLOCK_V=triton.next_power_of_2(V), num_warps=4)
    block, warps = LAUNCH_TABLE.get(dtype, LAUNCH_TABLE[torch.float32])
    return dict(BLOCK_V=block, num_warps=warps)


def device_guard(t: torch.Tensor):
    """Context that makes t's CUDA device the current one (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _split(x: float) -> tuple[float, float]:
    """x as an fp32 pair (hi, lo): hi = fp32(x), lo = fp32(x - hi); hi + lo recovers x to ~2^-48 relative."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]


def _row_layout(x: torch.Tensor):
    """(rows per outer index, outer stride, row stride) of a 2-D [n, V] or 3-D [B, L, V] tensor."""
    if x.stride(-1) != 1:
        raise ValueError("the vocabulary dimension of the logits must be contiguous (stride 1)")
    if x.dim() == 2:
        return max(x.shape[0], 1), 0, x.stride(0)
    return max(x.shape[1], 1), x.stride(0), x.stride(1)


def kernel_args(x, dx, tok_ids, out: dict, hp: Hyper | None, inv_t: float, tok: Tokens | None,
                compute_lse: bool, compute_loss: bool, write_dx: bool, mask: torch.Tensor | None = None):
    """(positional args, keyword args) of one _grpo_rows_kernel launch; the compile test binds them too."""
    V = x.shape[-1]
    dummy = out["lse"]
    x_rows, x_sb, x_sl = _row_layout(x)
    d_rows, d_sb, d_sl = _row_layout(dx) if dx is not None else (1, 0, 0)
    opt = lambda t: dummy if t is None else t  # noqa: E731  (never read: its HAS_* flag is off)
    hp = hp or Hyper(0.0, 0.0, 0.0, inv_t, None, False, False, "grpo", False)
    if mask is None and tok is not None:
        mask = tok.mask
    floats = []
    for v in (inv_t, hp.beta, 1.0 - hp.eps_low, 1.0 + hp.eps_high, hp.kl_clamp or 0.0):
        floats.extend(_split(v))
    args = (
        x, x_rows, x_sb, x_sl,
        dummy if dx is None else dx, d_rows, d_sb, d_sl,
        tok_ids,
        opt(tok and tok.adv), opt(tok and tok.weight), opt(mask), opt(tok and tok.old), opt(tok and tok.ref),
        out["lse"], opt(out.get("logp")), opt(out.get("loss")), opt(out.get("kl")), opt(out.get("clip")),
        opt(out.get("coef")),
        V,
        *floats,
    )
    kwargs = dict(HAS_MSK=mask is not None, HAS_OLD=hp.has_old, HAS_REF=hp.has_ref, HAS_CLAMP=hp.kl_clamp is not None,
                  COMPUTE_LSE=compute_lse, COMPUTE_LOSS=compute_loss, WRITE_DX=write_dx,
                  **launch_config(V, x.dtype))
    return args, kwargs


def _launch(x, dx, tok_ids, out: dict, hp, inv_t, tok, compute_lse, compute_loss, write_dx, mask=None):
    n = tok_ids.numel()
    if n == 0:
        return
    args, kwargs = kernel_args(x, dx, tok_ids, out, hp, inv_t, tok, compute_lse, compute_loss, write_dx, mask)
    with device_guard(x):
        _grpo_rows_kernel[(n,)](*args, **kwargs)


def logprob_rows(x, ids, inv_t: float, lse_out, logp_out, scratch: bool = False, mask=None):
    """lse_out[i] = logsumexp(x_i * inv_t); logp_out[i] = x_i[ids_i] * inv_t - lse_out[i] (x: [n, V] or [B, L, V]).

    mask: [n] or None; rows where it is 0 are not read and get lse = logp = 0."""
    _launch(x, None, ids, {"lse": lse_out, "logp": logp_out}, None, inv_t, None, True, False, False, mask)


def loss_rows(x, tok: Tokens, hp: Hyper, out: dict, dx=None, scratch: bool = False):
    """Token-level GRPO terms per row into out[lse, logp, loss, kl, clip, coef]; with dx, also d loss / d x."""
    _launch(x, dx, tok.ids, out, hp, hp.inv_temperature, tok, True, True, dx is not None)


def dlogit_rows(x, ids, lse, coef, inv_t: float, dx, scratch: bool = False):
    """dx = coef * (onehot(ids) - exp(x * inv_t - lse)) * inv_t (dx may be x itself); rows with coef 0 get zeros."""
    _launch(x, dx, ids, {"lse": lse, "coef": coef}, None, inv_t, None, False, False, True)


def scale_(t: torch.Tensor, ratio: torch.Tensor) -> None:
    """t *= ratio (a one-element tensor on t's device) without a host sync; nothing moves when ratio == 1."""
    flat = t.view(-1)
    n = flat.numel()
    if n == 0:
        return
    block = 1 << 16 if _interpreting() else 4096
    r = ratio.reshape(1).to(torch.float64 if t.dtype == torch.float64 else torch.float32)
    with device_guard(t):
        _scale_kernel[(triton.cdiv(n, block),)](flat, r, n, BLOCK=block)
