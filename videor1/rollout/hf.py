"""The HF rollout backend: transformers' generate, each prompt's vision tower and prefill run once.

    generate(module, prompt, vision, n, cfg, ...)      one prompt: n rows from one prefill
    generate_batch(module, requests, cfg, ...)         every request of a step in ONE generate call

generate_batch prefills each request's prompt once (batch 1: its vision tower and its tokens but
the last), lays the caches side by side left-padded to the longest prompt, repeats each to its n
rows, and decodes all rows together: one decode loop per step instead of one per request. Each row
keeps its own M-RoPE offset (the model's rope_deltas, one per row), so its positions are those of
its own unpadded sequence (tests/test_rollout_hf.py checks the batch against one-request calls).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import torch.nn.functional as F

from videor1.config import RolloutConfig
from videor1.generation import rollout_config
from videor1.policy import prefill_cache
from videor1.rollout.inputs import Prompt, completion_mask


@dataclasses.dataclass
class Request:
    """`num` completions of `prompt` on `vision` (its ordered or its shuffled patches)."""

    prompt: Prompt
    vision: dict
    num: int


@dataclasses.dataclass
class Sampled:
    """One request's completions, as every backend returns them: ids int64 [n, C] (pad_id after EOS),
    mask int64 [n, C] (1 up to and including the first EOS), both on the policy's device, and the
    sampled tokens' log-probs float32 [n, C] (0 where masked) when the backend reports them (vLLM)."""

    ids: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor | None = None


def _prefill(module):
    return getattr(module, "prefill", None) or functools.partial(prefill_cache, module)  # or a bare HF model


