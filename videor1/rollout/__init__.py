"""Rollouts: from a dataset row to model inputs (inputs.py), and sampling them (a backend per file).

    inputs.py  Prompt, prepare_prompt / build_prompt, completion masks, decode (no model)
    hf.py      transformers' generate: each prompt prefilled once; generate_batch decodes a whole
               step's requests (ordered and shuffled, every prompt of the rank) in one call
"""

from videor1.rollout.inputs import (MERGE, VISION_TOKENS, Media, Prompt, build_prompt, completion_mask, decode,
                                    load_media, prepare_prompt, second_per_grid_t, truncated_completions,
                                    video_pixel_bounds, vision_token_ids)
from videor1.rollout.hf import Request, generate, generate_batch

__all__ = ["MERGE", "VISION_TOKENS", "Media", "Prompt", "Request", "build_prompt", "completion_mask", "decode",
           "generate", "generate_batch", "load_media", "prepare_prompt", "second_per_grid_t", "truncated_completions",
           "video_pixel_bounds", "vision_token_ids"]
