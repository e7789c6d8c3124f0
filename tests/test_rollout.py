"""Rollout and training see the same model inputs: the log-probs generate sampled with equal the
log-probs the policy forward (HF trunk -> completion hidden states -> fused kernel) recomputes."""

import json
import os

import pytest
import torch

from videor1.config import Config
from videor1.policy import PolicyModule
from videor1.forward import build_inputs
from videor1.rollout import completion_mask, prepare_prompt, vision_token_ids


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
    policy = PolicyModule(model, kernel_backend="torch")
    with torch.no_grad():  # as the trainer samples: through the policy, vision placeholders suppressed
        out = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **prompt.vision, do_sample=True,
                              max_new_tokens=10, num_return_sequences=3, output_logits=True,
                              return_dict_in_generate=True, eos_token_id=[], pad_token_id=0,
                              suppress_tokens=vision_token_ids(processor.tokenizer))
    completion = out.sequences[:, ids.shape[1]:]
    gen_logp = torch.stack([torch.log_softmax(l.float(), -1) for l in out.logits], 1)
    gen_logp = gen_logp.gather(-1, completion[..., None])[..., 0]
    mask = completion_mask(completion, eos_ids=[])
    with torch.no_grad():
        train_logp = policy(build_inputs(prompt, completion, mask, shared=False), ids.shape[1], completion, mode="logprobs")
    assert torch.allclose(train_logp, gen_logp, atol=1e-4), (train_logp - gen_logp).abs().max()
    if data_type == "video":  # and the shuffled copy really is different input
        assert not torch.equal(prompt.shuffled_vision["pixel_values_videos"], prompt.vision["pixel_values_videos"])


def test_completion_mask_counts_up_to_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    mask = completion_mask(ids, eos_ids=[2, 3])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_vision_tokens_get_3d_mrope_positions_as_with_the_processor(setup):
    """Our prompts bypass the HF processor (the fused patch kernel makes the patches), so the
    token types that make transformers build Qwen2.5-VL's 3D M-RoPE positions are derived from the
    ids: they must equal the processor's for the same text and frames, and the policy forward must
    use them (without them transformers silently falls back to 1D positions)."""
    from videor1.policy import with_mm_token_types
    from videor1.prompts import build_messages
    from videor1.rollout import build_prompt, load_media

    model, processor, rows, data, root = setup
    row = next(r for r in rows if r["data_type"] == "video")
    media = load_media(row, data, root)
    prompt = build_prompt(row, media, processor, data, shuffled=False)
    text = processor.apply_chat_template(build_messages(row), tokenize=False, add_generation_prompt=True)
    frames = torch.as_tensor(media.frames).permute(0, 3, 1, 2)
    ref = processor(text=[text], videos=[frames], return_tensors="pt", videos_kwargs={
        "size": {"shortest_edge": data.video_min_pixels, "longest_edge": data.video_max_pixels},
        "do_sample_frames": False})
    inputs = {"input_ids": prompt.input_ids[None], "attention_mask": torch.ones_like(prompt.input_ids[None]),
              **prompt.vision}
    assert torch.equal(ref["input_ids"], inputs["input_ids"])
    typed = with_mm_token_types(inputs, model.config)
    assert torch.equal(typed["mm_token_type_ids"], ref["mm_token_type_ids"])
    assert int((typed["mm_token_type_ids"] == 2).sum()) == int(prompt.vision["video_grid_thw"].prod()) // 4

    with torch.no_grad():
        n = inputs["input_ids"].shape[1]
        got = PolicyModule(model).completion_hidden(inputs, prompt_len=1, completion_len=n - 1)
        want = model.model(**inputs, mm_token_type_ids=ref["mm_token_type_ids"]).last_hidden_state[:, :-1]
        flat = model.model(**inputs).last_hidden_state[:, :-1]  # transformers' 1D fallback
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got - flat).abs().max() > 1e-3


@pytest.mark.parametrize("mode, min_px, max_px, hw", [
    ("qwen_vl_utils", 100352, 100352, (280, 364)),  # Video-R1: bounds [100352, 105369]
    ("fixed", 100352, 100352, (252, 364)),
    ("fixed", 3136, 12544, (84, 112)),
    ("qwen_vl_utils", 3136, 12544, (84, 112)),  # max(min(12544, total / T * 2), 3292) = 12544
])
def test_video_pixel_modes_size_the_frames(setup, mode, min_px, max_px, hw):
    import dataclasses
    import math

    from videor1.rollout import Media, build_prompt, video_pixel_bounds

    _, processor, rows, data, _ = setup
    data = dataclasses.replace(data, video_pixels=mode, video_min_pixels=min_px, video_max_pixels=max_px)
    row = next(r for r in rows if r["data_type"] == "video")
    frames = torch.randint(0, 256, (4, 480, 640, 3), dtype=torch.uint8)
    prompt = build_prompt(row, Media(frames, 0.5), processor, data, shuffled=True,
                          generator=torch.Generator().manual_seed(0))
    h, w = hw
    assert prompt.vision["video_grid_thw"].tolist() == [[2, h // 14, w // 14]]
    assert prompt.shuffled_vision["video_grid_thw"].tolist() == [[2, h // 14, w // 14]]
    pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((prompt.input_ids == pad).sum()) == 2 * (h // 28) * (w // 28)
    lo, hi = video_pixel_bounds(data, 4)
    if mode == "fixed":
        assert (lo, hi) == (min_px, max_px)
    else:  # the qwen-vl-utils formula, written out
        assert (lo, hi) == (min_px, max(min(max_px, data.video_total_pixels / 4 * 2), math.floor(min_px * 1.05)))


@pytest.mark.parametrize("mode, expected", [("fps", 0.5), ("one", 1.0)])
def test_second_per_grid_ts_switch(setup, mode, expected):
    import dataclasses

    from videor1.rollout import Media, build_prompt, load_media

    _, processor, rows, data, root = setup
    data = dataclasses.replace(data, second_per_grid_ts=mode)
    row = next(r for r in rows if r["data_type"] == "video")
    frames = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    prompt = build_prompt(row, Media(frames, 0.5), processor, data, shuffled=True,
                          generator=torch.Generator().manual_seed(0))
    assert prompt.vision["second_per_grid_ts"].tolist() == [expected]
    assert prompt.shuffled_vision["second_per_grid_ts"].tolist() == [expected]
    # from a decoded file: "fps" is 2 / sample_fps of the sampling (8 fps read at 8 fps: 0.25 s), "one" 1.0
    media = load_media(row, data, root)
    got = build_prompt(row, media, processor, data, shuffled=False).vision["second_per_grid_ts"].item()
    assert media.second_per_grid_t == pytest.approx(2 / 8.0, rel=1e-6)
    assert got == pytest.approx(1.0 if mode == "one" else media.second_per_grid_t)
