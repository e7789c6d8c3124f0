"""Fused GRPO loss kernels (Triton); standalone: depends on torch and triton only.

    loss, metrics = kernels.grpo_loss(logits, completion_ids, advantages, completion_mask, ...)
        # logits: the model's full [B, L + 1, V] or [B, L, V]
    loss, metrics = kernels.linear_grpo_loss(hidden, weight, completion_ids, advantages, completion_mask,
                                             bias=None, ...)
    logp = kernels.selective_logprobs(logits, ids, temperature=1.0, mask=None)
    logp = kernels.linear_selective_logprobs(hidden, weight, ids, bias=None, temperature=1.0, mask=None)

Each takes backend="auto" | "triton" | "torch": "auto" runs the Triton kernels on CUDA tensors and
the chunked pure-torch path (same algorithm, same memory behaviour) elsewhere. The math is
kernels.reference; see kernels/README.md for the design and the measured numbers.
Importing this package does not import triton (only backend "triton" does).
"""

from .grpo_loss import grpo_loss, selective_logprobs
from .linear_grpo_loss import linear_grpo_loss, linear_selective_logprobs

__all__ = ["grpo_loss", "linear_grpo_loss", "selective_logprobs", "linear_selective_logprobs"]
