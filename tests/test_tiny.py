"""The tiny Qwen2.5-VL checkpoint: loads offline, processes a video, forwards, generates; deterministic."""

import json
import math
import os
import subprocess
import sys

import pytest

from videor1 import tiny
from videor1.prompts import QUESTION_TEMPLATE, TYPE_TEMPLATE, build_prompt_text

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """One checkpoint per session, built by the command line in its own process."""
    out = str(tmp_path_factory.mktemp("tiny") / "ckpt")
    subprocess.run([sys.executable, "-m", "videor1.tiny", "--out", out], env=ENV, cwd=REPO, check=True)
    return out


@pytest.fixture(scope="module")
def tok(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


def _json(path):
    with open(path) as f:
        return json.load(f)


# Runs in a fresh process: offline load, chat template, processor on raw uint8 videos, forward, generate.
LOAD_AND_GENERATE = r"""
import json, sys, torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from videor1.prompts import build_messages

ckpt = sys.argv[1]
model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
processor = AutoProcessor.from_pretrained(ckpt)
row = {"problem": "Which way does the red square move?", "problem_type": "multiple choice",
       "options": ["A. left", "B. right", "C. up", "D. down"], "data_type": "video"}
text = processor.apply_chat_template(build_messages(row), tokenize=False, add_generation_prompt=True)
g = torch.Generator().manual_seed(0)
report = {"model": type(model).__name__, "processor": type(processor).__name__, "videos": []}
for t, h, w in [(8, 64, 64), (7, 96, 128)]:
    video = torch.randint(0, 256, (t, h, w, 3), dtype=torch.uint8, generator=g)
    inputs = processor(text=[text], videos=[video], return_tensors="pt")
    ids = inputs["input_ids"]
    with torch.no_grad():
        logits = model(**inputs).logits
    new = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    report["videos"].append({
        "grid_thw": inputs["video_grid_thw"].tolist(),
        "pixel_values_videos": list(inputs["pixel_values_videos"].shape),
        "n_video_pad": int((ids == model.config.video_token_id).sum()),
        "input_len": ids.shape[1],
        "logits": list(logits.shape),
        "logits_finite": bool(torch.isfinite(logits).all()),
        "generated": list(new.shape),
        "prefix_kept": bool((new[:, : ids.shape[1]] == ids).all()),
    })
report["vocab_size"] = model.config.text_config.vocab_size
report["len_tokenizer"] = len(processor.tokenizer)
print(json.dumps(report))
"""


def test_loads_offline_processes_video_forwards_and_generates(ckpt):
    out = subprocess.run(
        [sys.executable, "-c", LOAD_AND_GENERATE, ckpt], env=ENV, cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["model"] == "Qwen2_5_VLForConditionalGeneration" and r["processor"] == "Qwen2_5_VLProcessor"
    assert r["vocab_size"] == r["len_tokenizer"]
    # smart_resize by hand (factor 28, 56^2 <= pixels <= 112^2): 64x64 -> 56x56 (round(64/28) = 2);
    # 96x128 -> 84x140 (round(96/28) = 3, round(128/28) = 5; 11760 pixels fit); 7 frames are padded
    # to 8; grid = (frames / 2, height / 14, width / 14).
    expected_grids = [[4, 4, 4], [4, 6, 10]]
    for v, grid in zip(r["videos"], expected_grids):
        assert v["grid_thw"] == [grid]
        n_patches = math.prod(grid)
        assert v["pixel_values_videos"] == [n_patches, 3 * 2 * 14 * 14]
        assert v["n_video_pad"] == n_patches // 4  # one token per 2x2 merged patches
        assert v["logits"] == [1, v["input_len"], r["vocab_size"]] and v["logits_finite"]
        assert v["generated"] == [1, v["input_len"] + 4] and v["prefix_kept"]


def test_special_tokens_are_single_ids_matching_the_config(ckpt, tok):
    config, gen = _json(os.path.join(ckpt, "config.json")), _json(os.path.join(ckpt, "generation_config.json"))
    ids = {}
    for token in tiny.SPECIAL_TOKENS + tiny.TAG_TOKENS:
        enc = tok(f"x {token} y", add_special_tokens=False).input_ids
        single = tok(token, add_special_tokens=False).input_ids
        assert len(single) == 1 and single[0] in enc, token
        assert tok.convert_ids_to_tokens(single[0]) == token
        ids[token] = single[0]
    assert len(set(ids.values())) == len(ids)
    assert config["image_token_id"] == ids["<|image_pad|>"]
    assert config["video_token_id"] == ids["<|video_pad|>"]
    assert config["vision_start_token_id"] == ids["<|vision_start|>"]
    assert config["vision_end_token_id"] == ids["<|vision_end|>"]
    text = config["text_config"]
    assert text["eos_token_id"] == ids["<|im_end|>"] == tok.eos_token_id
    assert text["pad_token_id"] == ids["<|endoftext|>"] == tok.pad_token_id
    assert text["bos_token_id"] == ids["<|endoftext|>"]
    assert gen["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert gen["pad_token_id"] == ids["<|endoftext|>"]
    assert text["vocab_size"] == len(tok)
    # The reasoning tags survive skip_special_tokens (rewards parse them); chat markers do not.
    enc = tok("<think>a</think><answer>B</answer><|im_end|>", add_special_tokens=False).input_ids
    assert tok.decode(enc, skip_special_tokens=True) == "<think>a</think><answer>B</answer>"


def test_tokenizer_round_trips_and_was_trained_on_the_templates(tok):
    from videor1.synthetic import text_corpus

    row = {"problem": "Which colour appeared first?", "problem_type": "multiple choice",
           "options": ["A. red", "B. green", "C. blue"]}  # fmt: skip
    texts = [QUESTION_TEMPLATE, *TYPE_TEMPLATE.values(), build_prompt_text(row)]
    texts += list(text_corpus()) + ["ünïcødé ✓ 3.14 -42\n\ttabs", "A. B. C. D."]
    for s in texts:
        ids = tok(s, add_special_tokens=False).input_ids
        assert tok.decode(ids) == s
    # Trained on the templates: their words are (nearly) single tokens, far fewer than their bytes.
    for s in [QUESTION_TEMPLATE, *TYPE_TEMPLATE.values()]:
        n_tokens = len(tok(s, add_special_tokens=False).input_ids)
        assert n_tokens <= 0.3 * len(s.encode()), (n_tokens, len(s))


def _render_qwen2_vl(messages, add_generation_prompt=False, add_vision_id=False):
    """Qwen2-VL's chat format, written as plain Python (the reference for our Jinja template)."""
    out, n_image, n_video = "", 0, 0
    for i, m in enumerate(messages):
        if i == 0 and m["role"] != "system":
            out += "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        out += f"<|im_start|>{m['role']}\n"
        if isinstance(m["content"], str):
            out += m["content"]
        else:
            for c in m["content"]:
                if c["type"] == "image":
                    n_image += 1
                    out += f"Picture {n_image}: " if add_vision_id else ""
                    out += "<|vision_start|><|image_pad|><|vision_end|>"
                elif c["type"] == "video":
                    n_video += 1
                    out += f"Video {n_video}: " if add_vision_id else ""
                    out += "<|vision_start|><|video_pad|><|vision_end|>"
                else:
                    out += c["text"]
        out += "<|im_end|>\n"
    return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_chat_template_renders_like_qwen2_vl(tok):
    # The documented Qwen2-VL rendering of one image question.
    describe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    assert tok.apply_chat_template(describe, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    conversations = [
        describe,
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Which way?\nOptions:\nA. left\n"}]}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": [{"type": "text", "text": "<think>4</think><answer>4</answer>"}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "video"},
                                         {"type": "text", "text": "Same?"}]},  # fmt: skip
        ],
    ]
    for messages in conversations:
        for gen in (False, True):
            for vid in (False, True):
                got = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, add_vision_id=vid)
                assert got == _render_qwen2_vl(messages, gen, vid)


