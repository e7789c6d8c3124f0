"""GRPO loss on materialised logits [B, L, V]: forward kernel -> lse, logp, loss terms; backward kernel -> dlogits.

Forward streams each token's logits once (online log-sum-exp, fp32 accumulation) and keeps only lse
and d loss / d logp per token; backward recomputes the softmax from lse and writes the gradient:
three passes over N x V in all. With inplace=True the gradient is written into the logits buffer
during the forward (the logits tensor is consumed): autograd is told through mark_dirty, so any
other use of those logits in the graph raises instead of silently reading the gradient.
"""

from __future__ import annotations

import torch

from . import torch_rows
from ._checks import FLOAT_DTYPES, Prepared, check_ids, check_tensor, compute_dtype, prepare_grpo, resolve_backend
from ._grads import hand_over, save_grads
from ._math import finish, sequence_terms

_TORCH_CHUNK_BYTES = 64 << 20  # fp32 scratch per row chunk of the pure-torch path


def rows_impl(backend: str):
    """The row-op module of a backend ('triton' imports triton lazily: `import kernels` stays light)."""
    if backend == "triton":
        from . import triton_rows

        return triton_rows
    return torch_rows


def row_blocks(x: torch.Tensor, rows_per_block: int | None):
    """Yield (r0, r1, view) covering the flattened rows of x [B, L, V] without copying it.

    rows_per_block None: the whole tensor at once (the Triton kernels take any row layout).
    """
    B, L, V = x.shape
    if rows_per_block is None:
        yield 0, B * L, x
        return
    try:
        flat = x.view(B * L, V)
    except RuntimeError:  # e.g. logits[:, :-1]: rows are not uniformly strided; go sequence by sequence
        for b in range(B):
            for l0 in range(0, L, rows_per_block):
                l1 = min(L, l0 + rows_per_block)
                yield b * L + l0, b * L + l1, x[b, l0:l1]
        return
    for r0 in range(0, B * L, rows_per_block):
        r1 = min(B * L, r0 + rows_per_block)
        yield r0, r1, flat[r0:r1]


def _torch_rows_per_block(V: int, dtype: torch.dtype) -> int:
    return max(1, _TORCH_CHUNK_BYTES // (V * torch.finfo(compute_dtype(dtype)).bits // 8))


def _empty_out(n: int, cdt: torch.dtype, device) -> dict:
    return {k: torch.empty(n, dtype=cdt, device=device) for k in ("lse", "logp", "loss", "kl", "clip", "coef")}


class _GRPOLogitsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, prep: Prepared, backend: str, want_grad: bool, inplace: bool):
        rows = rows_impl(backend)
        hp, tok = prep.hp, prep.tok
        B, L, V = logits.shape
        cdt = compute_dtype(logits.dtype)
        out = _empty_out(B * L, cdt, logits.device)
        per_block = None if backend == "triton" else _torch_rows_per_block(V, logits.dtype)
        write_now = inplace and want_grad
        for r0, r1, x in row_blocks(logits, per_block):
            o = {k: v[r0:r1] for k, v in out.items()}
            if hp.sequence_level:
                rows.logprob_rows(x, tok.ids[r0:r1], hp.inv_temperature, o["lse"], o["logp"])
            else:
                rows.loss_rows(x, tok.rows(r0, r1), hp, o, dx=x if write_now else None)
        if hp.sequence_level:  # the ratio needs every token of the sequence: [B, L]-sized torch math
            out["loss"], out["kl"], out["clip"], out["coef"] = sequence_terms(out["logp"], prep)
            if write_now:
                for r0, r1, x in row_blocks(logits, per_block):
                    rows.dlogit_rows(x, tok.ids[r0:r1], out["lse"][r0:r1], out["coef"][r0:r1],
                                     hp.inv_temperature, dx=x)
        loss, metrics = finish(out["loss"], out["kl"], out["clip"], prep)
        kl, clip = metrics["kl"], metrics["clip_ratio"]
        ctx.mark_non_differentiable(kl, clip)
        ctx.inplace, ctx.backend, ctx.inv_t, ctx.per_block = write_now, backend, hp.inv_temperature, per_block
        if write_now:
            ctx.mark_dirty(logits)
            save_grads(ctx, logits)  # the buffer now holds d loss / d logits
            return loss, kl, clip, logits
        if want_grad:
            ctx.save_for_backward(logits, tok.ids, out["lse"], out["coef"])
        return loss, kl, clip

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if ctx.inplace:
            return hand_over(ctx, grad_loss)[0], None, None, None, None
        logits, ids, lse, coef = ctx.saved_tensors
        rows = rows_impl(ctx.backend)
        coef = coef * grad_loss.to(coef.dtype)
        dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # contiguous
        flat = dlogits.view(-1, logits.shape[-1])
        for r0, r1, x in row_blocks(logits, ctx.per_block):
            dx = dlogits if x.dim() == 3 else flat[r0:r1]
            rows.dlogit_rows(x, ids[r0:r1], lse[r0:r1], coef[r0:r1], ctx.inv_t, dx=dx)
        return dlogits, None, None, None, None


