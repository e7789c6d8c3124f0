"""The GRPO per-token math in closed form (value and d/d logp), in torch, on [N]-sized tensors.

The Triton kernel carries the same formulas (triton_rows._token_terms); the sequence-level (GSPO)
ratio couples the tokens of a sequence, so it is computed here, after the log-probs, for every backend.

Derivatives (the subgradient torch's autograd picks away from exact ties):
  d pg / d log_ratio = -A * ratio        unless the clipped term is the active one, then 0
  d kl / d logp      = -(exp(x) - 1)     with x = ref - logp, 0 where |x| > kl_clamp
"""

from __future__ import annotations

import torch

from ._checks import Hyper, Prepared


def clip_terms(ratio: torch.Tensor, adv: torch.Tensor, hp: Hyper):
    """pg = -min(ratio*A, clamp(ratio)*A), is_clipped, d pg / d log_ratio."""
    lo, hi = 1.0 - hp.eps_low, 1.0 + hp.eps_high
    pg = -torch.minimum(ratio * adv, ratio.clamp(lo, hi) * adv)
    clipped = ((ratio < lo) & (adv < 0)) | ((ratio > hi) & (adv > 0))
    dpg = torch.where(clipped, torch.zeros_like(ratio), -adv * ratio)
    return pg, clipped, dpg


def kl_terms(logp: torch.Tensor, ref: torch.Tensor, hp: Hyper):
    """k3 = exp(x) - x - 1 of x = clamp(ref - logp) and its derivative in logp."""
    x = ref - logp
    inside = torch.ones_like(x, dtype=torch.bool)
    if hp.kl_clamp is not None:
        inside = x.abs() < hp.kl_clamp
        x = x.clamp(-hp.kl_clamp, hp.kl_clamp)
    ex = torch.exp(x)
    return ex - x - 1, torch.where(inside, 1 - ex, torch.zeros_like(ex))


def token_terms(logp, adv, weight, mask, old, ref, hp: Hyper):
    """Token-level loss terms for a run of tokens (all [n]).

    Returns (loss_t, kl_t, clip_t, coef_t): the token's weighted loss, its masked k3, its masked
    clipped flag and coef_t = d loss / d logp_t. Masked tokens give exact zeros (torch.where, not *).
    """
    counted = mask != 0
    zero = torch.zeros_like(logp)
    if hp.has_old:
        ratio = torch.exp(torch.where(counted, logp - old, zero))
    else:
        ratio = torch.ones_like(logp)
    pg, clipped, dpg = clip_terms(ratio, adv, hp)
    per, dper = pg, dpg
    kl = zero
    if hp.has_ref:
        kl, dkl = kl_terms(torch.where(counted, logp, zero), ref, hp)
        per, dper = pg + hp.beta * kl, dpg + hp.beta * dkl
    loss_t = torch.where(counted, weight * per, zero)
    coef_t = torch.where(counted, weight * dper, zero)
    return loss_t, torch.where(counted, kl, zero), torch.where(counted & clipped, 1.0, zero), coef_t


def sequence_terms(logp: torch.Tensor, prep: Prepared):
    """Sequence-level (GSPO) terms from the log-probs of all tokens (logp [N]); same returns as token_terms.

    log_ratio_b = sum_t m_t (logp_t - old_t) / max(n_b, 1) is shared by the sequence, so
    d loss / d logp_t = W_b * d pg_b / d log_ratio_b * m_t / max(n_b, 1) + w_t * beta * d kl_t / d logp_t,
    with W_b = sum_t w_t the sequence's total loss weight.
    """
    hp, tok, B, L = prep.hp, prep.tok, prep.batch, prep.length
    counted = (tok.mask != 0).view(B, L)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    lp = torch.where(counted, logp.view(B, L), zero)
    n_b = prep.seq_len_counts.clamp(min=1)
    log_ratio = torch.where(counted, lp - tok.old.view(B, L), zero).sum(1) / n_b  # [B]
    adv_b = tok.adv.view(B, L)[:, 0]
    pg_b, clipped_b, dpg_b = clip_terms(torch.exp(log_ratio), adv_b, hp)
    w = tok.weight.view(B, L)
    W_b = w.sum(1)
    loss_t = w * pg_b.unsqueeze(1)
    coef_t = (W_b * dpg_b / n_b).unsqueeze(1) * tok.mask.view(B, L)
    kl = torch.zeros_like(lp)
    if hp.has_ref:
        kl, dkl = kl_terms(lp, tok.ref.view(B, L), hp)
        loss_t = loss_t + w * hp.beta * kl
        coef_t = coef_t + w * hp.beta * dkl
    loss_t = torch.where(counted, loss_t, zero)
    coef_t = torch.where(counted, coef_t, zero)
    kl = torch.where(counted, kl, zero)
    clip_t = torch.where(counted & clipped_b.unsqueeze(1), 1.0, zero)
    return loss_t.reshape(-1), kl.reshape(-1), clip_t.reshape(-1), coef_t.reshape(-1)


def finish(loss_t, kl_t, clip_t, prep: Prepared):
    """Sum the per-token terms into (loss, {"kl", "clip_ratio"}) (deterministic torch sums)."""
    return loss_t.sum(), {"kl": kl_t.sum() / prep.n_tokens, "clip_ratio": clip_t.sum() / prep.n_tokens}
