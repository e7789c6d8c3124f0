"""Argument checks and the per-token tensors every backend consumes.

Everything a kernel could read out of bounds (ids, shapes, strides) is checked here on the host, so
bad input raises ValueError naming the argument instead of an illegal memory access.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch

from .reference import IMPORTANCE_LEVELS, LOSS_TYPES

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BACKENDS = ("auto", "triton", "torch")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(name: str, t, ndim: int | None = None, dtypes=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if type(t).__name__ == "DTensor":
        raise ValueError(f"{name} is a DTensor; pass a plain tensor (e.g. weight.full_tensor())")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}")
    return t


def host_reads_free(t: torch.Tensor) -> bool:
    """Whether reading t's values on the host is free: a CPU tensor with data (no device to sync with).

    Fake tensors (torch's FakeTensorMode, as benchmarks/simulate_7b.py runs a 7B step without GPUs)
    have shapes and no data: never read."""
    if t.device.type != "cpu":
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


def check_ids(name: str, ids: torch.Tensor, vocab_size: int, mask: torch.Tensor | None = None,
              on_device: bool | None = None) -> torch.Tensor:
    """ids must be integers in [0, V) wherever they are counted; masked positions become 0.

    On the CPU a bad id raises ValueError here. On a GPU the check is a device-side assert
    (torch._assert_async: no host sync; a bad id stops the process at the next synchronisation with
    this message). on_device forces either form (tests)."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
    ids = ids.long()
    if mask is not None:
        ids = torch.where(mask, ids, torch.zeros_like(ids))
    if ids.numel() == 0:
        return ids
    if on_device is None:  # a GPU, or fake tensors (no data to read)
        on_device = ids.device.type == "cuda" or (ids.device.type == "cpu" and not host_reads_free(ids))
    if on_device:
        torch._assert_async(((ids >= 0) & (ids < vocab_size)).all(),
                            f"{name} must lie in [0, {vocab_size}) (the vocabulary size) where counted")
    else:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} must lie in [0, {vocab_size}) (the vocabulary size), got values in [{lo}, {hi}]")
    return ids


def check_mask(mask: torch.Tensor | None, shape: tuple[int, int], device: torch.device, against: str):
    """An optional [B, L] mask (nonzero = counted) as a bool tensor, or None."""
    if mask is None:
        return None
    check_tensor("mask", mask, ndim=2)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must have shape (B, L) = {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but {against} is on {device}")
    return mask != 0


def check_float(name: str, value, low: float | None = None, low_inclusive: bool = True) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value}")
    return value


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA, 'torch' elsewhere. 'triton' on CPU needs TRITON_INTERPRET=1."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"backend='triton' got {device.type} tensors: the Triton kernels run on CUDA, or on the CPU only under "
            "the Triton interpreter (set TRITON_INTERPRET=1 before importing triton); use backend='torch' on the CPU"
        )
    return backend


@dataclass(frozen=True)
class Hyper:
    """Scalar hyperparameters of the loss (Python floats; runtime arguments of the Triton kernel)."""

    beta: float
    eps_low: float
    eps_high: float
    inv_temperature: float
    kl_clamp: float | None
    has_old: bool
    has_ref: bool
    loss_type: str
    sequence_level: bool  # True only when a sequence-level ratio really differs from the token-level one


@dataclass
class Tokens:
    """Per-token inputs flattened to [N] (N = B * L), in the compute dtype (ids int64)."""

    ids: torch.Tensor
    adv: torch.Tensor  # advantage of the token's sequence
    weight: torch.Tensor  # d loss / d per_token: mask times the aggregation's normaliser
    mask: torch.Tensor  # 1 counted, 0 not
    old: torch.Tensor | None
    ref: torch.Tensor | None

    def rows(self, r0: int, r1: int) -> "Tokens":
        cut = lambda t: None if t is None else t[r0:r1]  # noqa: E731
        return replace(self, ids=self.ids[r0:r1], adv=self.adv[r0:r1], weight=self.weight[r0:r1],
                       mask=self.mask[r0:r1], old=cut(self.old), ref=cut(self.ref))

    def take(self, index: torch.Tensor) -> "Tokens":
        """The tokens at index ([n] int64), in that order (a gather: small [n] copies)."""
        pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        return replace(self, ids=pick(self.ids), adv=pick(self.adv), weight=pick(self.weight),
                       mask=pick(self.mask), old=pick(self.old), ref=pick(self.ref))


@dataclass
class Prepared:
    hp: Hyper
    tok: Tokens
    batch: int
    length: int
    seq_len_counts: torch.Tensor  # [B] counted tokens per sequence (compute dtype)
    n_tokens: torch.Tensor  # scalar: max(total counted tokens, 1)

    def counted_index(self) -> torch.Tensor | None:
        """Flat indices [M] of the counted tokens, or None when every token counts.

        Sizing the gather needs M on the host: one synchronisation on a GPU (the only one of the
        fused-linear path). Fake tensors have no data: every token is taken as counted (an upper
        bound of the work, for simulations)."""
        from torch._subclasses.fake_tensor import is_fake

        if is_fake(self.tok.mask):
            return None
        index = torch.nonzero(self.tok.mask).squeeze(1)
        return None if index.numel() == self.tok.mask.numel() else index


