"""CoT SFT: label masking on a hand-checked example, collation, and 2-rank runs on both engines."""

import json
import os
import subprocess
import sys

import pytest
import torch

from videor1.config import Config
from videor1.rollout import prepare_prompt
from videor1.sft import collate, sft_example

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = os.path.join(REPO, "videor1", "sft.py")


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def video_prompt(processor, synth_data):
    with open(synth_data) as f:
        row = next(r for r in json.load(f) if r["data_type"] == "video")
    cfg = Config().data
    cfg.fps, cfg.video_min_pixels, cfg.video_max_pixels = 8.0, 3136, 12544
    return prepare_prompt(row, processor, cfg, os.path.dirname(synth_data), shuffled=False)


def test_assistant_only_labels_cover_exactly_the_assistant_turn(processor, video_prompt):
    tok = processor.tokenizer
    ex = sft_example(video_prompt, tok, "assistant")
    ids, label = ex["input_ids"], ex["label_mask"]
    n_prompt = video_prompt.input_ids.numel()
    assert torch.equal(ids[:n_prompt], video_prompt.input_ids)
    assert label[:n_prompt].sum() == 0 and bool(label[n_prompt:].all())
    # Hand check: the labelled text is the row's reasoning, a newline, the answer, then <|im_end|>.
    row = video_prompt.row
    assert tok.decode(ids[label.bool()]) == row["process"] + "\n" + row["solution"] + "<|im_end|>"
    # The prompt ends with the generation prompt, so the model learns to answer after it.
    assert tok.decode(ids[:n_prompt]).endswith("<|im_start|>assistant\n")


def test_all_but_vision_trains_on_all_but_both_vision_placeholders(processor, video_prompt):
    tok = processor.tokenizer
    ex = sft_example(video_prompt, tok, "all_but_vision")
    ids, label = ex["input_ids"], ex["label_mask"]
    video_pad = tok.convert_tokens_to_ids("<|video_pad|>")
    grid = video_prompt.vision["video_grid_thw"][0]
    assert int((ids == video_pad).sum()) == int(grid.prod()) // 4
    assert torch.equal(label.bool(), ids != video_pad)
    assert tok.decode(ids[:3]).startswith("<|im_start|>system")  # the system prompt is trained on too


def test_video_r1_mode_masks_exactly_what_video_r1_masks(processor, video_prompt, synth_data):
    """Video-R1's sft_video.py collate_fn, transcribed: labels = input_ids; pad -> -100; then for a
    processor that is not a Qwen2VLProcessor (Qwen2_5_VLProcessor is not) only processor.image_token."""
    from transformers import Qwen2VLProcessor

    tok = processor.tokenizer
    assert not isinstance(processor, Qwen2VLProcessor)  # the branch Video-R1's Qwen2.5-VL runs take
    visual_tokens = ([151652, 151653, 151656] if isinstance(processor, Qwen2VLProcessor)
                     else [tok.convert_tokens_to_ids(processor.image_token)])
    image_pad, video_pad = (tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>"))
    assert visual_tokens == [image_pad]

    with open(synth_data) as f:
        image_row = next(r for r in json.load(f) if r["data_type"] == "image")
    cfg = Config().data
    cfg.image_min_pixels, cfg.image_max_pixels = 3136, 12544
    image_prompt = prepare_prompt(image_row, processor, cfg, os.path.dirname(synth_data), shuffled=False)
    for prompt in (video_prompt, image_prompt):
        ex = sft_example(prompt, tok, "video_r1")
        ids, label = ex["input_ids"], ex["label_mask"]
        want = ids.clone()
        want[want == tok.pad_token_id] = -100
        for v in visual_tokens:
            want[want == v] = -100
        assert torch.equal(label.bool(), want != -100)
    # Hand check on the video: every token is labelled, <|video_pad|> and the vision delimiters included.
    ex = sft_example(video_prompt, tok, "video_r1")
    assert bool(ex["label_mask"].all())
    assert int((ex["input_ids"] == video_pad).sum()) > 0
    for t in ("<|vision_start|>", "<|vision_end|>"):
        assert int((ex["input_ids"] == tok.convert_tokens_to_ids(t)).sum()) == 1
    # ... and on the image: exactly the <|image_pad|> run is masked.
    ex = sft_example(image_prompt, tok, "video_r1")
    grid = image_prompt.vision["image_grid_thw"][0]
    assert int((ex["label_mask"] == 0).sum()) == int(grid.prod()) // 4 == int((ex["input_ids"] == image_pad).sum())
    with pytest.raises(ValueError, match="loss_on"):
        sft_example(video_prompt, tok, "everything")


def test_collate_pads_right_and_masks_padding(processor, video_prompt):
    tok = processor.tokenizer
    a = sft_example(video_prompt, tok, "assistant")
    b = dict(a, input_ids=a["input_ids"][:-5], label_mask=a["label_mask"][:-5])
    inputs, labels = collate([a, b], pad_id=tok.pad_token_id)
    n = a["input_ids"].numel()
    assert inputs["input_ids"].shape == (2, n)
    assert inputs["attention_mask"][1, -5:].sum() == 0 and labels[1, -5:].sum() == 0
    assert inputs["pixel_values_videos"].shape[0] == 2 * video_prompt.vision["pixel_values_videos"].shape[0]
    assert inputs["video_grid_thw"].shape == (2, 3) and inputs["second_per_grid_ts"].shape == (2,)


@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_two_rank_sft_learns_and_writes_hf_checkpoint(engine, tiny_ckpt, synth_data, tmp_path):
    out = tmp_path / engine
    args = ["--config", os.path.join(REPO, "configs", "tiny_cpu.yaml"), "--model.path", tiny_ckpt,
            "--data.train_file", synth_data, "--train.output_dir", str(out), "--train.engine", engine,
            "--train.max_steps", "6", "--train.per_device_batch_size", "4", "--optim.lr", "0.005",
            "--optim.warmup_ratio", "0", "--optim.scheduler", "constant", "--train.save_steps", "3",
            "--data.cache_media", "true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_BUILD_OPS": "0",
           "TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".venv", "torch_extensions")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SFT, *args],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-5000:]
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["loss"] < rows[0]["loss"]  # cross-entropy goes down on repeated data
    assert all(r["grad_norm"] > 0 and not r["step_skipped"] for r in rows)
    assert os.path.isfile(out / "checkpoint-3" / "trainer_state.json")
    from transformers import AutoModelForImageTextToText

    final = AutoModelForImageTextToText.from_pretrained(out / "final")
    start = AutoModelForImageTextToText.from_pretrained(tiny_ckpt)
    assert not torch.equal(final.lm_head.weight, start.lm_head.weight)
