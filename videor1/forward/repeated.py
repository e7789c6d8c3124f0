"""The repeated forward: G sequences [prompt; c_i], the prompt (and the vision tower) computed G times.

Kept as the reference the shared-prefix forward is tested against, and as `train.shared_prefix: false`.
"""

from __future__ import annotations

import torch


def repeat_vision(vision_inputs: dict, n: int) -> dict:
    """The vision kwargs of one sample repeated for n sequences (HF concatenates patches per sample)."""
    out = {}
    for key, value in vision_inputs.items():
        out[key] = value.repeat(n) if key == "second_per_grid_ts" else value.repeat(n, 1)
    return out


def pack(prompt_ids: torch.Tensor, vision: dict, completion_ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Model kwargs for G sequences prompt + completion: input_ids [G, P + C], attention_mask
    [G, P + C], the vision kwargs repeated G times. prompt_ids int64 [P]; completion_ids / mask
    int64 [G, C]; all on one device (the model's)."""
    b = completion_ids.shape[0]
    prompt = prompt_ids[None].expand(b, -1)
    return {
        "input_ids": torch.cat([prompt, completion_ids], dim=1),
        "attention_mask": torch.cat([torch.ones_like(prompt), mask], dim=1),
        **repeat_vision(vision, b),
    }


def completion_hidden(hf_model, model_inputs: dict, prompt_len: int, completion_len: int) -> torch.Tensor:
    """Last hidden states that predict the completion tokens: [B, C, H]; position t's hidden state
    predicts token t + 1, so the completion's predictors are positions P - 1 .. P + C - 2."""
    from videor1.policy import with_mm_token_types  # late: policy imports this module

    out = hf_model.model(**with_mm_token_types(model_inputs, hf_model.config), use_cache=False, return_dict=True)
    return out.last_hidden_state[:, prompt_len - 1 : prompt_len - 1 + completion_len]
