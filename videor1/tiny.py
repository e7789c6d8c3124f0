"""A tiny, randomly initialised Qwen2.5-VL checkpoint directory, built offline.

    python -m videor1.tiny --out /tmp/tiny [--seed 0] [--hidden 64] [--layers 2] ...

writes what `AutoModelForImageTextToText.from_pretrained` and `AutoProcessor.from_pretrained` load:
config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json,
chat_template.jinja and processor_config.json (the image and video processor settings), all through
transformers' own `save_pretrained`, so the directory has exactly the layout of a real checkpoint.

Choices (the 7B model's in brackets):
- Tokenizer: byte-level BPE trained with `tokenizers` on the Video-R1 prompt templates and the
  synthetic corpus (`videor1.synthetic.text_corpus()`), with Qwen2's normaliser and pre-tokeniser so
  the transformers class `Qwen2Tokenizer` loads it unchanged. Ids: BPE tokens first, then Qwen2.5-VL's
  special tokens in Qwen's order (<|endoftext|>, <|im_start|>, <|im_end|>, <|vision_start|>,
  <|vision_end|>, <|vision_pad|>, <|image_pad|>, <|video_pad|>), then <think>, </think>, <answer>,
  </answer> as single, non-special added tokens: a tiny model need not learn to spell the tags, and
  `skip_special_tokens=True` keeps them in decoded text, where the rewards look for them.
  config.vocab_size == len(tokenizer) (no padded rows, unlike Qwen's 151936 > 151665).
- Text model: hidden 64, 2 layers, 2 heads of head_dim 32, 2 KV heads, MLP 256 [3584, 28, 28 x 128,
  4, 18944]; mrope_section [4, 6, 6] sums to head_dim/2 = 16, in Qwen's 2:3:3 ratio [16, 24, 24].
  head_dim 32 because vLLM's CPU attention serves none below it ("Unsupported CPU attention
  configuration"), so rollout.backend vllm serves this model as it is. (The demo was first tuned
  on 4 heads of 16; at head_dim 32 its SFT needed 1800 steps and 8 time positions per second to
  learn what it had in 900: docs/demo.md.)
  tie_word_embeddings False: the trainer reads lm_head.weight for its fused loss kernels.
- Vision model: depth 2, hidden 64, 4 heads, MLP 128 [32, 1280, 16, 3420], patch 14, temporal patch 2,
  spatial merge 2, out_hidden_size = text hidden. fullatt_block_indexes [depth - 1]: the last block attends over the
  whole video, the others within windows, as the 7B model's last block [7, 15, 23, 31 of 32].
  tokens_per_second 2 [2]: a video's temporal patch i sits at time position
  floor(i * second_per_grid_t * tokens_per_second). At Qwen's 2 fps that is 2 positions per patch; at
  the demo's 8 fps it is 0.5, truncated, so patches 0 and 1 share a time (0, 0, 1, 1): the demo
  builds its model with 8, which gives its patches 0, 2, 4, 6 (the 7B's spacing at 2 fps).
  window_size 112 px (4 x 4 merged tokens) [112]: with max_pixels 112 * 112 a resized frame fits
  one window, so the windowed blocks attend within each temporal patch and the last across time.
- Image and video processors: min_pixels 56 * 56, max_pixels 112 * 112. smart_resize (factor 28) then
  maps 64x64 frames to 56x56 (4 x 4 patches, 4 tokens per temporal patch), 96x96 to 84x84 (9 tokens),
  128x128 or larger to 112x112 (16 tokens), 96x128 to 84x140 (15 tokens); 8 frames of 128x128 cost
  64 <|video_pad|> tokens.
  cap_pixels_per_frame False: its total-video cap (90% of 128000 tokens) never binds at these sizes;
  setting it explicitly only silences transformers' warning about the coming default.

With the defaults and the synthetic corpus of this commit: about 477k parameters (the DESIGN notes'
443k model of this shape learns 4-way motion direction on CPU), a vocabulary of about 815 (the BPE
saturates: every corpus word becomes one token before 1024), built in about 5 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

# Qwen2.5-VL's special tokens, in Qwen's id order (Qwen's <|object_ref_start|>, <|box_start|> and
# <|quad_start|> families sit between <|im_end|> and <|vision_start|> there; we do not need them).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Reasoning / answer tags: single ids, but ordinary (non-special) tokens that decoding keeps.
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
OPTION_LETTERS = "ABCDEFGH"

# Qwen2-VL's chat template rules, written out readably: a default system turn when the first
# message is not a system one; "<|im_start|>{role}\n{content}<|im_end|>\n" per message; an image
# as <|vision_start|><|image_pad|><|vision_end|>, a video as <|vision_start|><|video_pad|><|vision_end|>
# ("Picture N: " / "Video N: " before them with add_vision_id); "<|im_start|>assistant\n" with
# add_generation_prompt. The processor expands each pad token to one per merged vision token.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}\n"
    "{%- set video_count = namespace(value=0) -%}\n"
    "{%- for message in messages -%}\n"
    "  {%- if loop.first and message['role'] != 'system' -%}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}\n"
    "  {%- endif -%}\n"
    "  {{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
    "  {%- if message['content'] is string -%}\n"
    "    {{- message['content'] + '<|im_end|>\\n' -}}\n"
    "  {%- else -%}\n"
    "    {%- for content in message['content'] -%}\n"
    "      {%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}\n"
    "        {%- set image_count.value = image_count.value + 1 -%}\n"
    "        {%- if add_vision_id -%}{{- 'Picture ' ~ image_count.value ~ ': ' -}}{%- endif -%}\n"
    "        {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}\n"
    "      {%- elif content['type'] == 'video' or 'video' in content -%}\n"
    "        {%- set video_count.value = video_count.value + 1 -%}\n"
    "        {%- if add_vision_id -%}{{- 'Video ' ~ video_count.value ~ ': ' -}}{%- endif -%}\n"
    "        {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}\n"
    "      {%- elif 'text' in content -%}\n"
    "        {{- content['text'] -}}\n"
    "      {%- endif -%}\n"
    "    {%- endfor -%}\n"
    "    {{- '<|im_end|>\\n' -}}\n"
    "  {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)

MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
WINDOW_SIZE = 112


def tokenizer_corpus() -> list[str]:
    """Every string the tokenizer is trained on: the Video-R1 templates, their pieces, and the
    synthetic generator's questions, options, reasoning and answers (videor1.synthetic.text_corpus)."""
    from videor1.prompts import QUESTION_TEMPLATE, TYPE_TEMPLATE
    from videor1.synthetic import text_corpus

    corpus = [QUESTION_TEMPLATE.replace("{Question}", ""), *TYPE_TEMPLATE.values(), "Options:\n"]
    corpus += [f"{letter}. " for letter in OPTION_LETTERS] + [f"<answer>{letter}</answer>" for letter in OPTION_LETTERS]
    corpus += [str(d) for d in range(10)] + ["You are a helpful assistant.", "system\n", "user\n", "assistant\n"]
    corpus += list(text_corpus())
    return corpus


