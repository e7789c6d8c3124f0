"""The oracle: the GRPO loss written as plain torch formulas, differentiable by autograd.

Nothing here is fused or chunked; every line is the math of issue 3 as written. Pass float64 tensors
for an exact reference (the tests do). The kernels in this package must agree with these functions.

    logp_t    = log_softmax(logits_t / temperature)[id_t]
    log_ratio = logp - old                      (token level)
              = masked mean over the sequence   (sequence level, GSPO), broadcast over its tokens
    ratio     = exp(log_ratio)                  (old = logp.detach() when old_logprobs is None)
    pg        = -min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
    x         = clamp(ref - logp, -kl_clamp, kl_clamp);   kl = exp(x) - x - 1
    per_token = pg + beta * kl
    grpo      = mean over sequences of sum_t(per_token * m) / max(sum_t m, 1)
    bnpo      = sum(per_token * m) / max(sum(m), 1)
    dr_grpo   = sum(per_token * m) / (B * max_completion_length)
    dapo      = sum(per_token * m) / max(num_items, 1)
    metrics   = {"kl": masked mean of kl, "clip_ratio": masked fraction of tokens whose clipped
                 term is the active one, i.e. (ratio < 1 - eps_low and A < 0) or (ratio > 1 + eps_high and A > 0)}

Masked tokens are taken out of the arithmetic with torch.where before anything is computed from
them, so garbage (inf, NaN, -100 ids) at masked positions never reaches the loss or the gradients.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS = ("token", "sequence")


def reference_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / temperature) gathered at ids.

    logits: [..., V] float; ids: [...] int64 in [0, V). Returns [...] in logits' dtype (differentiable).
    """
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def reference_grpo_from_logprobs(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.04,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    loss_type: str = "grpo",
    importance_level: str = "token",
    kl_clamp: float | None = 10.0,
    max_completion_length: int | None = None,
    num_items: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss from per-token log-probs logp [B, L] (differentiable). Returns (loss, metrics)."""
    B, L = logp.shape
    m = completion_mask != 0
    mf = m.to(logp.dtype)
    logp = torch.where(m, logp, torch.zeros_like(logp))
    old = logp.detach() if old_logprobs is None else torch.where(m, old_logprobs.to(logp.dtype), 0.0)
    adv = advantages.to(logp.dtype).unsqueeze(1)  # [B, 1]

    log_ratio = logp - old
    if importance_level == "sequence":
        log_ratio = (log_ratio * mf).sum(1, keepdim=True) / mf.sum(1, keepdim=True).clamp(min=1)  # [B, 1]
    elif importance_level != "token":
        raise ValueError(f"importance_level must be one of {IMPORTANCE_LEVELS}, got {importance_level!r}")
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    pg = -torch.minimum(ratio * adv, clipped_ratio * adv)
    is_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))

    if ref_logprobs is not None:
        x = torch.where(m, ref_logprobs.to(logp.dtype), 0.0) - logp
        if kl_clamp is not None:
            x = x.clamp(-kl_clamp, kl_clamp)
        kl = torch.exp(x) - x - 1
    else:
        if beta != 0:
            raise ValueError("ref_logprobs is required when beta != 0")
        kl = torch.zeros_like(logp)

    per_token = (pg + beta * kl) * mf  # pg broadcasts from [B, 1] at sequence level
    if loss_type == "grpo":
        loss = ((per_token.sum(1) / mf.sum(1).clamp(min=1))).sum() / B
    elif loss_type == "bnpo":
        loss = per_token.sum() / mf.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (B * (L if max_completion_length is None else max_completion_length))
    elif loss_type == "dapo":
        denom = mf.sum() if num_items is None else torch.as_tensor(float(num_items), dtype=logp.dtype)
        loss = per_token.sum() / denom.clamp(min=1)
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")

    n_tokens = mf.sum().clamp(min=1)
    metrics = {
        "kl": ((kl * mf).sum() / n_tokens).detach(),
        "clip_ratio": ((is_clipped.expand_as(mf).to(logp.dtype) * mf).sum() / n_tokens).detach(),
    }
    return loss, metrics


def reference_grpo_loss(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.04,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    temperature: float = 1.0,
    loss_type: str = "grpo",
    importance_level: str = "token",
    kl_clamp: float | None = 10.0,
    max_completion_length: int | None = None,
    num_items: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss from logits [B, L, V] (see the module docstring). Returns (loss, metrics).

    Low-precision logits are upcast to float32 first (what TRL does); pass float64 for the oracle.
    """
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    counted = completion_mask != 0
    ids = torch.where(counted, completion_ids, torch.zeros_like(completion_ids))
    logits = torch.where(counted.unsqueeze(-1), logits, 0.0)  # garbage rows (e.g. all -inf) stay out
    logp = reference_logprobs(logits, ids, temperature)
    return reference_grpo_from_logprobs(
        logp, advantages, completion_mask, old_logprobs, ref_logprobs, beta, eps_low, eps_high,
        loss_type, importance_level, kl_clamp, max_completion_length, num_items,
    )


def reference_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss of logits = hidden [B, L, H] @ weight[V, H].T (+ bias [V]); same keywords as reference_grpo_loss."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return reference_grpo_loss(logits, completion_ids, advantages, completion_mask, **kwargs)
