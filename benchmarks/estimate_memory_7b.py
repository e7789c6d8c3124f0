"""Analytic per-GPU memory estimate of a T-GRPO step for Qwen2.5-VL-7B (an estimate, not a measurement).

    python benchmarks/estimate_memory_7b.py [--config configs/qwen25vl_7b_tgrpo_8gpu.yaml] [--gpus 8]

Counts the terms that dominate, from the model's published dimensions and our config: FSDP2-sharded
fp32 master weights, gradients and AdamW moments; the bf16 reference model (sharded); the rollout
phase (full bf16 weights gathered once + KV cache of the G ordered and G/2 shuffled sequences of one
prompt); the training phase (checkpointed layer inputs of one prompt group, one layer's recompute, the
fused loss's vocabulary chunk). Prompt groups run one after another, so activations do not grow with
the per-device batch; only the stored rollouts do. Compared with Video-R1's path, which materialises
fp32 logits (and a log_softmax copy) for every position of the prompt, video and completion.
Framework overhead (CUDA context, allocator fragmentation) is covered by a flat 4 GB margin.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from videor1.config import load_config  # noqa: E402
from videor1.vision import smart_resize  # noqa: E402

# Qwen2.5-VL-7B-Instruct config.json (public): text and vision towers.
QWEN25VL_7B = dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064,
                   v_depth=32, v_hidden=1280, v_intermediate=3420, v_out=3584, patch=14, temporal_patch=2, merge=2)
GB = 1e9


def param_count(m: dict) -> tuple[float, float]:
    """(text params, vision params)."""
    head_dim = m["hidden"] // m["heads"]
    attn = m["hidden"] * (m["heads"] * head_dim) * 2 + m["hidden"] * (m["kv_heads"] * head_dim) * 2
    mlp = 3 * m["hidden"] * m["intermediate"]
    text = m["layers"] * (attn + mlp) + 2 * m["vocab"] * m["hidden"]  # embeddings + untied lm_head
    v_block = 4 * m["v_hidden"] ** 2 + 3 * m["v_hidden"] * m["v_intermediate"]
    patch_in = 3 * m["temporal_patch"] * m["patch"] ** 2 * m["v_hidden"]
    merger = (m["v_hidden"] * m["merge"] ** 2) ** 2 + m["v_hidden"] * m["merge"] ** 2 * m["v_out"]
    return text, m["v_depth"] * v_block + patch_in + merger


def estimate(cfg, gpus: int, m: dict = QWEN25VL_7B, prompt_text_tokens: int = 250) -> dict:
    text_p, vis_p = param_count(m)
    n = text_p + vis_p
    frames = cfg.data.max_frames
    from videor1.rollout import video_pixel_bounds

    lo, hi = video_pixel_bounds(cfg.data, frames)  # data.video_pixels' rule (qwen-vl-utils' or fixed)
    h, w = smart_resize(720, 1280, factor=28, min_pixels=lo, max_pixels=hi)
    video_tokens = (frames // 2) * (h // 28) * (w // 28)
    C = cfg.rollout.max_completion_length
    seq = prompt_text_tokens + video_tokens + C
    G = cfg.rollout.num_generations
    Gs = G // 2 if cfg.rollout.num_shuffled < 0 else cfg.rollout.num_shuffled
    head_dim = m["hidden"] // m["heads"]
    kv_per_token = 2 * m["layers"] * m["kv_heads"] * head_dim * 2  # K and V, bf16

    states = {
        "fp32 master weights (sharded)": 4 * n / gpus,
        "fp32 gradients (sharded)": 4 * n / gpus,
        "AdamW moments (sharded)": 8 * n / gpus,
        "bf16 reference model (sharded)": 2 * n / gpus if cfg.algo.beta > 0 else 0.0,
    }
    patches = (frames // 2) * (h // 14) * (w // 14)  # vision-tower tokens of one video
    rollout = {
        "full bf16 weights, gathered once": 2 * n,
        "KV cache, G ordered sequences": G * seq * kv_per_token,
        "vision tower, one block live (prefill, no grad)": patches * (4 * m["v_hidden"] + 2 * m["v_intermediate"]) * 2,
    }
    tokens = G * seq
    chunk = min(G * C, (1 << 30) // (m["vocab"] * 4 + m["hidden"] * 6))  # kernels.linear_grpo_loss, bf16 on CUDA
    train = {
        "checkpointed layer inputs (bf16)": m["layers"] * tokens * m["hidden"] * 2,
        "checkpointed vision block inputs, G copies": m["v_depth"] * G * patches * m["v_hidden"] * 2,
        "one layer's recompute (attention + MLP)": tokens * (4 * m["hidden"] + 3 * m["intermediate"]) * 2,
        "one gathered bf16 layer + prefetch": 2 * 2 * (text_p / m["layers"]),
        "fused loss vocabulary chunk": chunk * (m["vocab"] * 4 + m["hidden"] * 6),
        "completion hidden states + grads": 2 * G * C * m["hidden"] * 2,
    }
    rollout_peak, train_peak = sum(rollout.values()), sum(train.values())
    margin = 4 * GB
    total = sum(states.values()) + max(rollout_peak, train_peak) + margin
    video_r1_logits = 2 * G * seq * m["vocab"] * 4  # fp32 logits over every position + log_softmax copy
    return dict(params=n, text_params=text_p, vision_params=vis_p, frame_hw=(h, w), video_tokens=video_tokens,
                seq=seq, states=states, rollout=rollout, train=train, margin=margin, total=total,
                video_r1_logits=video_r1_logits)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/qwen25vl_7b_tgrpo_8gpu.yaml")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    e = estimate(cfg, args.gpus)
    print(f"Qwen2.5-VL-7B: {e['params'] / 1e9:.2f} B parameters ({e['text_params'] / 1e9:.2f} B text, "
          f"{e['vision_params'] / 1e9:.2f} B vision); {args.gpus} GPUs, FSDP2, bf16 compute")
    print(f"video: {cfg.data.max_frames} frames at {e['frame_hw'][0]}x{e['frame_hw'][1]} -> {e['video_tokens']} tokens; "
          f"sequence ~{e['seq']} tokens; G={cfg.rollout.num_generations}, completions {cfg.rollout.max_completion_length}")
    for title, part in (("persistent", e["states"]), ("rollout phase", e["rollout"]), ("training phase", e["train"])):
        print(f"\n{title}:")
        for k, v in part.items():
            print(f"  {k:<45} {v / GB:7.2f} GB")
    print(f"\nestimated peak per GPU: {e['total'] / GB:.1f} GB of {args.gpu_gb:.0f} GB "
          f"(persistent + max(rollout, training) + {e['margin'] / GB:.0f} GB margin)")
    print(f"per-device batch: prompt groups run one at a time, so batch 2 adds only its stored rollouts "
          f"(~{2 * cfg.rollout.num_generations * e['seq'] * 8 / 1e6:.1f} MB of ids)")
    print(f"for comparison, Video-R1's full-sequence fp32 logits + log_softmax for one group: "
          f"{e['video_r1_logits'] / GB:.1f} GB")
    return e


if __name__ == "__main__":
    main()