def _check_logits(logits: torch.Tensor) -> tuple[int, int, int]:
    check_tensor("logits", logits, ndim=3, dtypes=FLOAT_DTYPES)
    B, L, V = logits.shape
    if V < 1:
        raise ValueError(f"logits must have a vocabulary dimension V >= 1, got shape {tuple(logits.shape)}")
    return B, L, V


def grpo_loss(
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
    *,
    backend: str = "auto",
    inplace: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fused GRPO loss on logits; the math is kernels.reference.reference_grpo_loss.

    Args:
        logits: [B, L, V] float32/bfloat16/float16 (float64 for checks); logits[:, t] predicts
            completion_ids[:, t]. Any strides with a contiguous V dimension (a slice like
            full_logits[:, :-1] is not copied).
        completion_ids: [B, L] integer, in [0, V) where counted (masked positions may hold anything,
            e.g. -100).
        advantages: [B] float. completion_mask: [B, L] bool/int/float, nonzero = counted.
        old_logprobs: [B, L] float or None (on-policy: ratio = exp(logp - logp.detach())).
        ref_logprobs: [B, L] float; required when beta > 0.
        beta, eps_low, eps_high, temperature, kl_clamp (None = off): floats, see the reference.
        loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo". importance_level: "token" | "sequence" (GSPO).
        max_completion_length: dr_grpo normaliser (default L). num_items: dapo normaliser, used as
            given (default: counted tokens of this batch); under gradient averaging over W ranks pass
            the global count / W.
        backend: "auto" (Triton on CUDA, pure torch elsewhere) | "triton" (CUDA, or CPU under
            TRITON_INTERPRET=1) | "torch" (chunked pure torch, any device).
        inplace: write d loss / d logits into the logits buffer during the forward (saves N x V memory;
            the logits tensor is consumed; autograd-safe through mark_dirty). Default off.

    Returns:
        (loss, metrics): loss is a scalar float32 (float64 for float64 logits) tensor with a grad_fn
        when logits requires grad; metrics = {"kl": masked mean k3, "clip_ratio": masked fraction of
        tokens whose clipped term is active}, detached scalars.
    """
    B, L, V = _check_logits(logits)
    backend = resolve_backend(backend, logits.device)
    cdt = compute_dtype(logits.dtype)
    prep = prepare_grpo((B, L), V, logits.device, cdt, completion_ids, advantages, completion_mask, old_logprobs,
                        ref_logprobs, beta, eps_low, eps_high, temperature, loss_type, importance_level, kl_clamp,
                        max_completion_length, num_items)
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    result = _GRPOLogitsFunction.apply(logits, prep, backend, want_grad, bool(inplace))
    loss, kl, clip = result[:3]
    return loss, {"kl": kl.detach(), "clip_ratio": clip.detach()}


@torch.no_grad()
def selective_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, *,
                       backend: str = "auto") -> torch.Tensor:
    """log_softmax(logits / temperature) at ids, without materialising the log-softmax; no grad.

    logits: [B, L, V] float (any strides with contiguous V); ids: [B, L] integer in [0, V).
    Returns [B, L] float32 (float64 for float64 logits).
    """
    from ._checks import check_float

    B, L, V = _check_logits(logits)
    check_tensor("ids", ids, ndim=2)
    if tuple(ids.shape) != (B, L):
        raise ValueError(f"ids must have shape (B, L) = {(B, L)}, got {tuple(ids.shape)}")
    if ids.device != logits.device:
        raise ValueError(f"ids is on {ids.device} but logits is on {logits.device}")
    inv_t = 1.0 / check_float("temperature", temperature, low=0.0, low_inclusive=False)
    backend = resolve_backend(backend, logits.device)
    flat_ids = check_ids("ids", ids, V).reshape(-1).contiguous()
    cdt = compute_dtype(logits.dtype)
    lse = torch.empty(B * L, dtype=cdt, device=logits.device)
    logp = torch.empty_like(lse)
    rows = rows_impl(backend)
    per_block = None if backend == "triton" else _torch_rows_per_block(V, logits.dtype)
    for r0, r1, x in row_blocks(logits, per_block):
        rows.logprob_rows(x, flat_ids[r0:r1], inv_t, lse[r0:r1], logp[r0:r1])
    return logp.view(B, L)