def prepare_grpo(
    batch_shape: tuple[int, int],
    vocab_size: int,
    device: torch.device,
    cdtype: torch.dtype,
    completion_ids,
    advantages,
    completion_mask,
    old_logprobs,
    ref_logprobs,
    beta,
    eps_low,
    eps_high,
    temperature,
    loss_type,
    importance_level,
    kl_clamp,
    max_completion_length,
    num_items,
) -> Prepared:
    """Check every GRPO argument against batch_shape = (B, L) and build the flat per-token tensors."""
    B, L = batch_shape
    if B < 1 or L < 1:
        raise ValueError(f"the batch must have B >= 1 sequences of L >= 1 tokens, got B={B}, L={L}")
    check_tensor("completion_ids", completion_ids, ndim=2)
    check_tensor("completion_mask", completion_mask, ndim=2)
    check_tensor("advantages", advantages, ndim=1)
    for name, t in (("completion_ids", completion_ids), ("completion_mask", completion_mask)):
        if tuple(t.shape) != (B, L):
            raise ValueError(f"{name} must have shape (B, L) = {(B, L)}, got {tuple(t.shape)}")
    if advantages.shape[0] != B:
        raise ValueError(f"advantages must have shape (B,) = ({B},), got {tuple(advantages.shape)}")
    if not (advantages.dtype.is_floating_point or advantages.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"advantages must be a float tensor, got dtype {advantages.dtype}")
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None:
            check_tensor(name, t, ndim=2)
            if tuple(t.shape) != (B, L):
                raise ValueError(f"{name} must have shape (B, L) = {(B, L)}, got {tuple(t.shape)}")
            if not t.dtype.is_floating_point:
                raise ValueError(f"{name} must be a float tensor, got dtype {t.dtype}")
    for name, t in (("completion_ids", completion_ids), ("completion_mask", completion_mask),
                    ("advantages", advantages), ("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the logits/hidden states are on {device}")

    beta = check_float("beta", beta, low=0.0)
    eps_low = check_float("eps_low", eps_low, low=0.0)
    eps_high = check_float("eps_high", eps_high, low=0.0)
    temperature = check_float("temperature", temperature, low=0.0, low_inclusive=False)
    if kl_clamp is not None:
        kl_clamp = check_float("kl_clamp", kl_clamp, low=0.0, low_inclusive=False)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_level must be one of {IMPORTANCE_LEVELS}, got {importance_level!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when beta > 0 (the KL term needs the reference log-probs)")
    if max_completion_length is None:
        max_completion_length = L
    if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int) or max_completion_length < 1:
        raise ValueError(f"max_completion_length must be a positive int, got {max_completion_length!r}")
    if isinstance(num_items, torch.Tensor):  # kept on its device: no .item() (a host sync on a GPU)
        if num_items.numel() != 1 or num_items.dtype.is_complex or num_items.dtype == torch.bool:
            raise ValueError(f"num_items must be a number or a one-element tensor, got shape {tuple(num_items.shape)}")
        num_items = num_items.detach().reshape(()).to(device=device, dtype=cdtype)
    elif num_items is not None:
        num_items = check_float("num_items", num_items, low=0.0)

    mask = completion_mask != 0
    ids = check_ids("completion_ids", completion_ids, vocab_size, mask)
    mf = mask.to(cdtype)
    counts = mf.sum(1)
    total = mf.sum()
    if loss_type == "grpo":  # mean over sequences of per-sequence token means
        weight = mf / (B * counts.clamp(min=1)).unsqueeze(1)
    elif loss_type == "bnpo":
        weight = mf / total.clamp(min=1)
    elif loss_type == "dr_grpo":
        weight = mf / float(B * max_completion_length)
    else:  # dapo
        if num_items is None:
            weight = mf / total.clamp(min=1)
        elif isinstance(num_items, torch.Tensor):
            weight = mf / num_items.clamp(min=1)
        else:
            weight = mf / max(num_items, 1.0)

    zero = torch.zeros((), dtype=cdtype, device=device)
    old = None if old_logprobs is None else torch.where(mask, old_logprobs.to(cdtype), zero).reshape(-1)
    ref = None if ref_logprobs is None else torch.where(mask, ref_logprobs.to(cdtype), zero).reshape(-1)
    tok = Tokens(
        ids=ids.reshape(-1).contiguous(),
        adv=advantages.to(cdtype).unsqueeze(1).expand(B, L).reshape(-1).contiguous(),
        weight=weight.reshape(-1).contiguous(),
        mask=mf.reshape(-1).contiguous(),
        old=old.contiguous() if old is not None else None,
        ref=ref.contiguous() if ref is not None else None,
    )
    hp = Hyper(
        beta=beta, eps_low=eps_low, eps_high=eps_high, inv_temperature=1.0 / temperature, kl_clamp=kl_clamp,
        has_old=old is not None, has_ref=ref is not None, loss_type=loss_type,
        # on-policy (old = logp.detach()) the sequence-level ratio is 1 with the token-level gradient: same math
        sequence_level=importance_level == "sequence" and old is not None,
    )
    return Prepared(hp=hp, tok=tok, batch=B, length=L, seq_len_counts=counts, n_tokens=total.clamp(min=1))
