"""GRPO loss on materialised logits: forward kernel -> lse, logp, loss terms; backward kernel -> dlogits.

The logits come in either form: [B, L, V] (logits[:, t] predicts completion token t) or the model's
full [B, L + 1, V] (the last position unused), whose gradient is then written at that shape
directly, so autograd's slice backward does not zero-fill and copy the whole tensor.

Forward streams each counted token's logits once (online log-sum-exp, fp32 accumulation) and keeps
only lse and d loss / d logp per token; backward recomputes the softmax from lse and writes the
gradient. Bytes moved per logit (bf16, forward + backward): read 2 + read 2 + write 2 = 6 for the
full form; the sliced form adds autograd's zero-fill (2) and copy (2 + 2): 12. A masked token is not
read at all (its gradient row is written as zeros: 2 bytes per logit).

With inplace=True the gradient is written into the logits buffer during the forward (the logits are
consumed): the in-place function returns only the overwritten buffer (so it also works on a view
such as logits[:, :-1]) and autograd bumps its version counter, so any other use of those logits
that autograd saved raises at backward instead of silently reading the gradient.
"""

from __future__ import annotations

import torch

from . import torch_rows
from ._checks import (FLOAT_DTYPES, Prepared, check_ids, check_mask, check_tensor, compute_dtype, prepare_grpo,
                      resolve_backend)
from ._grads import hand_over, save_grads
from ._math import finish, sequence_terms

_TORCH_CHUNK_BYTES = 64 << 20  # fp32 scratch per row chunk of the pure-torch path


def rows_impl(backend: str):
    """The row-op module of a backend ('triton' imports triton lazily: `import kernels` stays light)."""
    if backend == "triton":
        from . import triton_rows

        return triton_rows
    return torch_rows