def train_tokenizer(corpus: list[str], vocab_size: int):
    """A Qwen2Tokenizer whose byte-level BPE is trained on `corpus`.

    vocab_size: the BPE vocabulary (256 byte symbols + merges) before the 8 special and 4 tag tokens;
    the trainer stops early when the corpus has no more pairs to merge.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    if vocab_size < 257:
        raise ValueError(f"vocab_size must exceed the 256 byte symbols, got {vocab_size}")
    # The pipeline Qwen2Tokenizer rebuilds on load: merges must be learnt on the same pieces.
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # Special and tag tokens become added tokens; cut them out so no merges are spent on their pieces.
    cut = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + TAG_TOKENS))
    pieces = [piece for text in corpus for piece in cut.split(text) if piece]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(pieces, trainer=trainer)
    vocab = bpe.get_vocab()
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]  # [["Ġ", "t"], ...]
    # Special then tag tokens take the next ids in a fixed order (added tokens already in the vocab keep their id).
    for token in SPECIAL_TOKENS + TAG_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    tokenizer.model_max_length = 32768
    for token in SPECIAL_TOKENS + TAG_TOKENS:  # the fixed order above must have survived
        got = tokenizer.convert_tokens_to_ids(token)
        if got != vocab[token]:
            raise RuntimeError(f"tokenizer: {token} got id {got}, not {vocab[token]}")
    return tokenizer


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) in Qwen's 2:3:3 ratio."""
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


DEFAULT_SIZES = dict(
    hidden=64,  # text hidden size, = vision out_hidden_size
    layers=2,  # text decoder layers
    heads=2,  # head_dim 32: the smallest vLLM's CPU attention serves
    kv_heads=2,
    intermediate=256,  # text MLP
    vision_hidden=64,
    vision_depth=2,
    vision_heads=4,
    vision_intermediate=128,  # vision MLP (Qwen: 3420 for hidden 1280)
    tokens_per_second=2,  # M-RoPE time positions per second of video (Qwen's 2; the demo builds 8)
)



