"""The root module the engines wrap: HF model -> completion hidden states -> fused kernels.

Only the completion positions ever meet the lm_head, and only inside kernels.linear_* (chunked over
the vocabulary), so the [tokens, vocab] logits are never materialised for the prompt, the video
tokens, or the completion.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import kernels
from videor1 import forward


def with_mm_token_types(model_inputs: dict, config) -> dict:
    """model_inputs plus `mm_token_type_ids` [B, T] (input_ids dtype; text 0, image 1, video 2), as Qwen2.5-VL's
    processor returns them.

    transformers builds Qwen2.5-VL's 3D M-RoPE positions (time, height, width for the vision tokens)
    only when it is given these types; without them it silently falls back to 1D positions. Our
    prompts come from the fused patch kernel, not the processor, so the types are derived here from
    the placeholder ids, for generate and for every training forward alike.
    """
    if "mm_token_type_ids" in model_inputs or "input_ids" not in model_inputs:
        return model_inputs
    ids = model_inputs["input_ids"]
    types = torch.zeros_like(ids)
    # Only modalities with patches: a stray placeholder id in text (the trainer suppresses them in
    # sampling) stays text rather than asking get_rope_index for a grid that does not exist.
    if model_inputs.get("image_grid_thw") is not None:
        types[ids == config.image_token_id] = 1
    if model_inputs.get("video_grid_thw") is not None:
        types[ids == config.video_token_id] = 2
    return {**model_inputs, "mm_token_type_ids": types}


class PolicyModule(nn.Module):
    """Wraps a Qwen2.5-VL `*ForConditionalGeneration` (`.model` trunk + `.lm_head`).

    forward(mode="logprobs") -> float32 [B, C] per-token log-probs of `completion_ids` (no grad; 0 where
        completion_mask, if given, is 0).
    forward(mode="loss", advantages=..., completion_mask=..., loss_kwargs=...) -> (loss, metrics)
        via kernels.linear_grpo_loss.
    forward(mode="sft", label_mask=...) -> (mean token cross-entropy, number of label tokens); only
        the labelled positions meet the lm_head, in checkpointed chunks.
    generate(**kw) -> the HF model's generate (the engines gather the weights around it).
    """

    def __init__(self, hf_model: nn.Module, kernel_backend: str = "auto", temperature: float = 1.0):
        super().__init__()
        self.hf = hf_model
        self.kernel_backend = kernel_backend
        self.temperature = temperature

    def completion_hidden(self, model_inputs: dict, prompt_len: int, completion_len: int) -> torch.Tensor:
        """Last hidden states that predict the completion tokens: [B, C, H].

        model_inputs: either form of videor1.forward.build_inputs: the repeated one (input_ids
        [B, P + C], attention_mask, the vision tensors B times) or the packed shared-prefix one
        (input_ids [1, P + B*C], the vision tensors once, a PrefixLayout).
        """
        return forward.completion_hidden(self.hf, model_inputs, prompt_len, completion_len)

    def forward(self, model_inputs: dict, prompt_len: int = 0, completion_ids: torch.Tensor | None = None,
                mode: str = "loss", advantages: torch.Tensor | None = None,
                completion_mask: torch.Tensor | None = None, loss_kwargs: dict | None = None,
                label_mask: torch.Tensor | None = None):
        if mode == "sft":
            return self.sft_loss(model_inputs, label_mask)
        hidden = self.completion_hidden(model_inputs, prompt_len, completion_ids.shape[1])
        weight = self.hf.lm_head.weight
        bias = getattr(self.hf.lm_head, "bias", None)
        if mode == "logprobs":
            return kernels.linear_selective_logprobs(  # padding never meets the lm_head; it gets 0
                hidden, weight, completion_ids, bias=bias, temperature=self.temperature, mask=completion_mask,
                backend=self.kernel_backend,
            )
        if mode != "loss":
            raise ValueError(f"mode must be 'loss' or 'logprobs', got {mode!r}")
        return kernels.linear_grpo_loss(
            hidden, weight, completion_ids, advantages, completion_mask, bias=bias,
            temperature=self.temperature, backend=self.kernel_backend, **(loss_kwargs or {}),
        )

    def sft_loss(self, model_inputs: dict, label_mask: torch.Tensor, chunk: int = 1024):
        """Next-token cross-entropy on the positions where label_mask [B, T] is set (token mean)."""
        out = self.hf.model(**with_mm_token_types(model_inputs, self.hf.config), use_cache=False, return_dict=True)
        select = label_mask[:, 1:].bool()  # hidden state t predicts token t + 1
        hidden = out.last_hidden_state[:, :-1][select]
        targets = model_inputs["input_ids"][:, 1:][select]
        weight, bias = self.hf.lm_head.weight, getattr(self.hf.lm_head, "bias", None)

        def chunk_ce(h, t, w):
            logits = torch.nn.functional.linear(h, w, bias).float()
            return torch.nn.functional.cross_entropy(logits, t, reduction="sum")

        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):  # the [n, V] logits live one chunk at a time
            # chunk_ce draws no random numbers: no RNG state to save and restore around the recompute
            total = total + checkpoint(chunk_ce, hidden[start:start + chunk], targets[start:start + chunk],
                                       weight, use_reentrant=False, preserve_rng_state=False)
        n = int(select.sum())
        return total / max(1, n), n

    def generate(self, **kwargs):
        return self.hf.generate(**with_mm_token_types(kwargs, self.hf.config))

    def prefill(self, input_ids: torch.Tensor, vision_inputs: dict, copies: int):
        """prefill_cache on the wrapped model (a method, so FSDP2 runs its root hooks around it)."""
        return prefill_cache(self.hf, input_ids, vision_inputs, copies)


@torch.no_grad()
def prefill_cache(hf_model, input_ids: torch.Tensor, vision_inputs: dict, copies: int):
    """KV cache of one prompt's tokens, computed once (the vision tower included) and repeated to
    `copies` sequences: a transformers DynamicCache with batch `copies`, for generate(cache=...).

    hf_model: a Qwen2.5-VL *ForConditionalGeneration; input_ids int64 [1, T] (all but the prompt's
    last token: generate feeds that one, so its first step has a token to sample from); vision_inputs:
    the prompt's vision kwargs. The model's rope_deltas stay set from this prompt, so decoding
    continues at max(prompt positions) + 1."""
    from transformers import DynamicCache

    cache = DynamicCache(config=hf_model.config)
    hf_model.model.rope_deltas = None  # never the previous prompt's (a text-only prompt computes none)
    inputs = with_mm_token_types({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                                  **vision_inputs}, hf_model.config)
    hf_model.model(**inputs, cache=cache, use_cache=True, return_dict=True)
    if copies > 1:
        cache.batch_repeat_interleave(copies)
    return cache
