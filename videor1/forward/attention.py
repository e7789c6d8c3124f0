"""The shared-prefix attention, registered through transformers' AttentionInterface.

A packed prompt group [prompt; c1; ...; cG] (prompt P tokens, G completion blocks of C tokens each)
attends as G unshared sequences would: the prompt causally over itself, each completion over the
whole prompt and causally over itself, never over another completion. Two exact passes, no mask
over the packed length and no log-sum-exp merging:

1. prompt queries [1, H, P, d] over prompt keys, causal;
2. completion queries [G, H, C, d] over [prompt keys; own keys] [G, Hkv, P + C, d], causal aligned
   to the lower right (query i of a block sees the prompt and its block's keys 0..i). Ragged
   completions (PrefixLayout.lengths) are gathered into that batch and their outputs scattered back.

Both passes are torch's scaled_dot_product_attention (GQA native), so the same code runs on the CPU
(its flash / math kernels) and on GPUs (its flash or memory-efficient kernels; flash's causal flag
means lower-right alignment there). The prompt keys of pass 2 are a broadcast of pass 1's, so their
gradient is the sum over the G blocks, as in G unshared sequences.

`install(hf_model)` points the text model's attention at "videor1_shared_prefix_<inner>": with a
`PrefixLayout` as the attention mask it runs the two passes; with anything else it calls the inner
implementation (sdpa, eager, flash_attention_2) unchanged, so generate and the plain forward are
untouched. The vision tower keeps its own implementation.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

PREFIX = "videor1_shared_prefix_"


@dataclasses.dataclass(frozen=True)
class PrefixLayout:
    """Where things are in a packed prompt group [prompt; c1; ...; cG].

    prompt_len P: the prompt's tokens (vision included); num_completions G; completion_len C: the
    group's completion length (the width of its completion tensors). lengths: the tokens each
    completion occupies in the packed sequence (its attention-mask count, up to and including its
    EOS; at least 1), or None when every completion occupies all C (the padding after an EOS is then
    packed too, and never attended by a real token). Packing only the real tokens skips the padding's
    compute in every layer.
    """

    prompt_len: int
    num_completions: int
    completion_len: int
    lengths: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.prompt_len < 1 or self.num_completions < 1 or self.completion_len < 1:
            raise ValueError(f"PrefixLayout needs a prompt, a completion and a token in each: {self}")
        if self.lengths is not None:
            lengths = tuple(int(n) for n in self.lengths)
            if len(lengths) != self.num_completions or not all(1 <= n <= self.completion_len for n in lengths):
                raise ValueError(f"PrefixLayout lengths must be {self.num_completions} values in "
                                 f"1..{self.completion_len}, got {self.lengths}")
            object.__setattr__(self, "lengths", None if all(n == self.completion_len for n in lengths) else lengths)

    @property
    def block_lengths(self) -> tuple[int, ...]:
        return self.lengths or (self.completion_len,) * self.num_completions

    @property
    def total_len(self) -> int:
        return self.prompt_len + sum(self.block_lengths)

    def block_starts(self) -> list[int]:
        starts, at = [], self.prompt_len
        for n in self.block_lengths:
            starts.append(at)
            at += n
        return starts

    def predictor_index(self, device=None) -> torch.Tensor:
        """int64 [G, C]: packed positions whose hidden states predict each completion's tokens.

        Token 0 of every completion is predicted by the prompt's last position (P - 1), token j > 0 of
        completion i by that completion's token j - 1 (start_i + j - 1). Tokens past a completion's
        length (padding: masked out of the loss, log-prob 0) read P - 1 as well."""
        return _indices(self, None if device is None else torch.device(device))[0]

    def block_index(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 [G, C] packed position of completion i's token j, clamped to its last token;
        int64 [sum(lengths)] the rows of that [G * C] batch that are packed tokens, in packed order):
        the gather that lays ragged blocks out as a batch, and the one that takes them back (index
        tensors, not a boolean mask: no host read of a count on the device)."""
        return _indices(self, None if device is None else torch.device(device))[1:]


def _indices(layout: PrefixLayout, device: torch.device | None):
    """(predictor index, block index, packed) of a layout on a device, built on the host and copied
    once: every layer of a forward (and its recompute) reuses them instead of copying per layer. Kept
    on the layout object (not a field: equality and hashing ignore it), so they live as long as the
    group's inputs do."""
    cache = layout.__dict__.setdefault("_indices", {})
    if device not in cache:
        cache[device] = _build_indices(layout, device)
    return cache[device]


