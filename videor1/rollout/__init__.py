"""Rollouts: from a dataset row to model inputs (inputs.py), and sampling them (a backend per file).

    inputs.py     Prompt, prepare_prompt / build_prompt, completion masks, decode (no model)
    hf.py         transformers' generate: each prompt prefilled once; generate_batch decodes a whole
                  step's requests (ordered and shuffled, every prompt of the rank) in one call
    vllm.py       a vLLM server in its own venv (vllm_server/, which imports nothing of ours): the
                  client, the server's process, the weight sync

A backend (rollout.backend) has one small interface, which train.py calls once per step:

    backend.sync_weights(engine, version) -> dict    the policy's weights to the sampler (HF: nothing)
    backend.sample(engine, requests, step) -> list[Sampled | None]    None: the request failed twice
    backend.close()
"""

from videor1.rollout.inputs import (MERGE, VISION_TOKENS, Media, Prompt, build_prompt, completion_mask, decode,
                                    load_media, prepare_prompt, second_per_grid_t, truncated_completions,
                                    video_pixel_bounds, vision_token_ids)
from videor1.rollout.hf import HFBackend, Request, Sampled, generate, generate_batch, sampling_mode

__all__ = ["MERGE", "VISION_TOKENS", "HFBackend", "Media", "Prompt", "Request", "Sampled", "build_prompt",
           "completion_mask", "decode", "generate", "generate_batch", "load_media", "prepare_prompt",
           "sampling_mode", "second_per_grid_t", "truncated_completions", "video_pixel_bounds", "vision_token_ids"]