def test_mrope_section_matches_qwen_and_sums_to_half_head_dim():
    assert tiny.mrope_section(128) == [16, 24, 24]  # Qwen2.5-VL-7B's config
    for head_dim in (6, 8, 16, 32, 64, 80, 128):
        sec = tiny.mrope_section(head_dim)
        assert sum(sec) == head_dim // 2 and min(sec) >= 1


def test_sizes_and_parameter_count(ckpt):
    from safetensors import safe_open

    config = _json(os.path.join(ckpt, "config.json"))
    text, vision = config["text_config"], config["vision_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    assert vision["out_hidden_size"] == text["hidden_size"]
    assert config["tie_word_embeddings"] is False
    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert shapes["lm_head.weight"] == [text["vocab_size"], text["hidden_size"]]
    # saved under the original Qwen2.5-VL checkpoint names, as transformers writes them
    assert shapes["model.embed_tokens.weight"] == [text["vocab_size"], text["hidden_size"]]
    n_params = sum(math.prod(s) for s in shapes.values())
    assert 300_000 <= n_params <= 700_000, n_params  # the DESIGN notes' ~443k model learns motion direction
    assert 512 <= text["vocab_size"] <= 4096


def test_same_seed_is_byte_identical_and_another_seed_differs(ckpt, tmp_path):
    import torch
    from safetensors.torch import load_file

    same = tiny.build_tiny_checkpoint(str(tmp_path / "same"), seed=0)  # this process vs the CLI's
    other = tiny.build_tiny_checkpoint(str(tmp_path / "other"), seed=1)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json", "chat_template.jinja",
                 "processor_config.json", "generation_config.json"):  # fmt: skip
        with open(os.path.join(ckpt, name), "rb") as a, open(os.path.join(same, name), "rb") as b:
            assert a.read() == b.read(), name
    with open(os.path.join(ckpt, "tokenizer.json"), "rb") as a, open(os.path.join(other, "tokenizer.json"), "rb") as b:
        assert a.read() == b.read()  # the tokenizer does not depend on the seed
    w0, w1 = load_file(os.path.join(ckpt, "model.safetensors")), load_file(os.path.join(other, "model.safetensors"))
    assert w0.keys() == w1.keys()
    for key in ("lm_head.weight", "model.embed_tokens.weight", "visual.patch_embed.proj.weight"):
        assert w0[key].shape == w1[key].shape and not torch.equal(w0[key], w1[key]), key


@pytest.mark.parametrize(
    "kwargs, names",
    [
        (dict(hidden=60, heads=4), "head_dim"),
        (dict(heads=4, kv_heads=3), "kv_heads"),
        (dict(vision_hidden=48, vision_heads=8), "vision head_dim"),
        (dict(layers=0), "layers"),
        (dict(vocab_size=100), "vocab_size"),
        (dict(seed=-1), "seed"),
        (dict(hiden=64), "hiden"),
    ],
)
def test_bad_sizes_raise_naming_the_argument(tmp_path, kwargs, names):
    with pytest.raises(ValueError, match=names):
        tiny.build_tiny_checkpoint(str(tmp_path / "x"), **kwargs)
    assert not (tmp_path / "x").exists()  # rejected before any work


def test_refuses_a_non_empty_out_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        tiny.build_tiny_checkpoint(str(tmp_path))
