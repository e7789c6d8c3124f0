"""Triton row kernels: one program per token (grid axis 0), streaming the token's V logits in blocks.

One kernel, three modes chosen by constexpr flags:
  log-probs  sweep 1: online log-sum-exp over vocabulary blocks (fp32, or fp64 for fp64 input) -> lse, logp
  loss       sweep 1 + the token-level GRPO terms (ratio, clip, k3 KL, weight) -> loss_t, kl_t, clip_t, coef_t;
             with WRITE_DX a second sweep writes d loss / d logits = coef * (onehot - softmax) / T
  dlogits    given lse and coef (the backward of the logits path, pass 2 of sequence-level): sweep 2 only
Float hyperparameters are tl.constexpr (DESIGN.md: torch.compile would pass Python floats as fp64).
Row r of X is at X + (r // x_rows) * x_sb + (r % x_rows) * x_sl, so a [B, L, V] slice of a bigger
logits tensor (e.g. logits[:, :-1]) needs no copy; the vocabulary dimension must be contiguous.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._checks import Hyper, Tokens

_NEG_BIG = tl.constexpr(-1e30)  # finite "minus infinity" for the running max: exp(-inf - _NEG_BIG) = 0, never NaN


@triton.jit
def _token_terms(logp, adv, w, msk, old, ref, BETA: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
                 KL_CLAMP: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_CLAMP: tl.constexpr):
    """GRPO terms of one token: (w * per_token, kl, clipped, coef = d loss / d logp); 0 when masked."""
    counted = msk != 0
    # constexpr floats would enter as fp32 constants; build them in the compute dtype (exact for fp64 checks)
    beta = tl.full([], BETA, logp.dtype)
    lo = tl.full([], LO, logp.dtype)
    hi = tl.full([], HI, logp.dtype)
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
            kl_clamp = tl.full([], KL_CLAMP, logp.dtype)
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


@triton.jit
def _grpo_rows_kernel(
    X, x_rows, x_sb, x_sl,
    DX, dx_rows, dx_sb, dx_sl,
    IDS, ADV, WGT, MSK, OLD, REF,
    LSE, LOGP, LOSS, KL, CLIP, COEF,
    V,
    INV_T: tl.constexpr, BETA: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, KL_CLAMP: tl.constexpr,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_CLAMP: tl.constexpr,
    COMPUTE_LSE: tl.constexpr, COMPUTE_LOSS: tl.constexpr, WRITE_DX: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # tokens on axis 0 (axes 1, 2 stop at 65535)
    x_ptr = X + (row // x_rows) * x_sb + (row % x_rows) * x_sl
    cdt = LSE.dtype.element_ty  # fp32 (fp64 for fp64 logits)
    inv_t = tl.full([], INV_T, cdt)
    tid = tl.load(IDS + row)

    if COMPUTE_LSE:
        # sweep 1: online log-sum-exp; one exp per logit plus one per block
        m = tl.full([], _NEG_BIG, cdt)
        s = tl.zeros([], cdt)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(x_ptr + cols, mask=cols < V, other=-float("inf")).to(cdt) * inv_t
            m_new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        logp = tl.load(x_ptr + tid).to(cdt) * inv_t - lse
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
            logp, tl.load(ADV + row), tl.load(WGT + row), tl.load(MSK + row), old, ref,
            BETA, LO, HI, KL_CLAMP, HAS_OLD, HAS_REF, HAS_CLAMP)
        tl.store(LOSS + row, loss_t)
        tl.store(KL + row, kl_t)
        tl.store(CLIP + row, clip_t)
        tl.store(COEF + row, coef)
    else:
        coef = tl.load(COEF + row).to(cdt)

    if WRITE_DX:
        # sweep 2: recompute softmax from lse and write the gradient (DX may alias X: read before write)
        dx_ptr = DX + (row // dx_rows) * dx_sb + (row % dx_rows) * dx_sl
        scale = coef * inv_t
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(x_ptr + cols, mask=cols < V, other=-float("inf")).to(cdt) * inv_t
            g = scale * (tl.where(cols == tid, 1.0, 0.0) - tl.exp(z - lse))
            g = tl.where(scale != 0, g, 0.0)  # masked rows: exact zeros even if their logits are garbage
            tl.store(dx_ptr + cols, g.to(DX.dtype.element_ty), mask=cols < V)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch_config(V: int):
    if _interpreting():  # numpy executes a block per op: few, large blocks
        return dict(BLOCK_V=min(triton.next_power_of_2(V), 1 << 18))
    return dict(BLOCK_V=min(triton.next_power_of_2(V), 4096), num_warps=8)


def _row_layout(x: torch.Tensor):
    """(rows per outer index, outer stride, row stride) of a 2-D [n, V] or 3-D [B, L, V] tensor."""
    if x.stride(-1) != 1:
        raise ValueError("the vocabulary dimension of the logits must be contiguous (stride 1)")
    if x.dim() == 2:
        return max(x.shape[0], 1), 0, x.stride(0)
    return max(x.shape[1], 1), x.stride(0), x.stride(1)


def _launch(x, dx, tok_ids, out: dict, hp: Hyper | None, inv_t: float, tok: Tokens | None,
            compute_lse: bool, compute_loss: bool, write_dx: bool):
    n = tok_ids.numel()
    if n == 0:
        return
    V = x.shape[-1]
    dummy = out["lse"]
    x_rows, x_sb, x_sl = _row_layout(x)
    d_rows, d_sb, d_sl = _row_layout(dx) if dx is not None else (1, 0, 0)
    opt = lambda t: dummy if t is None else t  # noqa: E731  (never read: its HAS_* flag is off)
    hp = hp or Hyper(0.0, 0.0, 0.0, inv_t, None, False, False, "grpo", False)
    _grpo_rows_kernel[(n,)](
        x, x_rows, x_sb, x_sl,
        dummy if dx is None else dx, d_rows, d_sb, d_sl,
        tok_ids,
        opt(tok and tok.adv), opt(tok and tok.weight), opt(tok and tok.mask), opt(tok and tok.old),
        opt(tok and tok.ref),
        out["lse"], opt(out.get("logp")), opt(out.get("loss")), opt(out.get("kl")), opt(out.get("clip")),
        opt(out.get("coef")),
        V,
        INV_T=float(inv_t), BETA=hp.beta, LO=1.0 - hp.eps_low, HI=1.0 + hp.eps_high,
        KL_CLAMP=float(hp.kl_clamp or 0.0), HAS_OLD=hp.has_old, HAS_REF=hp.has_ref,
        HAS_CLAMP=hp.kl_clamp is not None,
        COMPUTE_LSE=compute_lse, COMPUTE_LOSS=compute_loss, WRITE_DX=write_dx,
        **_launch_config(V),
    )


def logprob_rows(x, ids, inv_t: float, lse_out, logp_out, scratch: bool = False):
    """lse_out[i] = logsumexp(x_i * inv_t); logp_out[i] = x_i[ids_i] * inv_t - lse_out[i] (x: [n, V] or [B, L, V])."""
    _launch(x, None, ids, {"lse": lse_out, "logp": logp_out}, None, inv_t, None, True, False, False)


def loss_rows(x, tok: Tokens, hp: Hyper, out: dict, dx=None, scratch: bool = False):
    """Token-level GRPO terms per row into out[lse, logp, loss, kl, clip, coef]; with dx, also d loss / d x."""
    _launch(x, dx, tok.ids, out, hp, hp.inv_temperature, tok, True, True, dx is not None)


def dlogit_rows(x, ids, lse, coef, inv_t: float, dx, scratch: bool = False):
    """dx = coef * (onehot(ids) - exp(x * inv_t - lse)) * inv_t (dx may be x itself)."""
    _launch(x, dx, ids, {"lse": lse, "coef": coef}, None, inv_t, None, False, False, True)
