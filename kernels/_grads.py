"""Handing gradients computed in the forward over to autograd, scaled by the incoming grad_output.

The fused paths compute d loss / d input during the forward (no recomputation) and save it. In
backward the saved buffers are scaled in place by grad_output (no copy of a [V, H] gradient), and
the scale they hold is remembered, so a retained graph can be backpropagated again. Saved with
save_for_backward, the buffers are released right after backward (unless the graph is retained),
so autograd adopts them as .grad instead of copying.
"""

from __future__ import annotations

import torch


def save_grads(ctx, *grads: torch.Tensor | None) -> None:
    ctx.save_for_backward(*grads)
    ctx.grad_scale = 1.0


def hand_over(ctx, grad_output: torch.Tensor | None) -> list:
    """The saved gradients scaled to grad_output (None when it is None or zero: zero gradient)."""
    grads = list(ctx.saved_tensors)
    g = 0.0 if grad_output is None else float(grad_output)
    if g == 0.0:
        return [None] * len(grads)
    if g != ctx.grad_scale:
        ratio = g / ctx.grad_scale
        for t in grads:
            if t is not None:
                t.data.mul_(ratio)  # .data: our own buffer; no version bump to trip the saved-tensor check
        ctx.grad_scale = g
    return grads
