"""GRPO loss fused with the lm_head: hidden [B, L, H] x weight [V, H] in row chunks, never [B*L, V].

Only counted tokens meet the lm_head: their rows are gathered (index_select of [c, H] per chunk), the
chunk loop runs on them, and the hidden gradient is scattered back (masked rows get exact zeros, even
when their hidden states are NaN). Time follows counted tokens, not the padded length.

Per chunk of c counted token rows (one [c, V] fp32 buffer, reused):
    buf      = hidden_c @ weight.T (+ bias)                     GEMM 1 (cuBLAS / MKL), fp32 output
    epilogue = lse, logp, ratio, clip, k3 KL, loss terms, and d loss / d logits written into buf
               (Triton row kernel, or the same algorithm in torch)
    d_hidden_c  = dlogits @ weight                              GEMM 2
    d_weight   += dlogits.T @ hidden_c   (fp32 accumulator)      GEMM 3
    d_bias     += dlogits.sum(0)
The gradients are computed during the forward (three GEMMs, the same count as eager autograd) and
handed to autograd in backward (kernels._grads), scaled by grad_output. Sequence-level ratios with
old_logprobs need every log-prob of a sequence before any gradient: a log-prob pass first, then the
gradient pass (one extra GEMM per chunk).
The fp32 d_weight accumulator is narrowed to the weight's dtype in place, in its own storage, so an
fp32 d_weight and a bf16 copy of it are never live together.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from ._checks import (FLOAT_DTYPES, Prepared, check_float, check_ids, check_mask, check_tensor, compute_dtype,
                      prepare_grpo, resolve_backend)
from ._grads import hand_over, save_grads
from ._math import finish, sequence_terms
from .grpo_loss import _empty_out, rows_impl

# Bytes of chunk buffers per device type. CPU: the whole extra memory must stay under 0.3 GB at
# H = 3584, V = 152064 (issue 3). CUDA: the d_weight GEMM reads and writes its fp32 [V, H] accumulator
# once per chunk (8 bytes per element) for 2 c flops per element, so its intensity is about c / 4
# flop/byte; an H100's ridge (989 TFLOP/s bf16 over 3.35 TB/s) is ~295, so c >= ~1200 rows keep it
# compute-bound: 1.5 GiB gives 1664 rows at H = 3584, V = 152064 in bf16 (~416 flop/byte).
CHUNK_BUDGET_BYTES = {"cpu": 240 << 20, "cuda": 3 << 29}


def chunk_rows(n_rows: int, hidden_size: int, vocab_size: int, dtype: torch.dtype, device_type: str) -> int:
    """Rows per chunk: as many as fit the device's buffer budget, a multiple of 64 when >= 64.

    A chunk row costs V fp32 logits/gradient, V low-precision gradient (bf16/fp16 inputs), V more fp32
    on the CPU for low precision (no mixed-dtype GEMM there), and H for the hidden-gradient row.
    """
    cbytes = torch.finfo(compute_dtype(dtype)).bits // 8
    ebytes = torch.finfo(dtype).bits // 8
    row = vocab_size * cbytes + hidden_size * (cbytes + ebytes)
    if ebytes < cbytes:
        row += vocab_size * ebytes + (vocab_size * cbytes if device_type != "cuda" else 0)
    c = CHUNK_BUDGET_BYTES.get(device_type, CHUNK_BUDGET_BYTES["cpu"]) // row
    if c >= 64:
        c = c // 64 * 64
    return int(max(1, min(n_rows, c)))


# ---- GEMMs with fp32 results from bf16/fp16 operands -------------------------------------------------------

_MIXED_GEMM_OK: dict = {}


def _mixed_gemm_ok(device: torch.device) -> bool:
    """Whether this CUDA build has mm/addmm with out_dtype=float32 for bf16 operands (checked once)."""
    key = (device.type, device.index)
    if key not in _MIXED_GEMM_OK:
        ok = False
        if device.type == "cuda":
            try:
                a = torch.randn(8, 16, device=device, dtype=torch.bfloat16)
                b = torch.randn(16, 8, device=device, dtype=torch.bfloat16)
                acc = torch.ones(8, 8, device=device)
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                out = torch.empty(8, 8, device=device)
                torch.mm(a, b, out_dtype=torch.float32, out=out)
                want = a.float() @ b.float()
                ok = bool(torch.allclose(acc, want + 1, atol=1e-2) and torch.allclose(out, want, atol=1e-2))
            except (RuntimeError, TypeError):
                ok = False
            if not ok:
                warnings.warn("kernels.linear_grpo_loss: no fp32-output bf16 GEMM in this torch build; "
                              "using bf16 logits and an fp32 weight-gradient GEMM (slower)")
        _MIXED_GEMM_OK[key] = ok
    return _MIXED_GEMM_OK[key]


def _logits_into(buf: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """buf [c, V] (compute dtype) <- h [c, H] @ weight.T (+ bias)."""
    if h.dtype == buf.dtype:
        torch.mm(h, weight.t(), out=buf)
    elif _mixed_gemm_ok(h.device):
        torch.mm(h, weight.t(), out_dtype=buf.dtype, out=buf)
    else:
        buf.copy_(h @ weight.t())
    if bias is not None:
        buf.add_(bias)


def _accumulate_weight_grad(acc: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor, first: bool):
    """acc [V, H] (compute dtype) (+)= dlogits.T [V, c] @ h [c, H]; first=True overwrites acc."""
    beta = 0.0 if first else 1.0  # beta 0 ignores acc's (uninitialised) contents, NaN included
    if dlogits.dtype == acc.dtype:
        torch.addmm(acc, dlogits.t(), h, beta=beta, out=acc)
    elif _mixed_gemm_ok(h.device):
        torch.addmm(acc, dlogits.t(), h, out_dtype=acc.dtype, beta=beta, out=acc)
    else:
        torch.addmm(acc, dlogits.t().to(acc.dtype), h.to(acc.dtype), beta=beta, out=acc)


def narrow_(acc: torch.Tensor, dtype: torch.dtype, block_rows: int = 4096) -> torch.Tensor:
    """acc [V, H] (fp32) converted to dtype (2 bytes) in place: a [V, H] view of the first half of acc's storage.

    Block by block in ascending order: block [v0, v1) is copied out (a small temporary) and written to
    bytes [2 v0 H, 2 v1 H), which hold fp32 rows below v1 only: rows already converted, or this block's
    own rows, already copied. So no second [V, H] tensor is allocated; acc must not be used afterwards.
    """
    if acc.dtype == dtype:
        return acc
    if torch.finfo(dtype).bits * 2 != torch.finfo(acc.dtype).bits or not acc.is_contiguous():
        return acc.to(dtype)
    V, H = acc.shape
    flat = acc.view(-1).view(dtype)[: V * H]  # the storage read as dtype, first half
    for v0 in range(0, V, block_rows):
        v1 = min(V, v0 + block_rows)
        flat[v0 * H: v1 * H].copy_(acc[v0:v1].reshape(-1).to(dtype))
    return flat.view(V, H)


# ---- the chunk driver -------------------------------------------------------------------------------------

def _fused_linear(h2, weight, bias, prep: Prepared | None, ids, inv_t, backend, need, chunk, index=None):
    """Run the chunk loop over the rows in index ([M] int64; None = all). prep None = log-probs only.
    need = (d_hidden, d_weight, d_bias) wanted.

    Returns (out dict of [N] tensors, d_hidden [N, H] or None, d_weight fp32 or None, d_bias fp32 or None).
    Autocast is off inside: the GEMMs run in the inputs' dtype with the output dtypes chosen here.
    """
    # Devices without autocast (e.g. torch's lazy tensors) have nothing to turn off.
    off = (torch.autocast(device_type=h2.device.type, enabled=False)
           if torch.amp.is_autocast_available(h2.device.type) else contextlib.nullcontext())
    with off:
        return _fused_linear_impl(h2, weight, bias, prep, ids, inv_t, backend, need, chunk, index)


def _fused_linear_impl(h2, weight, bias, prep, ids, inv_t, backend, need, chunk, index):
    rows = rows_impl(backend)
    N, H = h2.shape
    V = weight.shape[0]
    dev, cdt = h2.device, compute_dtype(h2.dtype)
    low_precision = h2.dtype != cdt
    want_grad = prep is not None and any(need)
    M = N if index is None else index.numel()  # rows that meet the lm_head
    out = _empty_out(N, cdt, dev)
    if index is not None:
        for v in out.values():
            v.zero_()  # masked tokens: exact zeros
    tok = None if prep is None else (prep.tok if index is None else prep.tok.take(index))
    sel_ids = ids if index is None else ids.index_select(0, index)
    buf = torch.empty(max(1, min(chunk, M)), V, dtype=cdt, device=dev)
    dbuf = torch.empty_like(buf, dtype=h2.dtype) if (want_grad and low_precision) else None
    d_h = None
    if want_grad and need[0]:  # masked rows of the hidden gradient are zeros
        d_h = (torch.empty if index is None else torch.zeros)(N, H, dtype=h2.dtype, device=dev)
    # the first chunk writes the accumulators (no zero-fill pass over [V, H]), later chunks add
    d_w = torch.empty(V, H, dtype=cdt, device=dev) if (want_grad and need[1]) else None
    d_b = torch.empty(V, dtype=cdt, device=dev) if (want_grad and need[2]) else None
    if M == 0:  # nothing counted: zero gradients
        for t in (d_w, d_b):
            if t is not None:
                t.zero_()

    def hidden_rows(r0, r1):
        return h2[r0:r1] if index is None else h2.index_select(0, index[r0:r1])

    def chunks():
        for r0 in range(0, M, chunk):
            r1 = min(M, r0 + chunk)
            x, hc = buf[: r1 - r0], hidden_rows(r0, r1)
            _logits_into(x, hc, weight, bias)
            yield r0, r1, x, hc

    def grad_target(r0, r1, x):
        """Where the epilogue writes d loss / d logits: the fp32 buffer itself, or its bf16/fp16 twin."""
        return x if dbuf is None else dbuf[: r1 - r0]

    def backprop(r0, r1, x, hc):
        dl, first = grad_target(r0, r1, x), r0 == 0
        if d_h is not None:
            if index is None:
                torch.mm(dl, weight, out=d_h[r0:r1])
            else:
                d_h.index_copy_(0, index[r0:r1], dl @ weight)
        if d_w is not None:
            _accumulate_weight_grad(d_w, dl, hc, first)
        if d_b is not None:
            if first:
                torch.sum(dl, 0, dtype=cdt, out=d_b)
            else:
                d_b.add_(dl.sum(0, dtype=cdt))

    def put(name, r0, r1, value):
        if index is None:
            out[name][r0:r1].copy_(value)
        else:
            out[name].index_copy_(0, index[r0:r1], value)

    one_pass = prep is not None and not prep.hp.sequence_level
    for r0, r1, x, hc in chunks():
        o = {k: torch.empty(r1 - r0, dtype=cdt, device=dev) for k in out} if index is not None else \
            {k: v[r0:r1] for k, v in out.items()}
        if one_pass:
            dx = grad_target(r0, r1, x) if want_grad else None
            rows.loss_rows(x, tok.rows(r0, r1), prep.hp, o, dx=dx, scratch=True)
            if want_grad:
                backprop(r0, r1, x, hc)
            names = o.keys()
        else:
            rows.logprob_rows(x, sel_ids[r0:r1], inv_t, o["lse"], o["logp"], scratch=True)
            names = ("lse", "logp")
        if index is not None:
            for k in names:
                put(k, r0, r1, o[k])
    if prep is not None and prep.hp.sequence_level:
        out["loss"], out["kl"], out["clip"], out["coef"] = sequence_terms(out["logp"], prep)
        if want_grad:  # second pass: the gradient from the now-known d loss / d logp
            lse_c = out["lse"] if index is None else out["lse"].index_select(0, index)
            coef_c = out["coef"] if index is None else out["coef"].index_select(0, index)
            for r0, r1, x, hc in chunks():
                rows.dlogit_rows(x, sel_ids[r0:r1], lse_c[r0:r1], coef_c[r0:r1], inv_t,
                                 dx=grad_target(r0, r1, x), scratch=True)
                backprop(r0, r1, x, hc)
    return out, d_h, d_w, d_b


class _LinearGRPOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, prep: Prepared, backend: str, need: tuple, chunk: int):
        B, L, H = hidden.shape
        h2 = hidden.reshape(B * L, H)
        out, d_h, d_w, d_b = _fused_linear(h2, weight, bias, prep, prep.tok.ids, prep.hp.inv_temperature, backend,
                                           need, chunk, prep.counted_index())
        loss, metrics = finish(out["loss"], out["kl"], out["clip"], prep)
        kl, clip = metrics["kl"], metrics["clip_ratio"]
        ctx.mark_non_differentiable(kl, clip)
        ctx.backend = backend
        save_grads(ctx, None if d_h is None else d_h.view(B, L, H),
                   None if d_w is None else narrow_(d_w, weight.dtype),
                   None if d_b is None else d_b.to(bias.dtype))
        return loss, kl, clip

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        d_h, d_w, d_b = hand_over(ctx, grad_loss, ctx.backend)
        return d_h, d_w, d_b, None, None, None, None


def _check_linear(hidden, weight, bias):
    check_tensor("hidden", hidden, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    B, L, H = hidden.shape
    V, Hw = weight.shape
    if Hw != H:
        raise ValueError(f"weight must have shape (V, H) with H = {H} (hidden's last dimension), got {tuple(weight.shape)}")
    if V < 1:
        raise ValueError(f"weight must have V >= 1 rows, got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}; they must match")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
        if bias.shape[0] != V:
            raise ValueError(f"bias must have shape (V,) = ({V},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias has dtype {bias.dtype} but hidden has {hidden.dtype}; they must match")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    return B, L, H, V


def _check_chunk(chunk_size, B, L, H, V, dtype, device) -> int:
    if chunk_size is None:
        return chunk_rows(B * L, H, V, dtype, device.type)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
    return chunk_size


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    bias: torch.Tensor | None = None,
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
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss of logits = hidden @ weight.T + bias, fused with the lm_head: never builds [B*L, V].

    Args:
        hidden: [B, L, H] float32/bfloat16/float16 (float64 for checks), the last hidden states of the
            completion positions (hidden[:, t] predicts completion_ids[:, t]).
        weight: [V, H] (the lm_head weight), same dtype and device as hidden. bias: [V] or None.
        completion_ids, advantages, completion_mask, old_logprobs, ref_logprobs and the float/str
            keywords: as kernels.grpo_loss.
        backend: "auto" | "triton" | "torch" (as kernels.grpo_loss). The GEMMs are torch (cuBLAS/MKL)
            in both; "triton" runs the per-chunk epilogue as a Triton kernel.
        chunk_size: token rows per chunk; None picks it from H, V, dtype and device (chunk_rows).

    Returns:
        (loss, metrics) as kernels.grpo_loss. Gradients flow to hidden, weight and bias (in their
        dtypes; d_weight is accumulated in fp32 over the chunks) and accumulate into .grad as usual.
        They are computed in the forward, so backpropagate each loss once (a retained graph may be
        backpropagated again: the saved gradients are rescaled to the new grad_output).

    Only counted tokens meet the lm_head (time follows them, not the padded length); masked rows of
    the hidden gradient are exact zeros, whatever the hidden states hold there. One host sync per
    call on a GPU: the number of counted tokens, to size their gather.
    """
    B, L, H, V = _check_linear(hidden, weight, bias)
    backend = resolve_backend(backend, hidden.device)
    chunk = _check_chunk(chunk_size, B, L, H, V, hidden.dtype, hidden.device)
    prep = prepare_grpo((B, L), V, hidden.device, compute_dtype(hidden.dtype), completion_ids, advantages,
                        completion_mask, old_logprobs, ref_logprobs, beta, eps_low, eps_high, temperature, loss_type,
                        importance_level, kl_clamp, max_completion_length, num_items)
    grad_on = torch.is_grad_enabled()
    need = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad)
    loss, kl, clip = _LinearGRPOFunction.apply(hidden, weight, bias, prep, backend, need, chunk)
    return loss, {"kl": kl.detach(), "clip_ratio": clip.detach()}


