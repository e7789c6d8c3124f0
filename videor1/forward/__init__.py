"""How a prompt group's completions meet the model in the training passes: one interface, two forms.

    inputs = forward.build_inputs(prompt, completion_ids, mask, shared=True)
    hidden = forward.completion_hidden(hf_model, inputs, prompt_len, completion_len)  # [G, C, H]

- repeated (videor1.forward.repeated): G sequences [prompt; c_i]; the vision tower and the prompt
  run G times. `train.shared_prefix: false`.
- shared prefix (videor1.forward.shared_prefix): one packed sequence [prompt; c1; ...; cG]; the
  vision tower and the prompt run once, exactly (videor1.forward.attention). The default.

Both give the same [G, C, H] hidden states to the fused kernels (PolicyModule), so the reference
forward, the old log-probs and the policy loss take either.
"""

from __future__ import annotations

import torch

from videor1.forward import repeated, shared_prefix
from videor1.forward.attention import PrefixLayout

__all__ = ["PrefixLayout", "build_inputs", "completion_hidden", "repeated", "shared_prefix"]


def build_inputs(prompt, completion_ids: torch.Tensor, mask: torch.Tensor, *, shared: bool,
                 lengths=None) -> dict:
    """Model kwargs of one prompt group for PolicyModule (either form). prompt: a Prompt on the
    model's device (its input_ids [P] and ordered vision); completion_ids / mask int64 [G, C];
    lengths: mask.sum(1) on the host (a CPU tensor or list) if the caller has it (the shared form
    packs only those tokens; without it the mask is read once)."""
    if not shared:
        return repeated.pack(prompt.input_ids, prompt.vision, completion_ids, mask)
    lengths = None if lengths is None else [int(n) for n in lengths]
    return shared_prefix.pack(prompt.input_ids, prompt.vision, completion_ids, mask, lengths=lengths)


def completion_hidden(hf_model, inputs: dict, prompt_len: int, completion_len: int) -> torch.Tensor:
    """[G, C, H] last hidden states predicting the completion tokens, for either form of `inputs`."""
    if shared_prefix.LAYOUT_KEY in inputs:
        hidden = shared_prefix.completion_hidden(hf_model, inputs)
        if hidden.shape[1] != completion_len or inputs[shared_prefix.LAYOUT_KEY].prompt_len != prompt_len:
            raise ValueError(f"packed inputs hold {inputs[shared_prefix.LAYOUT_KEY]}, the caller passed prompt_len "
                             f"{prompt_len} and completion_len {completion_len}")
        return hidden
    return repeated.completion_hidden(hf_model, inputs, prompt_len, completion_len)
