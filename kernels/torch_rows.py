"""Pure-torch row ops: the same per-row algorithm as the Triton kernels, on a chunk of logit rows.

Used by the "torch" backend (the CPU trainer's path). Each op works on x [n, V] (rows of logits) and
never holds more than one [n, V] scratch buffer: callers pass row chunks small enough for their
memory budget. With scratch=True the op may overwrite x (the fused-linear path owns its buffer);
otherwise it works on a copy of x.
"""

from __future__ import annotations

import torch

from ._checks import Hyper, Tokens, compute_dtype, host_reads_free
from ._math import token_terms


def _scratch(x: torch.Tensor, scratch: bool, dx: torch.Tensor | None = None) -> torch.Tensor:
    """A compute-dtype buffer holding x that the op may destroy: x itself when allowed (scratch, or x is
    the gradient's destination), else the gradient's destination when its dtype fits, else a copy."""
    cdt = compute_dtype(x.dtype)
    if x.dtype == cdt and (scratch or dx is x):
        return x
    if dx is not None and dx.dtype == cdt:
        return dx.copy_(x)
    return x.to(cdt, copy=True)


def _exp_rows_(s: torch.Tensor, ids: torch.Tensor, inv_t: float):
    """In place: s <- exp(s*inv_t - rowmax). Returns (target logit * inv_t, row sum of exp, row max, lse)."""
    if inv_t != 1.0:
        s.mul_(inv_t)
    target = s.gather(1, ids.unsqueeze(1)).squeeze(1)
    row_max = s.amax(1)
    s.sub_(row_max.unsqueeze(1)).exp_()
    row_sum = s.sum(1)
    return target, row_sum, row_max, row_max + row_sum.log()


def _grad_from_exp_(s: torch.Tensor, ids: torch.Tensor, row_sum, coef, inv_t: float, dx: torch.Tensor, row_shift):
    """s holds exp(z - row_shift) (row_sum its row sums); write dx = coef * (onehot(ids) - softmax) * inv_t.

    s is destroyed. Rows with coef 0 (masked) become exact zeros even when their logits are garbage."""
    scale = coef * inv_t
    s.mul_((-scale / row_sum).unsqueeze(1))
    s.scatter_add_(1, ids.unsqueeze(1), scale.to(s.dtype).unsqueeze(1))
    bad = ~torch.isfinite(row_shift)
    # only rows of garbage logits (all -inf, +inf, NaN) can make NaN here; the test is free on the CPU,
    # elsewhere the fill always runs (no host sync)
    if not host_reads_free(s) or bool(bad.any()):
        s.masked_fill_((bad & (scale == 0)).unsqueeze(1), 0.0)
    if dx is not s:
        dx.copy_(s)


def logprob_rows(x: torch.Tensor, ids: torch.Tensor, inv_t: float, lse_out, logp_out, scratch: bool = False,
                 mask=None):
    """lse_out[i] = logsumexp(x_i * inv_t); logp_out[i] = x_i[ids_i] * inv_t - lse_out[i].

    mask must be None: the callers gather the counted rows before calling the torch path."""
    assert mask is None, "the torch path takes gathered rows"
    s = _scratch(x, scratch)
    target, _, _, lse = _exp_rows_(s, ids, inv_t)
    lse_out.copy_(lse)
    logp_out.copy_(target - lse)


def loss_rows(x: torch.Tensor, tok: Tokens, hp: Hyper, out: dict, dx: torch.Tensor | None = None,
              scratch: bool = False):
    """Token-level GRPO terms of each row, and optionally the gradient of the loss w.r.t. x.

    out: dict of [n] tensors "lse", "logp", "loss", "kl", "clip", "coef" to fill.
    dx: None, or [n, V] to receive d loss / d x (may be x itself when scratch=True).
    """
    s = _scratch(x, scratch, dx)
    target, row_sum, row_max, lse = _exp_rows_(s, tok.ids, hp.inv_temperature)
    logp = target - lse
    loss_t, kl_t, clip_t, coef = token_terms(logp, tok.adv, tok.weight, tok.mask, tok.old, tok.ref, hp)
    for name, value in (("lse", lse), ("logp", logp), ("loss", loss_t), ("kl", kl_t), ("clip", clip_t),
                        ("coef", coef)):
        out[name].copy_(value)
    if dx is not None:
        _grad_from_exp_(s, tok.ids, row_sum, coef, hp.inv_temperature, dx, row_max)


def dlogit_rows(x: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor, inv_t: float,
                dx: torch.Tensor, scratch: bool = False):
    """dx = coef * (onehot(ids) - exp(x * inv_t - lse)) * inv_t: the gradient from d loss / d logp = coef."""
    s = _scratch(x, scratch, dx)
    if inv_t != 1.0:
        s.mul_(inv_t)
    s.sub_(lse.unsqueeze(1)).exp_()
    _grad_from_exp_(s, ids, torch.ones_like(lse), coef, inv_t, dx, lse)