def _build_indices(layout: PrefixLayout, device: torch.device | None):
    P, C = layout.prompt_len, layout.completion_len
    j = torch.arange(C)
    starts = torch.tensor(layout.block_starts())[:, None]
    lengths = torch.tensor(layout.block_lengths)[:, None]
    predictor = torch.where((j == 0) | (j >= lengths), torch.full_like(starts + j, P - 1), starts + j - 1)
    block = starts + torch.minimum(j, lengths - 1)
    rows = torch.cat([torch.arange(n) + i * C for i, n in enumerate(layout.block_lengths)])  # from host ints
    return predictor.to(device), block.to(device), rows.to(device)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
                     dropout: float) -> torch.Tensor:
    """softmax(q k^T * scaling) v, causal with the diagonal aligned to the last key (a query block
    shorter than its keys sees every key before its own position). query [N, H, q, d], key / value
    [N, Hkv, k, d], k >= q; returns [N, H, q, d]. torch's SDPA: a lower-right CausalBias when q < k."""
    q_len, k_len = query.shape[2], key.shape[2]
    kw = dict(dropout_p=dropout, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    if q_len == k_len:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, **kw)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=causal_lower_right(q_len, k_len), **kw)


def two_pass_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: PrefixLayout,
                       scaling: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Shared-prefix attention of one packed group (module docstring).

    query [1, H, L, d], key / value [1, Hkv, L, d] with L = layout.total_len (H a multiple of Hkv).
    Returns [1, L, H, d] (the layout transformers' attention functions return), query's dtype.
    """
    P, G, C = layout.prompt_len, layout.num_completions, layout.completion_len
    if query.shape[0] != 1 or query.shape[2] != layout.total_len or key.shape[2] != layout.total_len:
        raise ValueError(f"shared-prefix attention: query {tuple(query.shape)} / key {tuple(key.shape)} do not "
                         f"match one packed group of {layout.total_len} tokens ({layout})")
    prompt_out = causal_attention(query[:, :, :P], key[:, :, :P], value[:, :, :P], scaling, dropout)
    if layout.lengths is None:
        def blocks(t):  # [1, h, P + G*C, d] -> [G, h, C, d]
            return t[0, :, P:].unflatten(1, (G, C)).transpose(0, 1)
    else:  # ragged blocks laid out as a [G, C] batch; the slots past a block's end repeat its last
        index, rows = layout.block_index(query.device)  # token: after every real query, never seen

        def blocks(t):
            return t[0].index_select(1, index.flatten()).unflatten(1, (G, C)).transpose(0, 1)

    def with_prompt(t):  # [G, h, P + C, d]: the prompt's keys (a broadcast) before each block's own
        return torch.cat([t[:, :, :P].expand(G, -1, -1, -1), blocks(t)], dim=2)

    block_out = causal_attention(blocks(query), with_prompt(key), with_prompt(value), scaling, dropout)
    block_out = block_out.transpose(1, 2)  # [G, C, H, d]
    block_out = block_out.flatten(0, 1)  # [G * C, H, d]
    if layout.lengths is not None:
        block_out = block_out.index_select(0, rows)  # [sum(lengths), H, d]
    out = torch.cat([prompt_out[0].transpose(0, 1), block_out], dim=0)  # [L, H, d]
    return out[None].contiguous()


def _wrapped(inner_name: str):
    from transformers import AttentionInterface

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if isinstance(attention_mask, PrefixLayout):
            return two_pass_attention(query, key, value, attention_mask, scaling, dropout), None
        inner = AttentionInterface._global_mapping.get(inner_name)
        if inner is None and inner_name == "eager":
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward as inner
        return inner(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    attention.__name__ = f"shared_prefix_over_{inner_name}"
    return attention


def registered_name(inner_name: str) -> str:
    """Register (once) the shared-prefix attention over `inner_name` and its mask function; returns
    its name. The mask function is the inner one's: plain forwards build the masks they always did.
    Where the inner implementation is a registered custom function, it is looked up at call time."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = PREFIX + inner_name
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _wrapped(inner_name))
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(inner_name)
        if mask_fn is not None:  # an inner function without one (a custom kernel) gets no mask, as before
            AttentionMaskInterface.register(name, mask_fn)
    return name


def install(hf_model) -> None:
    """Point the text model's attention of `hf_model` (a Qwen2.5-VL *ForConditionalGeneration or a
    module holding one) at the shared-prefix attention over its current implementation. Idempotent.
    Raises ValueError for a config with sliding-window layers (the packed mask has no window)."""
    text = hf_model.config.text_config if hasattr(hf_model.config, "text_config") else hf_model.config
    current = text._attn_implementation
    if current.startswith(PREFIX):
        return
    if getattr(text, "use_sliding_window", False):
        raise ValueError("shared-prefix attention does not support sliding-window layers (text_config.use_sliding_window)")
    text._attn_implementation = registered_name(current)


def installed(hf_model) -> bool:
    text = hf_model.config.text_config if hasattr(hf_model.config, "text_config") else hf_model.config
    return text._attn_implementation.startswith(PREFIX)
