"""Rollout and training see the same model inputs: the log-probs generate sampled with equal the
log-probs the policy forward (HF trunk -> completion hidden states -> fused kernel) recomputes."""

import json
import os

import pytest
import torch

from videor1.config import Config
from videor1.policy import PolicyModule
from videor1.rollout import completion_mask, prepare_prompt, training_inputs


@pytest.fixture(scope="module")
def setup(tiny_ckpt, synth_data):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_ckpt).eval()
    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    with open(synth_data) as f:
        rows = json.load(f)
    data = Config().data
    data.fps, data.video_min_pixels, data.video_max_pixels = 8.0, 3136, 12544
    data.image_min_pixels, data.image_max_pixels = 3136, 12544
    return model, processor, rows, data, os.path.dirname(synth_data)


@pytest.mark.parametrize("data_type", ["video", "image"])
def test_generate_logprobs_equal_training_logprobs(setup, data_type):
    model, processor, rows, data, root = setup
    row = next(r for r in rows if r["data_type"] == data_type)
    prompt = prepare_prompt(row, processor, data, root, shuffled=data_type == "video",
                            generator=torch.Generator().manual_seed(0))
    ids = prompt.input_ids[None]
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **prompt.vision, do_sample=True,
                             max_new_tokens=10, num_return_sequences=3, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=[], pad_token_id=0)
    completion = out.sequences[:, ids.shape[1]:]
    gen_logp = torch.stack([torch.log_softmax(l.float(), -1) for l in out.logits], 1)
    gen_logp = gen_logp.gather(-1, completion[..., None])[..., 0]
    mask = completion_mask(completion, eos_ids=[])
    policy = PolicyModule(model, kernel_backend="torch")
    with torch.no_grad():
        train_logp = policy(training_inputs(prompt, completion, mask), ids.shape[1], completion, mode="logprobs")
    assert torch.allclose(train_logp, gen_logp, atol=1e-4), (train_logp - gen_logp).abs().max()
    if data_type == "video":  # and the shuffled copy really is different input
        assert not torch.equal(prompt.shuffled_vision["pixel_values_videos"], prompt.vision["pixel_values_videos"])


def test_completion_mask_counts_up_to_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    mask = completion_mask(ids, eos_ids=[2, 3])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
