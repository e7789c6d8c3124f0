"""Rollouts and evaluation sample exactly as our config says, whatever the checkpoint's
generation_config.json holds (Qwen2.5-VL-7B-Instruct ships repetition_penalty 1.05, top_k 1,
top_p 0.001: inherited, rollouts would be penalised near-greedy samples treated as on-policy)."""

import json
import os
import shutil

import pytest
import torch

from videor1.config import Config
from videor1.model import load_model
from videor1.rollout import generate, prepare_prompt, vision_token_ids
from videor1.session import special_ids

QWEN_INSTRUCT_DEFAULTS = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.1, "top_k": 1,
                          "top_p": 0.001}


@pytest.fixture(scope="module")
def penalised_ckpt(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint with Qwen2.5-VL-7B-Instruct's sampling defaults in generation_config.json."""
    out = str(tmp_path_factory.mktemp("penalised") / "ckpt")
    shutil.copytree(tiny_ckpt, out)
    path = os.path.join(out, "generation_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(QWEN_INSTRUCT_DEFAULTS)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return out


@pytest.fixture(scope="module")
def prompt(penalised_ckpt, synth_data):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(penalised_ckpt)
    with open(synth_data) as f:
        row = next(r for r in json.load(f) if r["data_type"] == "video")
    data = Config().data
    data.fps, data.video_min_pixels, data.video_max_pixels = 8.0, 3136, 3136
    return processor, prepare_prompt(row, processor, data, os.path.dirname(synth_data), shuffled=False)


def record_processors(model) -> list:
    """Wrap model._get_logits_processor so each generate call's processor list is recorded."""
    calls = []
    original = model._get_logits_processor

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out)
        return out

    model._get_logits_processor = wrapped
    return calls


def describe(processors) -> list[tuple]:
    """(class name, its setting) of each processor: what sampling actually applied."""
    out = []
    for p in processors:
        name = type(p).__name__
        value = {"TemperatureLogitsWarper": "temperature", "TopPLogitsWarper": "top_p", "TopKLogitsWarper": "top_k",
                 "RepetitionPenaltyLogitsProcessor": "penalty", "MinPLogitsWarper": "min_p"}.get(name)
        setting = getattr(p, value) if value else None
        if name == "SuppressTokensLogitsProcessor":
            setting = sorted(p.suppress_tokens.tolist())
        out.append((name, setting))
    return sorted(out, key=lambda x: x[0])


def test_rollouts_use_exactly_the_processors_our_config_asks_for(penalised_ckpt, prompt):
    processor, p = prompt
    tok = processor.tokenizer
    eos_ids, pad_id = special_ids(tok)
    suppress = vision_token_ids(tok)
    model = load_model(penalised_ckpt)
    calls = record_processors(model)
    rollout = Config().rollout
    rollout.max_completion_length = 3
    rollout.temperature, rollout.top_p, rollout.top_k = 1.0, 0.95, 0
    ids, mask = generate(model, p, p.vision, 2, rollout, eos_ids, pad_id, suppress_ids=suppress)
    assert ids.shape[0] == 2
    assert describe(calls[-1]) == [("SuppressTokensLogitsProcessor", sorted(suppress)), ("TopPLogitsWarper", 0.95)]

    # Every switch of ours reaches generate, and only ours.
    rollout.temperature, rollout.top_k, rollout.min_p, rollout.repetition_penalty = 0.7, 5, 0.05, 1.1
    generate(model, p, p.vision, 2, rollout, eos_ids, pad_id, suppress_ids=suppress)
    assert describe(calls[-1]) == [
        ("MinPLogitsWarper", 0.05), ("RepetitionPenaltyLogitsProcessor", 1.1),
        ("SuppressTokensLogitsProcessor", sorted(suppress)), ("TemperatureLogitsWarper", 0.7),
        ("TopKLogitsWarper", 5), ("TopPLogitsWarper", 0.95)]


def test_without_detaching_the_checkpoint_defaults_sampling_is_penalised(penalised_ckpt, prompt):
    """The control: the same call on the checkpoint as transformers loads it inherits its defaults
    (what the trainer did before: every unset field came from generation_config.json)."""
    from transformers import AutoModelForImageTextToText

    processor, p = prompt
    tok = processor.tokenizer
    eos_ids, pad_id = special_ids(tok)
    model = AutoModelForImageTextToText.from_pretrained(penalised_ckpt)
    calls = record_processors(model)
    ids = p.input_ids[None]
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **p.vision, max_new_tokens=2,
                   do_sample=True, temperature=1.0, top_p=0.95, eos_token_id=eos_ids, pad_token_id=pad_id)
    got = dict(describe(calls[-1]))
    assert got["RepetitionPenaltyLogitsProcessor"] == 1.05 and got["TopKLogitsWarper"] == 1


def test_evaluation_sampling_and_saved_config(penalised_ckpt, prompt, synth_data, tmp_path):
    from videor1.eval import evaluate

    processor, _ = prompt
    with open(synth_data) as f:
        rows = [r for r in json.load(f) if r["data_type"] == "video"][:1]
    data = Config().data
    data.fps, data.video_min_pixels, data.video_max_pixels = 8.0, 3136, 3136
    model = load_model(penalised_ckpt)
    calls = record_processors(model)
    suppress = sorted(vision_token_ids(processor.tokenizer))
    evaluate(model, processor, rows, data, os.path.dirname(synth_data), max_new_tokens=2, progress=False)
    assert describe(calls[-1]) == [("SuppressTokensLogitsProcessor", suppress)]  # greedy: nothing else
    evaluate(model, processor, rows, data, os.path.dirname(synth_data), max_new_tokens=2, progress=False,
             sampling="video-r1")
    assert describe(calls[-1]) == [("SuppressTokensLogitsProcessor", suppress), ("TemperatureLogitsWarper", 0.1),
                                   ("TopPLogitsWarper", 0.001)]
    # A checkpoint we write carries the token ids only: no sampling defaults travel on to the next stage.
    model.save_pretrained(tmp_path / "out")
    with open(tmp_path / "out" / "generation_config.json") as f:
        saved = json.load(f)
    assert set(saved) - {"transformers_version"} == {"bos_token_id", "eos_token_id", "pad_token_id"}
