"""Handing gradients computed in the forward over to autograd, scaled by the incoming grad_output.

The fused paths compute d loss / d input during the forward (no recomputation) and save it. In
backward the saved buffers are scaled in place by grad_output (no copy of a [V, H] gradient), and
the scale they hold is remembered (as a tensor), so a retained graph can be backpropagated again.
Saved with save_for_backward, the buffers are released right after backward (unless the graph is
retained), so autograd adopts them as .grad instead of copying.

No host sync: grad_output stays a tensor. On the CPU its value is read (free there) and a scale of 1
touches nothing; with backend "triton" a kernel reads the ratio on the device and, when it is 1 (a
plain loss.backward()), returns without reading or writing the buffer; otherwise (backend "torch"
on a GPU) the buffers are multiplied, one pass.
"""

from __future__ import annotations

import torch

from ._checks import host_reads_free


def save_grads(ctx, *grads: torch.Tensor | None) -> None:
    ctx.save_for_backward(*grads)
    ctx.grad_scale = None  # the buffers hold the gradient for grad_output = 1


def scale_buffer_(t: torch.Tensor, ratio: torch.Tensor, backend: str) -> None:
    """t *= ratio in place (ratio: a one-element tensor), without a host sync on CUDA."""
    if host_reads_free(ratio) and host_reads_free(t):
        r = float(ratio)
        if r != 1.0:
            t.data.mul_(r)  # .data: our own buffer; no version bump to trip the saved-tensor check
    elif backend == "triton":
        from .triton_rows import scale_

        scale_(t.data, ratio)
    else:
        t.data.mul_(ratio.to(t.dtype))


def hand_over(ctx, grad_output: torch.Tensor | None, backend: str = "torch") -> list:
    """The saved gradients scaled to grad_output (None when it is None: no gradient flows)."""
    grads = list(ctx.saved_tensors)
    if grad_output is None:
        return [None] * len(grads)
    g = grad_output.detach().reshape(())
    if host_reads_free(g) and float(g) == 0.0:
        return [None] * len(grads)  # zero gradient; the buffers keep their scale for a retained graph
    # (on a GPU a zero grad_output zeroes the buffers: a later backward of the same retained graph then gives NaN)
    ratio = g if ctx.grad_scale is None else g / ctx.grad_scale
    for t in grads:
        if t is not None:
            scale_buffer_(t, ratio, backend)
    ctx.grad_scale = g.clone()
    return grads