def _torch_rows_per_block(V: int, dtype: torch.dtype) -> int:
    return max(1, _TORCH_CHUNK_BYTES // (V * torch.finfo(compute_dtype(dtype)).bits // 8))


def _empty_out(n: int, cdt: torch.dtype, device) -> dict:
    return {k: torch.empty(n, dtype=cdt, device=device) for k in ("lse", "logp", "loss", "kl", "clip", "coef")}


def completion_rows(logits: torch.Tensor, L: int) -> torch.Tensor:
    """The [B, L, V] rows that predict the completion: logits itself, or a view of the full [B, L + 1, V]."""
    return logits if logits.shape[1] == L else logits[:, :L]


def row_runs(mask: torch.Tensor | None, B: int, L: int, rows_per_block: int, counted: bool = True):
    """(b, l0, l1) blocks of at most rows_per_block rows, each inside one sequence, covering the counted
    rows (counted=True) or the masked ones (False) of a [B, L] mask (None = every row counted).

    A run of rows of one sequence is a plain [n, V] view of the logits at any outer strides, so the
    torch path reads only counted rows without gathering (copying) them. Right-padded batches have one
    run per sequence. Finding the runs reads the mask on the host (a sync only off the CPU)."""
    if mask is None:
        m = torch.ones(B, L, dtype=torch.int8)
    else:
        m = (mask.reshape(B, L) != 0).to(device="cpu", dtype=torch.int8)
    if not counted:
        m = 1 - m
    edges = torch.nn.functional.pad(m, (1, 1))
    step = edges[:, 1:] - edges[:, :-1]  # +1 where a run starts, -1 one past where it ends
    starts, ends = (step == 1).nonzero().tolist(), (step == -1).nonzero().tolist()
    for (b, l0), (_, l1) in zip(starts, ends):
        for r in range(l0, l1, rows_per_block):
            yield b, r, min(l1, r + rows_per_block)


def _forward_rows(x, prep: Prepared, backend: str, out: dict, write_dx: bool):
    """Fill out (the [N] per-token tensors) from the logits view x [B, L, V]; with write_dx, x receives the gradient.

    Triton: one launch over every row, the masked ones skipped inside the kernel. Torch: the runs of
    counted rows, block by block (row_runs); masked rows keep zeros. Returns (counted runs, masked runs)
    on the torch path (for the backward: the mask is read once), None on the Triton path."""
    rows = rows_impl(backend)
    hp, tok = prep.hp, prep.tok
    B, L, V = x.shape
    if backend == "triton":
        if hp.sequence_level:
            rows.logprob_rows(x, tok.ids, hp.inv_temperature, out["lse"], out["logp"], mask=tok.mask)
            out["loss"], out["kl"], out["clip"], out["coef"] = sequence_terms(out["logp"], prep)
            if write_dx:
                rows.dlogit_rows(x, tok.ids, out["lse"], out["coef"], hp.inv_temperature, dx=x)
        else:
            rows.loss_rows(x, tok, hp, out, dx=x if write_dx else None)
        return None
    per_block = _torch_rows_per_block(V, x.dtype)
    runs = list(row_runs(tok.mask, B, L, per_block))
    masked = list(row_runs(tok.mask, B, L, L, counted=False))
    for v in out.values():
        v.zero_()  # masked tokens: exact zeros
    for b, l0, l1 in runs:
        r0, r1 = b * L + l0, b * L + l1
        o = {k: v[r0:r1] for k, v in out.items()}
        xb = x[b, l0:l1]
        if hp.sequence_level:
            rows.logprob_rows(xb, tok.ids[r0:r1], hp.inv_temperature, o["lse"], o["logp"])
        else:
            rows.loss_rows(xb, tok.rows(r0, r1), hp, o, dx=xb if write_dx else None)
    if hp.sequence_level:
        out["loss"], out["kl"], out["clip"], out["coef"] = sequence_terms(out["logp"], prep)
        if write_dx:
            for b, l0, l1 in runs:
                r0, r1 = b * L + l0, b * L + l1
                xb = x[b, l0:l1]
                rows.dlogit_rows(xb, tok.ids[r0:r1], out["lse"][r0:r1], out["coef"][r0:r1], hp.inv_temperature, dx=xb)
    if write_dx:  # the gradient of a masked token is 0
        for b, l0, l1 in masked:
            x[b, l0:l1].zero_()
    return runs, masked


def _zero_tail(full: torch.Tensor, L: int) -> None:
    """The unused last position(s) of a full-form gradient are 0."""
    if full.shape[1] > L:
        full[:, L:].zero_()


class _GRPOLogitsFunction(torch.autograd.Function):
    """logits ([B, L, V] or [B, L + 1, V]) -> (loss, kl, clip); the gradient is computed in backward."""

    @staticmethod
    def forward(ctx, logits, prep: Prepared, backend: str, want_grad: bool):
        L = prep.length
        x = completion_rows(logits, L)
        out = _empty_out(prep.batch * L, compute_dtype(logits.dtype), logits.device)
        ctx.runs = _forward_rows(x, prep, backend, out, False)
        loss, metrics = finish(out["loss"], out["kl"], out["clip"], prep)
        kl, clip = metrics["kl"], metrics["clip_ratio"]
        ctx.mark_non_differentiable(kl, clip)
        ctx.backend, ctx.inv_t, ctx.length = backend, prep.hp.inv_temperature, L
        if want_grad:
            ctx.save_for_backward(logits, prep.tok.ids, out["lse"], out["coef"])
        return loss, kl, clip

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        logits, ids, lse, coef = ctx.saved_tensors
        rows = rows_impl(ctx.backend)
        L = ctx.length
        x = completion_rows(logits, L)
        coef = coef * grad_loss.to(coef.dtype)  # a tensor product: no host sync
        dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _zero_tail(dlogits, L)
        if ctx.backend == "triton":  # every row: masked ones are written as zeros without reading logits
            rows.dlogit_rows(x, ids, lse, coef, ctx.inv_t, dx=dlogits[:, :L])
            return dlogits, None, None, None
        runs, masked = ctx.runs
        for b, l0, l1 in runs:
            r0, r1 = b * L + l0, b * L + l1
            rows.dlogit_rows(x[b, l0:l1], ids[r0:r1], lse[r0:r1], coef[r0:r1], ctx.inv_t, dx=dlogits[b, l0:l1])
        for b, l0, l1 in masked:
            dlogits[b, l0:l1].zero_()
        return dlogits, None, None, None


class _GRPOInplaceFunction(torch.autograd.Function):
    """Writes d loss / d logits into the logits buffer during the forward and returns only that buffer.

    Returning a single tensor is what lets autograd accept an in-place op on a view (logits[:, :-1]).
    The loss and metrics travel in `side`; _InplaceLoss attaches the loss to the overwritten buffer."""

    @staticmethod
    def forward(ctx, logits, prep: Prepared, backend: str, side: dict):
        L = prep.length
        x = completion_rows(logits, L)
        out = _empty_out(prep.batch * L, compute_dtype(logits.dtype), logits.device)
        _forward_rows(x, prep, backend, out, True)
        _zero_tail(logits, L)
        loss, metrics = finish(out["loss"], out["kl"], out["clip"], prep)
        side.update(loss=loss, kl=metrics["kl"], clip=metrics["clip_ratio"])
        ctx.mark_dirty(logits)
        return logits

    @staticmethod
    def backward(ctx, grad_buffer):
        return grad_buffer, None, None, None  # the buffer already holds the (scaled) gradient: pass it on


class _InplaceLoss(torch.autograd.Function):
    """loss (computed by _GRPOInplaceFunction) as a function of the buffer that holds its gradient."""

    @staticmethod
    def forward(ctx, grad_buffer, loss, backend: str):
        save_grads(ctx, grad_buffer)  # version-checked: a later in-place change of the buffer raises at backward
        ctx.backend = backend
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        return hand_over(ctx, grad_loss, ctx.backend)[0], None, None


def _check_logits(logits: torch.Tensor, ids: torch.Tensor, ids_name: str) -> tuple[int, int, int]:
    """(B, L, V) with L = ids.shape[1]; logits is [B, L, V] or the full [B, L + 1, V]."""
    check_tensor("logits", logits, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(ids_name, ids, ndim=2)
    B, T, V = logits.shape
    if V < 1:
        raise ValueError(f"logits must have a vocabulary dimension V >= 1, got shape {tuple(logits.shape)}")
    L = ids.shape[1]
    if ids.shape[0] != B or T not in (L, L + 1):
        raise ValueError(f"logits must have shape (B, L, V) or the model's full (B, L + 1, V) for {ids_name} of shape "
                         f"(B, L) = {tuple(ids.shape)}; got logits of shape {tuple(logits.shape)}")
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
    num_items: float | torch.Tensor | None = None,
    *,
    backend: str = "auto",
    inplace: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fused GRPO loss on logits; the math is kernels.reference.reference_grpo_loss.

    Args:
        logits: [B, L + 1, V] (the model's full logits; position t predicts completion token t, the
            last position is unused and gets a zero gradient) or [B, L, V] (logits[:, t] predicts
            completion_ids[:, t]); float32/bfloat16/float16 (float64 for checks). Any strides with a
            contiguous V dimension (a slice like full_logits[:, :-1] is not copied). The full form
            is cheaper in backward: its gradient is written at that shape (6 bytes per bf16 logit
            in all instead of 12; see the module docstring).
        completion_ids: [B, L] integer, in [0, V) where counted (masked positions may hold anything,
            e.g. -100). Checked on the CPU (ValueError), by a device-side assert on a GPU.
        advantages: [B] float. completion_mask: [B, L] bool/int/float, nonzero = counted. Masked
            tokens cost nothing in the forward and are written as zeros in the backward.
        old_logprobs: [B, L] float or None (on-policy: ratio = exp(logp - logp.detach())).
        ref_logprobs: [B, L] float; required when beta > 0.
        beta, eps_low, eps_high, temperature, kl_clamp (None = off): floats, see the reference;
            runtime arguments of the Triton kernel (new values compile nothing).
        loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo". importance_level: "token" | "sequence" (GSPO).
        max_completion_length: dr_grpo normaliser (default L). num_items: dapo normaliser, used as
            given (default: counted tokens of this batch); a number or a one-element tensor (kept on
            its device); under gradient averaging over W ranks pass the global count / W.
        backend: "auto" (Triton on CUDA, pure torch elsewhere) | "triton" (CUDA, or CPU under
            TRITON_INTERPRET=1) | "torch" (chunked pure torch, any device).
        inplace: write d loss / d logits into the logits buffer during the forward (saves N x V memory;
            the logits are consumed). Works on the full form (the saving: no other [B, L + 1, V]
            buffer) and on a view such as logits[:, :-1] (correct, but autograd's view bookkeeping
            then materialises full-size gradients in backward). Any other use of the logits that
            autograd saved raises at backward (version counter). Default off.

    Returns:
        (loss, metrics): loss is a scalar float32 (float64 for float64 logits) tensor with a grad_fn
        when logits requires grad; metrics = {"kl": masked mean k3, "clip_ratio": masked fraction of
        tokens whose clipped term is active}, detached scalars.
    """
    B, L, V = _check_logits(logits, completion_ids, "completion_ids")
    backend = resolve_backend(backend, logits.device)
    cdt = compute_dtype(logits.dtype)
    prep = prepare_grpo((B, L), V, logits.device, cdt, completion_ids, advantages, completion_mask, old_logprobs,
                        ref_logprobs, beta, eps_low, eps_high, temperature, loss_type, importance_level, kl_clamp,
                        max_completion_length, num_items)
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    if inplace and want_grad:
        if logits.is_leaf:
            raise ValueError("inplace=True overwrites the logits with their gradient, but logits is a leaf tensor that "
                             "requires grad (autograd forbids in-place changes of leaves); pass logits produced by the "
                             "model's lm_head, or inplace=False")
        side: dict = {}
        buffer = _GRPOInplaceFunction.apply(logits, prep, backend, side)
        loss = _InplaceLoss.apply(buffer, side["loss"], backend)
        return loss, {"kl": side["kl"].detach(), "clip_ratio": side["clip"].detach()}
    loss, kl, clip = _GRPOLogitsFunction.apply(logits, prep, backend, want_grad)
    return loss, {"kl": kl.detach(), "clip_ratio": clip.detach()}


@torch.no_grad()
def selective_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                       mask: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """log_softmax(logits / temperature) at ids, without materialising the log-softmax; no grad.

    logits: [B, L, V] or the full [B, L + 1, V] (as grpo_loss), float, any strides with contiguous V.
    ids: [B, L] integer in [0, V) (where mask is nonzero). mask: [B, L] or None; masked tokens are not
    read and get 0. Returns [B, L] float32 (float64 for float64 logits).
    """
    from ._checks import check_float

    B, L, V = _check_logits(logits, ids, "ids")
    if ids.device != logits.device:
        raise ValueError(f"ids is on {ids.device} but logits is on {logits.device}")
    counted = check_mask(mask, (B, L), logits.device, "logits")
    inv_t = 1.0 / check_float("temperature", temperature, low=0.0, low_inclusive=False)
    backend = resolve_backend(backend, logits.device)
    flat_ids = check_ids("ids", ids, V, counted).reshape(-1).contiguous()
    x = completion_rows(logits, L)
    cdt = compute_dtype(logits.dtype)
    lse = torch.zeros(B * L, dtype=cdt, device=logits.device)
    logp = torch.zeros_like(lse)
    rows = rows_impl(backend)
    if backend == "triton":
        flat_mask = None if counted is None else counted.reshape(-1).to(cdt)
        rows.logprob_rows(x, flat_ids, inv_t, lse, logp, mask=flat_mask)
        return logp.view(B, L)
    for b, l0, l1 in row_runs(counted, B, L, _torch_rows_per_block(V, logits.dtype)):
        r0, r1 = b * L + l0, b * L + l1
        rows.logprob_rows(x[b, l0:l1], flat_ids[r0:r1], inv_t, lse[r0:r1], logp[r0:r1])
    return logp.view(B, L)