def check_sizes(sizes: dict) -> None:
    """Raise ValueError naming the size that cannot make a working Qwen2.5-VL (unknown names too)."""
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise ValueError(f"unknown size argument(s): {sorted(unknown)}; known: {sorted(DEFAULT_SIZES)}")
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    s = {**DEFAULT_SIZES, **sizes}
    if s["hidden"] % s["heads"]:
        raise ValueError(f"hidden ({s['hidden']}) must be divisible by heads ({s['heads']})")
    if s["heads"] % s["kv_heads"]:
        raise ValueError(f"heads ({s['heads']}) must be divisible by kv_heads ({s['kv_heads']})")
    head_dim = s["hidden"] // s["heads"]
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim = hidden / heads = {head_dim} must be even and >= 6 (3 mrope sections)")
    if s["vision_hidden"] % s["vision_heads"] or (s["vision_hidden"] // s["vision_heads"]) % 4:
        raise ValueError(
            f"vision head_dim = vision_hidden / vision_heads = {s['vision_hidden'] / s['vision_heads']} must be "
            "a multiple of 4 (2-d rotary over height and width)"
        )


def tiny_config(tokenizer, **sizes):
    """A Qwen2_5_VLConfig of the given sizes (DEFAULT_SIZES otherwise) whose token ids match `tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    check_sizes(sizes)
    s = {**DEFAULT_SIZES, **sizes}
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": mrope_section(s["hidden"] // s["heads"]),
        },
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = dict(
        depth=s["vision_depth"],
        hidden_size=s["vision_hidden"],
        intermediate_size=s["vision_intermediate"],
        num_heads=s["vision_heads"],
        hidden_act="silu",
        in_channels=3,
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        tokens_per_second=s["tokens_per_second"],
        window_size=WINDOW_SIZE,
        out_hidden_size=s["hidden"],  # merged vision tokens replace the pad tokens' embeddings
        fullatt_block_indexes=[s["vision_depth"] - 1],
    )
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )


def tiny_processor(tokenizer):
    """A Qwen2_5_VLProcessor for small frames: our tokenizer, the chat template, 56^2..112^2 pixels."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    sizes = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH_SIZE,
                 temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE)  # fmt: skip
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes, cap_pixels_per_frame=False),
        chat_template=CHAT_TEMPLATE,
    )


def lecun_init_(model) -> None:
    """Redraw every Linear / Conv3d weight as N(0, 1 / fan_in) (biases, norms, embeddings unchanged).

    Qwen2.5-VL's init (N(0, 0.02)) suits hidden 3584; at hidden 64 it makes attention nearly
    uniform and every layer a near-identity, and the tiny model then never learned to read the video:
    SFT on motion direction stayed at chance for 4000 steps (ordered = shuffled), while with this
    init the same run reached 98% held-out on ordered frames and chance on shuffled ones by step 2000
    (docs/demo.md).
    """
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv3d)):
                module.weight.normal_(0.0, module.weight[0].numel() ** -0.5)


def build_tiny_checkpoint(
    out_dir: str, seed: int = 0, vocab_size: int = 1024, overwrite: bool = False, **sizes: int
) -> str:
    """Write a randomly initialised Qwen2_5_VLForConditionalGeneration checkpoint directory; return it.

    sizes: any of DEFAULT_SIZES (hidden, layers, heads, kv_heads, intermediate, vision_hidden,
    vision_depth, vision_heads, vision_intermediate, tokens_per_second). vocab_size: the BPE size before the 12 added
    tokens (the trainer may stop short of it). The weights (float32 safetensors) depend only on `seed`
    and the sizes, the tokenizer only on the corpus and `vocab_size`: a rebuild is byte-identical.
    A non-empty `out_dir` is an error unless `overwrite` (which writes over our files, deleting nothing).
    """
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 256:
        raise ValueError(f"vocab_size must be an integer above the 256 byte symbols, got {vocab_size!r}")
    check_sizes(sizes)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir exists and is not a directory: {out_dir}")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"out_dir is not empty: {out_dir} (pass overwrite=True / --overwrite)")

    tokenizer = train_tokenizer(tokenizer_corpus(), vocab_size)
    config = tiny_config(tokenizer, **sizes)
    # Initialise under a private generator state so the weights depend on the seed alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
        lecun_init_(model)
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    # As Qwen2.5-VL-Instruct: stop on <|im_end|> or <|endoftext|>, pad with <|endoftext|>.
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tiny_processor(tokenizer).save_pretrained(out_dir)
    return out_dir


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m videor1.tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    for name, default in DEFAULT_SIZES.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary before the 12 added tokens")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    t0 = time.perf_counter()
    kwargs = {k: v for k, v in vars(args).items() if k != "out"}
    try:
        out = build_tiny_checkpoint(args.out, **kwargs)
    except ValueError as e:
        raise SystemExit(f"videor1.tiny: error: {e}") from None
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    print(f"wrote {out}: {n_params} parameters in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
