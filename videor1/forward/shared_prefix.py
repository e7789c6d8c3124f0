"""The shared-prefix forward: one packed sequence [prompt; c1; ...; cG] per prompt group.

The vision tower runs once on the prompt's patches and the prompt's ~1.1k tokens go through the
language model once instead of G times. Exact: every completion token sees what it sees in its own
unshared sequence (videor1.forward.attention), at the M-RoPE position it has there, so the loss, the
log-probs and every gradient equal the repeated forward's (tests/test_shared_prefix.py: fp64 to
1e-10). The prompt's activations are held once per group, under activation checkpointing too.

Positions: the prompt's come from Qwen2.5-VL's original rule (videor1.mrope.rope_index) on the
prompt alone; completion i's token j sits at max(prompt positions) + 1 + j on all three axes (P +
the prompt's rope delta), the same for every i: what each completion has in the unshared forward. A cumsum over the packed mask would make c2 continue after c1.
"""

from __future__ import annotations

import torch

from videor1.forward.attention import PrefixLayout, install, installed
from videor1.mrope import position_ids_for

LAYOUT_KEY = "prefix_layout"


def pack(prompt_ids: torch.Tensor, vision: dict, completion_ids: torch.Tensor, mask: torch.Tensor,
         lengths: list[int] | None = None, ragged: bool = True) -> dict:
    """Model kwargs of one packed prompt group.

    prompt_ids int64 [P]; vision: one sample's vision kwargs (Prompt.vision: pixel values, grid,
    second_per_grid_ts); completion_ids / mask int64 [G, C] (right-padded after EOS, as rollouts return
    them). ragged (the default): only each completion's first lengths[i] tokens are packed (lengths:
    host ints, mask.sum(1) as the trainer already holds it on the CPU; read from the mask when None,
    one host read), so padding costs no compute; ragged False packs every completion's C tokens
    (padding follows each EOS, so causality keeps it from every real token, and the loss masks its
    rows). Returns input_ids [1, P + sum(lengths)], the vision kwargs once, and the PrefixLayout under
    "prefix_layout". All on the prompt's device (Prompt.to)."""
    if prompt_ids.dim() != 1 or completion_ids.dim() != 2 or mask.shape != completion_ids.shape:
        raise ValueError(f"pack: prompt_ids [P], completion_ids and mask [G, C] expected, got "
                         f"{tuple(prompt_ids.shape)}, {tuple(completion_ids.shape)}, {tuple(mask.shape)}")
    G, C = completion_ids.shape
    if not ragged:
        lengths = None
    elif lengths is None:
        lengths = mask.sum(1).tolist()
    lengths = None if lengths is None else [max(1, min(C, int(n))) for n in lengths]  # an empty completion: 1 slot
    layout = PrefixLayout(prompt_ids.numel(), G, C, None if lengths is None else tuple(lengths))
    flat = completion_ids.reshape(-1)
    if layout.lengths is not None:
        index = torch.cat([torch.arange(n) + i * C for i, n in enumerate(layout.lengths)])
        flat = flat.index_select(0, index.to(flat.device))
    ids = torch.cat([prompt_ids, flat])[None]
    return {"input_ids": ids, **vision, LAYOUT_KEY: layout}


def packed_position_ids(model_config, inputs: dict) -> torch.Tensor:
    """int64 [3, 1, L]: the prompt's M-RoPE positions, then each completion's own (module docstring)."""
    layout: PrefixLayout = inputs[LAYOUT_KEY]
    P = layout.prompt_len
    prompt = {k: v for k, v in inputs.items() if k != LAYOUT_KEY}
    prompt["input_ids"] = inputs["input_ids"][:, :P]
    if "mm_token_type_ids" in prompt:  # given for the packed sequence: the prompt's part
        prompt["mm_token_type_ids"] = prompt["mm_token_type_ids"][:, :P]
    positions = position_ids_for(model_config, prompt)  # [3, 1, P]
    start = positions.max() + 1  # where every completion starts: a device scalar (no host read)
    offsets = torch.cat([torch.arange(n) for n in layout.block_lengths])  # 0..len_i - 1 per completion
    completion = offsets.to(positions.device) + start
    return torch.cat([positions, completion.expand(3, 1, -1)], dim=2)


def completion_hidden(hf_model, inputs: dict) -> torch.Tensor:
    """[G, C, H]: the last hidden states that predict each completion's tokens (the shape the
    repeated forward gives), from one packed forward of `hf_model` (a Qwen2.5-VL
    *ForConditionalGeneration; its text attention is switched to the shared-prefix one if needed)."""
    if not installed(hf_model):
        install(hf_model)
    layout: PrefixLayout = inputs[LAYOUT_KEY]
    model_inputs = {k: v for k, v in inputs.items() if k != LAYOUT_KEY}
    model_inputs["position_ids"] = packed_position_ids(hf_model.config, inputs)
    # A dict mask is taken as the per-layer-type masks as they are: our attention reads the layout.
    model_inputs["attention_mask"] = {"full_attention": layout}
    out = hf_model.model(**model_inputs, use_cache=False, return_dict=True)
    hidden = out.last_hidden_state[0]  # [L, H]
    return hidden[layout.predictor_index(hidden.device)]