@torch.no_grad()
def linear_selective_logprobs(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                              bias: torch.Tensor | None = None, temperature: float = 1.0,
                              mask: torch.Tensor | None = None, *, backend: str = "auto",
                              chunk_size: int | None = None) -> torch.Tensor:
    """log_softmax((hidden @ weight.T + bias) / temperature) at ids, chunked; no grad.

    hidden: [B, L, H]; weight: [V, H]; bias: [V] or None; ids: [B, L] integer in [0, V) (where
    counted). mask: [B, L] or None; masked tokens never meet the lm_head and get 0 (pass the
    completion mask for reference / old log-probs of a padded batch: time follows counted tokens).
    Returns [B, L] float32 (float64 for float64 inputs).
    """
    B, L, H, V = _check_linear(hidden, weight, bias)
    check_tensor("ids", ids, ndim=2)
    if tuple(ids.shape) != (B, L):
        raise ValueError(f"ids must have shape (B, L) = {(B, L)}, got {tuple(ids.shape)}")
    if ids.device != hidden.device:
        raise ValueError(f"ids is on {ids.device} but hidden is on {hidden.device}")
    index, counted = None, check_mask(mask, (B, L), hidden.device, "hidden")
    if counted is not None:
        index = torch.nonzero(counted.reshape(-1)).squeeze(1)  # one host sync on a GPU: sizes the gather
        if index.numel() == B * L:
            index = None
    inv_t = 1.0 / check_float("temperature", temperature, low=0.0, low_inclusive=False)
    backend = resolve_backend(backend, hidden.device)
    chunk = _check_chunk(chunk_size, B, L, H, V, hidden.dtype, hidden.device)
    flat_ids = check_ids("ids", ids, V, counted).reshape(-1).contiguous()
    out, *_ = _fused_linear(hidden.reshape(B * L, H), weight, bias, None, flat_ids, inv_t, backend,
                            (False, False, False), chunk, index)
    return out["logp"].view(B, L)
