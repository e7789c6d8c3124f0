"""Generation settings from our config alone, never from a checkpoint's generation_config.json.

transformers' generate fills every field a GenerationConfig leaves unset (None) from the model's
`generation_config`, i.e. from the checkpoint's generation_config.json. Qwen2.5-VL-7B-Instruct ships
repetition_penalty 1.05, top_k 1 and top_p 0.001 there: inherited, rollouts would be penalised,
near-greedy samples that the loss treats as on-policy. So:

- `detach_checkpoint_defaults(model)` replaces a loaded model's generation_config by one that keeps
  only the special token ids (logging what it dropped), so nothing is left to inherit; and
- `sampling_config(...)` builds the full GenerationConfig of a rollout or an evaluation, every
  logits-processor field set explicitly, and generate is always called with it.
"""

from __future__ import annotations

import logging

log = logging.getLogger("videor1.generation")

_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def detach_checkpoint_defaults(model):
    """Give `model` a generation_config with the checkpoint's special token ids and nothing else
    (idempotent; save_pretrained then writes just the ids). Returns the model. Dropped settings are logged once, so a user who relied on them
    sees where they went (our `rollout.*` and the evaluation's flags set sampling)."""
    from transformers import GenerationConfig

    current = getattr(model, "generation_config", None)
    if current is None:
        return model
    defaults = GenerationConfig().to_dict()
    dropped = {k: v for k, v in current.to_dict().items()
               if k not in _TOKEN_FIELDS and not k.startswith("_") and k != "transformers_version"
               and defaults.get(k, None) != v}
    if dropped:
        log.info("ignoring the checkpoint's generation defaults %s: sampling comes from our config only", dropped)
    fresh = GenerationConfig(**{k: getattr(current, k) for k in _TOKEN_FIELDS if getattr(current, k, None) is not None})
    model.generation_config = fresh
    return model


def sampling_config(*, max_new_tokens: int, eos_ids: list[int], pad_id: int, do_sample: bool = True,
                    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                    repetition_penalty: float = 1.0, suppress_ids: list[int] | None = None,
                    num_return_sequences: int = 1):
    """A complete GenerationConfig: every field that adds a logits processor is set explicitly (its
    neutral value when unused), so generate has nothing to fill in from the model.

    top_k 0, top_p 1.0, min_p 0.0 and repetition_penalty 1.0 mean off (min_p 0 is left unset: transformers
    adds its warper for any non-None min_p, and detach_checkpoint_defaults leaves nothing to inherit). Greedy (do_sample=False)
    ignores temperature / top_p / top_k / min_p.
    """
    from transformers import GenerationConfig

    sample = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p or None) if do_sample else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=1, num_return_sequences=num_return_sequences,
        eos_token_id=list(eos_ids), pad_token_id=pad_id, use_cache=True,
        repetition_penalty=repetition_penalty, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
        typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, suppress_tokens=list(suppress_ids or []) or None,
        **sample,
    )


def rollout_config(cfg, eos_ids: list[int], pad_id: int, suppress_ids: list[int], num: int):
    """The GenerationConfig of `num` rollouts under RolloutConfig `cfg` (temperature, top_p, top_k,
    min_p, repetition_penalty, max_completion_length)."""
    return sampling_config(max_new_tokens=cfg.max_completion_length, eos_ids=eos_ids, pad_id=pad_id,
                           temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p,
                           repetition_penalty=cfg.repetition_penalty, suppress_ids=suppress_ids,
                           num_return_sequences=num)