def _finish(completion: torch.Tensor, num: int, eos_ids: list[int], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if completion.shape[1] == 0:  # generate returned nothing new: an empty, fully masked completion
        completion = torch.full((num, 1), pad_id, dtype=torch.long, device=device)
        return completion, torch.zeros_like(completion)
    mask = completion_mask(completion, eos_ids)
    return completion.masked_fill(mask == 0, pad_id), mask


@torch.no_grad()
def generate(module, prompt: Prompt, vision_inputs: dict, num: int, cfg: RolloutConfig, eos_ids: list[int],
             pad_id: int, *, suppress_ids: list[int] | None = None, shared_prefill: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """`num` sampled completions of one prompt (KV cache on), sampled exactly as `cfg` says
    (videor1.generation.rollout_config: nothing is inherited from the checkpoint).

    shared_prefill: the prompt's vision tower and prefill run once and its KV cache is repeated to
    the `num` sequences (videor1.policy.prefill_cache); otherwise generate expands the prompt to
    `num` rows first and prefills each. The samples are the same either way (same logits, same
    random draws: tests/test_shared_prefix.py).

    prompt and vision_inputs must already be on the model's device (Prompt.to); the outputs stay
    there. Returns completion_ids int64 [num, C] (C <= max_completion_length, padded with pad_id
    after EOS) and completion_mask int64 [num, C]. `suppress_ids` (the vision tokens) are never sampled.
    """
    ids = prompt.input_ids[None]
    shared = shared_prefill and ids.shape[1] > 1
    gen_cfg = rollout_config(cfg, eos_ids, pad_id, suppress_ids or [], 1 if shared else num)
    # The engines gather the full weights for the whole rollout phase, so ranks need not step in
    # lockstep (and they can't: ranks generate for different numbers of prompts).
    if shared:
        cache = _prefill(module)(ids[:, :-1], vision_inputs, num)
        rows = ids.expand(num, -1)
        out = module.generate(input_ids=rows, attention_mask=torch.ones_like(rows), cache=cache,
                              generation_config=gen_cfg, synced_gpus=False)
    else:
        out = module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **vision_inputs,
                              generation_config=gen_cfg, synced_gpus=False)
    return _finish(out[:, ids.shape[1]:], num, eos_ids, pad_id, ids.device)


def _qwen_trunk(module):
    hf = getattr(module, "hf", module)
    return hf.model


@torch.no_grad()
def generate_batch(module, requests: list[Request], cfg: RolloutConfig, eos_ids: list[int], pad_id: int, *,
                   suppress_ids: list[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every request's completions from one generate call (module docstring), sampled as `cfg` says.

    Prompts and vision tensors on the model's device (Prompt.to). Returns, per request,
    (completion_ids int64 [num, C_r], completion_mask int64 [num, C_r]) as `generate` does, C_r the
    request's own longest completion (columns no row of it uses are dropped)."""
    if not requests:
        return []
    if any(r.prompt.input_ids.numel() < 2 for r in requests):
        raise ValueError("generate_batch: every prompt needs at least 2 tokens (one to prefill, one to feed generate)")
    from transformers import DynamicCache

    trunk = _qwen_trunk(module)
    prefill = _prefill(module)
    caches, deltas = [], []
    for r in requests:  # one prefill per request: its vision tower and its prompt once
        caches.append(prefill(r.prompt.input_ids[None, :-1], r.vision, 1))
        delta = trunk.rope_deltas
        deltas.append(torch.zeros(1, 1, dtype=torch.long, device=r.prompt.input_ids.device) if delta is None
                      else delta.reshape(1, 1))
    width = max(r.prompt.input_ids.numel() for r in requests)
    ids, attn, rows_delta = [], [], []
    for r, delta in zip(requests, deltas):
        p = r.prompt.input_ids
        pad = width - p.numel()
        ids.append(F.pad(p, (pad, 0), value=pad_id).expand(r.num, -1))
        attn.append(F.pad(torch.ones_like(p), (pad, 0)).expand(r.num, -1))
        rows_delta.append(delta.expand(r.num, 1))
    merged = DynamicCache(config=getattr(module, "hf", module).config)
    for layer in range(len(caches[0].layers)):
        parts = [(F.pad(c.layers[layer].keys, (0, 0, width - r.prompt.input_ids.numel(), 0)),
                  F.pad(c.layers[layer].values, (0, 0, width - r.prompt.input_ids.numel(), 0)))
                 for c, r in zip(caches, requests)]
        keys = torch.cat([k.expand(r.num, -1, -1, -1) for (k, _), r in zip(parts, requests)])
        values = torch.cat([v.expand(r.num, -1, -1, -1) for (_, v), r in zip(parts, requests)])
        merged.update(keys, values, layer)
    del caches
    trunk.rope_deltas = torch.cat(rows_delta)  # [rows, 1]: each row decodes at its own prompt's offset
    ids, attn = torch.cat(ids), torch.cat(attn)
    gen_cfg = rollout_config(cfg, eos_ids, pad_id, suppress_ids or [], 1)
    out = module.generate(input_ids=ids, attention_mask=attn, cache=merged, generation_config=gen_cfg,
                          synced_gpus=False)
    trunk.rope_deltas = None
    results, start = [], 0
    for r in requests:
        completion, mask = _finish(out[start:start + r.num, width:], r.num, eos_ids, pad_id, ids.device)
        start += r.num
        used = int(mask.sum(1).max()) if mask.numel() else 0  # one host read per request
        keep = max(1, used)
        results.append((completion[:, :keep], mask[:, :keep]))
    return results


@contextlib.contextmanager
def sampling_mode(model):
    """The model in eval mode while it samples: with activation checkpointing on, transformers turns
    the KV cache off for a module in training mode (every token would recompute the whole prefix)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class HFBackend:
    """Rollouts with transformers' generate on the policy itself (the default; no second venv).

    sample() holds the engine's full weights for the whole phase (engine.full_weights(): one
    all-gather, not one per generated token) and calls generate_batch (rollout.batch_requests) or
    generate per request. Weights need no sync: the policy samples itself."""

    name = "hf"

    def __init__(self, cfg, *, eos_ids: list[int], pad_id: int, suppress_ids: list[int]):
        self.cfg, self.eos_ids, self.pad_id, self.suppress_ids = cfg, eos_ids, pad_id, suppress_ids
        self.last_sync: dict = {}

    def sync_weights(self, engine, version: int) -> dict:
        return {}

    def sample(self, engine, requests: list[Request], step: int) -> list[Sampled]:
        """A Sampled per request (no log-probs), on the engine's device. step: unused (generate draws
        from torch's global generator, which the checkpoints save)."""
        cfg = self.cfg
        with engine.full_weights() as model, sampling_mode(model):
            if cfg.rollout.batch_requests:
                out = generate_batch(model, requests, cfg.rollout, self.eos_ids, self.pad_id,
                                     suppress_ids=self.suppress_ids)
            else:
                out = [generate(model, r.prompt, r.vision, r.num, cfg.rollout, self.eos_ids, self.pad_id,
                                suppress_ids=self.suppress_ids, shared_prefill=cfg.train.shared_prefix)
                       for r in requests]
        return [Sampled(ids, mask) for ids, mask in out]

    def close(self) -> None:
        pass
