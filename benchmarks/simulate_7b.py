"""7B on 8 GPUs, simulated: the memory and FLOPs of one real T-GRPO step of Qwen2.5-VL-7B, without GPUs.

    python benchmarks/simulate_7b.py                 # the table in the README (a few minutes on 2 cores)
    python benchmarks/simulate_7b.py --layers 2 --vision-depth 2 --json out.json   # what the test runs
    python benchmarks/simulate_7b.py --style ours --shared-prefix off              # only the repeated forward

What runs. The real Qwen2.5-VL-7B architecture (transformers' modules, built from a config.json this
script writes from the published dimensions: QWEN25VL_7B below; no weights) under torch's
FakeTensorMode (tensors with shapes and no data), FSDP2 over a fake world of 8 ranks (a fake process
group: collectives are no-ops with the right output shapes) and our own code: videor1.policy.PolicyModule,
videor1.engine.build_engine (FSDP2, bf16 mixed precision, activation checkpointing, the 7B config's
AdamW), kernels.linear_grpo_loss on its torch path, the frozen bf16 reference engine. One rank's
steady-state step (the second: the first creates AdamW's moments) at configs/qwen25vl_7b_tgrpo_8gpu.yaml's
shapes: per-device batch 2 prompts, each a 16-frame video at 128*28*28 pixels (960 video tokens) and
~100 text tokens, G = 8 ordered rollouts (the 4 shuffled ones are a second, smaller generate call),
768-token completions. Phases, in the trainer's order:
  rollout    engine.full_weights() (every weight gathered once), then per prompt the prefill into a
             KV cache preallocated for prompt + completion, and one decode step of the G sequences
  reference  the reference engine's log-probs of every group (forward, no grad)
  policy     forward + backward of every group through the fused loss (one group at a time)
  optimizer  gradient clipping and AdamW
Our style runs in the trainer's two forms (train.shared_prefix; --shared-prefix on|off|both, both by
default), reported as two styles:
  "ours"           shared prefix (the default): the reference and policy phases feed one packed sequence
                   per prompt group, [prompt; c1; ...; cG] (input_ids [1, P + G*C], the one video's
                   vision kwargs once, a PrefixLayout: videor1.forward.shared_prefix.pack), through
                   videor1.forward.attention's shared-prefix attention (install(hf) on top of sim_flash);
                   the rollout prefills the prompt's first P - 1 tokens once (batch 1, the vision tower
                   once), repeats that cache to G rows (expand_cache) and its decode step feeds the
                   prompt's last token to the G rows, as videor1.rollout.generate does with
                   videor1.policy.prefill_cache.
  "ours_repeated"  train.shared_prefix: false: G sequences [prompt; c_i] of P + C tokens (the video G
                   times) in every phase; the rollout prefills the G sequences' P tokens and its decode
                   step feeds the first completion token.
torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker records every allocation by category
(sharded / unsharded parameters, gradients, optimiser state, activations, temporaries, all-gather and
reduce-scatter buffers, inputs); the peak of each phase is reported with its categories, which add
up to the total. The frozen reference's sharded bf16 weights, which the tracker does not see (a second
FSDP2 model), are added from their exact sizes as their own category. The byte counts are what a GPU
would hold for these tensors; the CUDA context, NCCL buffers and the caching allocator's fragmentation
are not tensors and are not in them (a flat margin, --margin-gb, is added for the fit).
torch.utils.flop_counter.FlopCounterMode counts each phase's FLOPs in a second pass under the same
fake tensors (beside the tracker it would keep tensors alive longer). --fit adds the longest
completion that fits (see fit()). Each style runs in its own process.

What is not run as on a GPU, and why (patched inside this script only):
  - attention: transformers' SDPA path for the vision tower splits by cu_seqlens.tolist() (data), so
    attention is registered as "sim_flash" (transformers' AttentionInterface): FlashAttention's own op
    (aten._scaled_dot_product_flash_attention: O(sequence) memory, as flash-attn varlen on a GPU);
    causal in the decoder; in the vision tower one call in the memory pass (varlen flash attention
    holds only its output and log-sum-exp) and per window in the FLOP pass (windows of one length
    batched), with the window lengths computed from the real grid.
  - Qwen2_5_VLModel.get_video_features reads the grid with .tolist(): here it splits by sizes computed
    from the real grid. TRANSFORMERS_DISABLE_TORCH_CHECK=1 skips the placeholder-count check (data);
    the script checks the same count on the real ids before it enters fake mode.
  - the vision tower's cu_seqlens, position ids and window index, and the M-RoPE position ids
    (videor1.mrope.rope_index), are computed from small real tensors (grids, ids) and passed in.
  - the rollout is not HF generate (its stopping test reads data): the prefill and one decode step
    into a StaticCache sized for the whole completion, per prompt, through FSDP2's root (a method
    registered as the engine registers generate); the FLOPs of the remaining decode steps are the
    decode step's times the completion length (decode is bandwidth-bound: no MFU time estimate).
    With the shared prefix the prefill is not videor1.policy.prefill_cache itself (a DynamicCache,
    which would hold only the prompt's keys at the measured point, and positions computed from the
    ids inside the model: data): the same batch-1 prefill of P - 1 tokens into the StaticCache, then
    expand_cache repeats every layer's keys and values to G rows (repeat_interleave along the batch,
    DynamicLayer.batch_repeat_interleave's rule; a StaticLayer has no such method).
  - the shared-prefix attention's two passes (videor1.forward.attention.two_pass_attention, run as is)
    call the module-level causal_attention, patched to sim_causal_attention: FlashAttention's op with
    its causal flag (on CUDA lower-right aligned when the queries are fewer than the keys, as the
    completion blocks' pass over [prompt; own keys] needs; O(sequence) memory). torch's CPU SDPA with
    causal_lower_right would materialise a [G, heads, C, P + C] mask that the tracker would count and
    a GPU never holds. GQA as in sim_flash: the flash op's meta function and the FLOP counter take key
    and value with fewer heads (4 against 28), so no head is repeated.
  - videor1.forward.shared_prefix.packed_position_ids (the packed sequence's M-RoPE positions) reads
    the token types and the grid on the host (rope_index: .tolist(), data), which fails on fake
    tensors (a real tensor that meets an op in fake mode comes out fake). It is patched to return the
    positions the real function computed on the real ids and grid before fake mode (looked up by the
    group's PrefixLayout; checked there against the repeated sequences' positions: the prompt's and
    every completion's are theirs exactly).
  - every completion token is counted (fake masks have no data): an upper bound of the work. The FLOP
    counter counts an attention call's full query x key rectangle, causal or not (both forms alike).
  - the optimiser step runs the engine's AdamW (videor1.engine._adamw) on each rank's local shards,
    with clip_grad_norm_ on the local gradients: on DTensors under fake tensors, DTensor's shape
    propagation allocates global-size temporaries that the tracker counts (measured on a toy FSDP2
    model: ~8x the shard for clipping, ~14x for AdamW), which a GPU does not.
  - Video-R1's way (--style video_r1): its _get_per_token_logps (fp32 logits at every position, a
    log_softmax per sequence) through the FSDP2 root, per-device batch 1, the loss in torch.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"  # the placeholder-count check reads data (see above)

import torch  # noqa: E402

GiB = 1 << 30
GB = 1e9

# Qwen2.5-VL-7B-Instruct's published dimensions (its config.json on the hub), as a config.json.
QWEN25VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "tie_word_embeddings": False, "dtype": "float32",
    "text_config": {
        "model_type": "qwen2_5_vl_text", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu",
        "max_position_embeddings": 128000, "rms_norm_eps": 1e-06, "use_sliding_window": False,
        "sliding_window": 32768, "max_window_layers": 28, "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": False,
    },
    "vision_config": {
        "model_type": "qwen2_5_vl", "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "hidden_act": "silu", "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "tokens_per_second": 2, "window_size": 112, "out_hidden_size": 3584,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
}
PROMPT_TEXT_TOKENS = 100  # template + question + options around the video (Video-R1's prompts: ~60-150)
H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM dense bf16 (NVIDIA's datasheet)
SIMULATION_NOTES = {
    "deepspeed_zero3": "simulated by benchmarks/simulate_7b_zero3.py (DeepSpeed's own ZeRO-3 code under the same "
                       "fake tensors; its docstring lists its shims)",
}


def write_config(path: str, layers: int, vision_depth: int) -> str:
    """config.json of Qwen2.5-VL-7B (depths overridable for the test) in directory `path`."""
    cfg = json.loads(json.dumps(QWEN25VL_7B))
    cfg["text_config"]["num_hidden_layers"] = layers
    cfg["text_config"]["max_window_layers"] = layers
    cfg["vision_config"]["depth"] = vision_depth
    full = [i for i in QWEN25VL_7B["vision_config"]["fullatt_block_indexes"] if i < vision_depth]
    cfg["vision_config"]["fullatt_block_indexes"] = full or [vision_depth - 1]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
    return path


# ---- the patches (this script only; see the module docstring) ----------------------------------------------

SEGMENTS: dict[int, list[int]] = {}  # id(cu_seqlens fake tensor) -> its segment lengths (from the real grid)
VIDEO_SPLITS: list[int] = []


COUNTING_FLOPS = [False]  # set by FlopMeter: the vision tower's attention per window (FLOPs) or in one call


def sim_flash(module, q, k, v, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """FlashAttention's op on [B, heads, s, d] q and [B, kv_heads, s, d] k/v: causal in the decoder, per
    window or frame (cu_seq_lens_q) in the vision tower. Returns ([B, s, heads, d], None) as transformers
    wants. Varlen flash attention holds only its output and log-sum-exp whatever the windows, so the
    memory pass makes one call over the whole vision sequence; the FLOP pass computes every window
    (windows of one length batched into one call) so that the count is sum(window^2), not sequence^2."""
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    cu = kwargs.get("cu_seq_lens_q")
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    if cu is not None and COUNTING_FLOPS[0]:
        lengths = SEGMENTS[id(cu)]
        out = torch.empty_like(q)
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        for length in sorted(set(lengths)):
            picked = [st for st, n in zip(starts, lengths) if n == length]
            idx = torch.tensor([st + i for st in picked for i in range(length)])
            parts = [t.index_select(2, idx).reshape(t.shape[1], len(picked), length, t.shape[3]).transpose(0, 1)
                     for t in (q, k, v)]
            o = flash(*parts, 0.0, False, False, scale=scaling)[0]  # [windows, heads, length, d]
            out.index_copy_(2, idx, o.transpose(0, 1).reshape(1, q.shape[1], len(picked) * length, q.shape[3]))
    elif cu is not None:
        out = flash(q, k, v, 0.0, False, False, scale=scaling)[0]
    else:
        out = flash(q, k, v, 0.0, bool(causal) and q.shape[2] > 1, False, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def sim_causal_attention(query, key, value, scaling, dropout):
    """videor1.forward.attention.causal_attention in the simulation: FlashAttention's op with its causal
    flag (lower-right aligned on CUDA when q is shorter than k; O(sequence) memory). query [N, H, q, d],
    key / value [N, Hkv, k, d] (GQA: the op's meta function and the FLOP counter take fewer kv heads)."""
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout, True, False,
                                                              scale=scaling)[0]


PACKED_POSITIONS: dict = {}  # PrefixLayout -> int64 [3, 1, P + G*C], computed by the real function before fake mode
_REAL = {}  # the patched functions' originals


def sim_packed_position_ids(model_config, inputs: dict) -> torch.Tensor:
    """videor1.forward.shared_prefix.packed_position_ids in fake mode: the positions the real function
    computed on the real ids (prepare_shared), by the group's PrefixLayout."""
    from videor1.forward.shared_prefix import LAYOUT_KEY

    return PACKED_POSITIONS[inputs[LAYOUT_KEY]]


def install_patches():
    from transformers import AttentionInterface
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qm
    from transformers.utils.generic import accepts_precomputed_kwargs

    from videor1.forward import attention, shared_prefix

    AttentionInterface.register("sim_flash", sim_flash)
    _REAL.setdefault("packed_position_ids", shared_prefix.packed_position_ids)
    shared_prefix.packed_position_ids = sim_packed_position_ids
    attention.causal_attention = sim_causal_attention

    def get_video_features(self, pixel_values_videos, video_grid_thw=None, **kwargs):
        out = self.visual(pixel_values_videos.type(self.visual.dtype), grid_thw=video_grid_thw, **kwargs)
        out.pooler_output = torch.split(out.pooler_output, VIDEO_SPLITS)
        return out

    qm.Qwen2_5_VLModel.get_video_features = accepts_precomputed_kwargs(modality="video")(get_video_features)


def use_sim_attention(model) -> None:
    for c in {id(c): c for c in [model.config, model.config.text_config, model.config.vision_config]
              + [m.config for m in model.modules() if hasattr(m, "config")]}.values():
        c._attn_implementation = "sim_flash"


# ---- the inputs: computed from small real tensors, outside fake mode ----------------------------------------

def group_inputs(hf_config, data_cfg, n: int, completion_len: int) -> dict:
    """Real tensors for n sequences of one prompt: ids [n, P + C], mm types, M-RoPE positions, the vision
    tower's precomputed indices; and the Python numbers the patches need."""
    from transformers import vision_utils as vu

    from videor1 import mrope
    from videor1.rollout import video_pixel_bounds
    from videor1.vision import smart_resize

    frames = data_cfg.max_frames
    lo, hi = video_pixel_bounds(data_cfg, frames)
    h, w = smart_resize(720, 1280, factor=28, min_pixels=lo, max_pixels=hi)
    grid = torch.tensor([[frames // 2, h // 14, w // 14]])
    video_tokens = int(grid.prod()) // 4
    P = PROMPT_TEXT_TOKENS + video_tokens + 2
    ids = torch.full((n, P + completion_len), 1000, dtype=torch.long)
    start = PROMPT_TEXT_TOKENS // 2
    ids[:, start] = hf_config.vision_start_token_id
    ids[:, start + 1: start + 1 + video_tokens] = hf_config.video_token_id
    ids[:, start + 1 + video_tokens] = hf_config.vision_end_token_id
    assert int((ids == hf_config.video_token_id).sum()) == n * video_tokens  # the check skipped in fake mode
    grids = grid.repeat(n, 1)
    types = (ids == hf_config.video_token_id).long() * 2
    sec = torch.full((n,), 2.0 / data_cfg.fps)
    pos, _ = mrope.rope_index(ids, types, video_grid_thw=grids, second_per_grid_ts=sec)
    vc = hf_config.vision_config
    cu, _ = vu.get_vision_attention_seqlens(grids, vc)
    win, cu_win = vu.get_vision_window_index(grids, vc.spatial_merge_size, vc.window_size, vc.patch_size)
    seg, seg_win = (cu[1:] - cu[:-1]).tolist(), (cu_win[1:] - cu_win[:-1]).tolist()
    return dict(ids=ids, types=types, pos=pos, grids=grids, sec=sec, cu=cu, cu_win=cu_win, win=win,
                vpos=vu.get_vision_position_ids(grids, vc.spatial_merge_size), seg=seg, seg_win=seg_win,
                patches=int(grids.prod(1).sum()), prompt_len=P, video_tokens=video_tokens, frame_hw=(h, w),
                splits=(grids.prod(-1) // vc.spatial_merge_size ** 2).tolist())


def vision_inputs(mode, g: dict) -> dict:
    """The fake-mode vision kwargs of g's videos (pixel values, grids, the tower's precomputed indices)."""
    cu, cu_win = mode.from_tensor(g["cu"]), mode.from_tensor(g["cu_win"])
    SEGMENTS[id(cu)], SEGMENTS[id(cu_win)] = g["seg"], g["seg_win"]
    VIDEO_SPLITS[:] = g["splits"]
    return {
        "pixel_values_videos": torch.empty(g["patches"], 1176), "video_grid_thw": g["grids"],
        "second_per_grid_ts": g["sec"],
        "video_cu_seqlens": cu, "video_max_seqlen": max(g["seg"]), "video_position_ids": g["vpos"],
        "video_window_index": g["win"], "video_cu_window_seqlens": cu_win, "video_max_window_seqlen": max(g["seg_win"]),
    }


def model_inputs(mode, g: dict, part: slice | None = None) -> dict:
    """The fake-mode model kwargs of a group (the prompt only when part is a slice of positions)."""
    sl = part or slice(None)
    ids = g["ids"][:, sl]
    return {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": g["pos"][:, :, sl],
        "mm_token_type_ids": g["types"][:, sl], **vision_inputs(mode, g),
    }


def packed_inputs(mode, g1: dict, completion_ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """The shared-prefix model kwargs of a group, by the trainer's own videor1.forward.shared_prefix.pack:
    input_ids [1, P + G*C], the one video's vision kwargs (g1: group_inputs for one sequence), the
    PrefixLayout. No position_ids: completion_hidden computes them (sim_packed_position_ids). The
    completions' lengths are given as the trainer gives them (host ints, mask.sum(1)): every completion
    is C tokens long here (fake masks have no data; every completion token is counted), so the layout is
    the unragged one."""
    from videor1.forward import shared_prefix

    P = g1["prompt_len"]
    G, C = completion_ids.shape
    return shared_prefix.pack(g1["ids"][0, :P], vision_inputs(mode, g1), completion_ids, mask, lengths=[C] * G)


def prepare_shared(hf_config, g: dict, g1: dict) -> None:
    """Before fake mode: the packed group's M-RoPE positions by the real packed_position_ids on the real
    ids (for sim_packed_position_ids), checked against the repeated sequences' positions (g): the prompt's
    and every completion's positions are what they are in its own sequence."""
    from videor1.forward import shared_prefix

    P, C, G = g["prompt_len"], g["ids"].shape[1] - g["prompt_len"], g["ids"].shape[0]
    completion_ids = g["ids"][:, P:]
    vision = {"video_grid_thw": g1["grids"], "second_per_grid_ts": g1["sec"]}
    inputs = shared_prefix.pack(g1["ids"][0, :P], vision, completion_ids, torch.ones_like(completion_ids),
                                lengths=[C] * G)
    assert inputs[shared_prefix.LAYOUT_KEY].total_len == P + G * C
    real = _REAL.get("packed_position_ids", shared_prefix.packed_position_ids)
    pos = real(hf_config, inputs)  # [3, 1, P + G*C]
    assert pos.shape == (3, 1, P + G * C)
    assert torch.equal(pos[:, 0, :P], g["pos"][:, 0, :P])
    assert torch.equal(pos[:, 0, P:].unflatten(1, (G, C)), g["pos"][:, :, P:])
    PACKED_POSITIONS[inputs[shared_prefix.LAYOUT_KEY]] = pos


def expand_cache(cache, copies: int) -> None:
    """A batch-1 StaticCache repeated to `copies` rows in place: DynamicLayer.batch_repeat_interleave's
    rule (videor1.policy.prefill_cache) on every StaticLayer (which has no such method)."""
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys = layer.keys.repeat_interleave(copies, dim=0)
            layer.values = layer.values.repeat_interleave(copies, dim=0)
            layer.batch_size = copies


# ---- one step ---------------------------------------------------------------------------------------------

class NullMeter:
    """No metering: the warm-up step that creates AdamW's state, as every step after the first has it."""

    def call(self):
        pass

    @contextlib.contextmanager
    def phase(self, name: str):
        yield


class MemoryMeter:
    """Per-phase peaks (by category) from one FSDPMemTracker over the whole step."""

    def __init__(self, tracker):
        self.tracker = tracker
        self.peaks: dict[str, dict[str, int]] = {}

    def call(self):
        self.tracker.reset_mod_stats()  # per-module stats cover one top-level call (the tracker's rule)

    @contextlib.contextmanager
    def phase(self, name: str):
        t = self.tracker
        t._peak_mem_snap = t.get_tracker_snapshot()  # a phase's peak starts from what is live at its start
        t._peak_mem = {dev: snap["Total"] for dev, snap in t._peak_mem_snap.items()}
        yield
        snap = t.get_tracker_snapshot("peak")
        self.peaks[name] = dict(next(iter(snap.values()))) if snap else {}


class FlopMeter:
    """FLOPs per phase (torch.utils.flop_counter), split into the vision tower and the rest. A separate
    pass: a FlopCounterMode alongside the memory tracker keeps tensors alive longer."""

    def __init__(self):
        self.flops: dict[str, int] = {}
        self.by_tower: dict[str, dict[str, int]] = {}

    def call(self):
        pass

    @contextlib.contextmanager
    def phase(self, name: str):
        from torch.utils.flop_counter import FlopCounterMode

        before, COUNTING_FLOPS[0] = COUNTING_FLOPS[0], True
        try:
            with FlopCounterMode(display=False) as counter:
                yield
        finally:
            COUNTING_FLOPS[0] = before
        total = counter.get_total_flops()
        vis = sum(sum(v.values()) for k, v in counter.get_flop_counts().items() if k.split(".")[-1] == "visual")
        self.flops[name] = total
        self.by_tower[name] = {"vision tower": int(vis), "language model + head": int(total - vis)}


def attach_root_methods(root) -> None:
    """Forwards through the FSDP2 root (FSDP runs its root's hooks first), registered as the engines
    register generate: root.sim_forward(inputs, cache) (a KV-cache forward, as generate's) and
    root.sim_video_r1(inputs, P, C) (Video-R1's per-token log-probs from full-sequence logits)."""
    import types

    from torch.distributed.fsdp import register_fsdp_forward_method

    def sim_forward(self, inputs: dict, cache):
        return self.hf(**inputs, cache=cache, use_cache=True, logits_to_keep=1).logits

    def sim_video_r1(self, inputs: dict, P: int, C: int):
        """Video-R1's _get_per_token_logps: logits at every position (fp32, as transformers 4.49's
        Qwen2.5-VL returned them), a log_softmax per sequence, gathered; then the completion's part."""
        logits = self.hf(**inputs, use_cache=False).logits.float()[:, :-1]
        ids = inputs["input_ids"][:, 1:]
        rows = [row.log_softmax(-1).gather(1, i.unsqueeze(1)).squeeze(1) for row, i in zip(logits, ids)]
        return torch.stack(rows)[:, P - 1:P - 1 + C]

    root.sim_forward = types.MethodType(sim_forward, root)
    register_fsdp_forward_method(root, "sim_forward")
    root.sim_video_r1_forward = types.MethodType(sim_video_r1, root)


def video_r1_call(root, inputs: dict, P: int, C: int):
    """root.sim_video_r1_forward through the root's own __call__ (FSDP's and the tracker's forward hooks,
    which a registered method skips for the tracker), by standing in for forward for one call."""
    root.forward = root.sim_video_r1_forward
    try:
        return root(inputs, P, C)
    finally:
        del root.forward


def run_step(s: dict, meter) -> None:
    """One rank's step, phase by phase, metered (s: the built engines, inputs and settings)."""
    import kernels
    from transformers import StaticCache

    from videor1.train import sampling_mode

    policy, reference, mode, g, cfg = s["policy"], s["reference"], s["mode"], s["g"], s["cfg"]
    P, C, G, batch, style = s["P"], s["C"], s["G"], s["batch"], s["style"]

    # the engine-specific parts (simulate_7b_zero3.py passes its own): a KV-cache forward of the gathered
    # model, and the optimiser step
    forward = s.get("rollout_forward") or (lambda module, inputs, cache: module.sim_forward(inputs, cache))
    optimizer_step = s.get("optimizer_step") or (lambda: local_optimizer_step(s))

    shared = s.get("shared_prefix", False) and style != "video_r1"
    g1 = s.get("g1")  # the one-sequence inputs (shared prefix)

    def rollout_once(module):
        meter.call()
        cache = StaticCache(config=s["hf_config"], max_cache_len=P + C)
        if shared:  # the prompt's first P - 1 tokens once, the cache repeated to G rows (prefill_cache)
            forward(module, model_inputs(mode, g1, slice(0, P - 1)), cache)
            expand_cache(cache, G)
            step = {"input_ids": g1["ids"][:, P - 1:P].expand(G, 1),
                    "position_ids": g1["pos"][:, :, P - 1:P].expand(3, G, 1)}
        else:
            forward(module, model_inputs(mode, g, slice(0, P)), cache)
            step = {"input_ids": g["ids"][:, P:P + 1], "position_ids": g["pos"][:, :, P:P + 1]}
        meter.call()
        with meter.phase("decode step") if isinstance(meter, FlopMeter) else contextlib.nullcontext():
            forward(module, step, cache)

    # rollout: full weights gathered once; per prompt the prefill into a KV cache sized for prompt +
    # completion and one decode step of G rows, in eval mode and without grad as the trainer samples
    with meter.phase("rollout"), torch.no_grad(), policy.full_weights() as module, sampling_mode(module):
        for _ in range(batch):
            rollout_once(module)
    completion_ids = g["ids"][:, P:]
    adv = torch.zeros(G)
    mask = torch.ones(G, C, dtype=torch.long)

    def group():  # one prompt group's model kwargs, in the style's form
        return packed_inputs(mode, g1, completion_ids, mask) if shared else model_inputs(mode, g)
    kw = dict(beta=cfg.algo.beta, eps_low=cfg.algo.eps_low, eps_high=cfg.algo.eps_high, loss_type=cfg.algo.loss_type,
              importance_level=cfg.algo.importance_level, kl_clamp=cfg.algo.kl_clamp, max_completion_length=C)
    ref_logps = []
    with meter.phase("reference"), torch.no_grad():
        for _ in range(batch):
            meter.call()
            if reference is None:
                continue
            if style == "video_r1":
                ref_logps.append(video_r1_call(reference.module, model_inputs(mode, g), P, C))
                reference.module.reshard()
            else:
                ref_logps.append(reference(group(), P, completion_ids, mode="logprobs"))
    with meter.phase("policy"):
        for i in range(batch):
            meter.call()
            ref = ref_logps[i] if ref_logps else None
            if style == "video_r1":
                logp = video_r1_call(policy.module, model_inputs(mode, g), P, C)
                loss, _ = kernels.reference.reference_grpo_from_logprobs(
                    logp, adv, mask, None, ref, beta=kw["beta"], eps_low=kw["eps_low"], eps_high=kw["eps_high"],
                    kl_clamp=kw["kl_clamp"])
            else:
                loss, _ = policy(group(), P, completion_ids, mode="loss", advantages=adv,
                                 completion_mask=mask, loss_kwargs=dict(kw, ref_logprobs=ref))
            policy.backward(loss / batch)
            del loss
    with meter.phase("optimizer"), torch.no_grad():
        meter.call()
        optimizer_step()


def local_optimizer_step(s: dict) -> None:
    """Clip and AdamW on the local shards (see local_optimizer), then zero every gradient."""
    local = s["local_params"]
    for lp, p in zip(local, s["dtensor_params"]):
        lp.grad = p.grad._local_tensor
    torch.nn.utils.clip_grad_norm_(local, s["cfg"].optim.max_grad_norm)
    s["local_optimizer"].step()
    s["local_optimizer"].zero_grad(set_to_none=True)
    s["policy"].optimizer.zero_grad(set_to_none=True)


def local_optimizer(cfg, policy):
    """The engine's AdamW (videor1.engine._adamw: same groups and hyperparameters) on each parameter's
    local shard: what DTensor's elementwise optimiser ops compute on a GPU. (On DTensors under fake
    tensors, DTensor's shape propagation allocates global-size temporaries that FSDPMemTracker counts:
    a simulation artifact, measured on a toy model as ~8x the shard for clip_grad_norm_ and ~14x for AdamW.)"""
    from videor1.engine import _adamw

    params = [p for p in policy.module.parameters() if p.requires_grad]
    local = [p._local_tensor for p in params]
    opt = _adamw(cfg, local)
    for group in opt.param_groups:  # torch's AdamW runs foreach on CUDA tensors (its per-tensor loop on CPU ones)
        group["foreach"] = True
    return params, local, opt


def style_label(style: str, shared_prefix: bool) -> str:
    """The results' name of a run: "ours" (shared prefix), "ours_repeated" (train.shared_prefix: false), "video_r1"."""
    return "ours_repeated" if style == "ours" and not shared_prefix else style


def from_label(label: str) -> tuple[str, bool]:
    """(style, shared_prefix) of a style_label."""
    return ("ours", False) if label == "ours_repeated" else (label, label == "ours")


def shared_inputs(hf_config, data_cfg, g: dict, completion_len: int) -> dict:
    """group_inputs for ONE sequence of g's prompt (grid [1, 3], one video's cu_seqlens, window index and
    vision position ids), with the packed group's positions prepared (prepare_shared)."""
    g1 = group_inputs(hf_config, data_cfg, 1, completion_len)
    assert g1["prompt_len"] == g["prompt_len"] and g1["patches"] * g["ids"].shape[0] == g["patches"]
    prepare_shared(hf_config, g, g1)
    return g1


def build_model(hf_config, dtype, shared_prefix: bool):
    """The HF model on sim_flash (and the shared-prefix attention over it when shared_prefix)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLAttention

    from videor1.forward import attention

    conf = copy.deepcopy(hf_config)  # use_sim_attention edits the config: one copy per model
    conf._attn_implementation = "sdpa"  # replaced by sim_flash once built (construction checks names)
    hf = Qwen2_5_VLForConditionalGeneration._from_config(conf, dtype=dtype)
    use_sim_attention(hf)
    if shared_prefix:
        attention.install(hf)
        names = {m.config._attn_implementation for m in hf.modules() if isinstance(m, Qwen2_5_VLAttention)}
        assert names == {attention.PREFIX + "sim_flash"}, names  # every decoder layer reads the text config
    return hf


def simulate(layers: int = 28, vision_depth: int = 32, per_device_batch: int = 2, completion_len: int = 768,
             style: str = "ours", world: int = 8, count_flops: bool = True, config_path: str | None = None,
             shared_prefix: bool = True) -> dict:
    """One rank's T-GRPO step on a fake world of `world` ranks. style "ours" (this trainer; shared_prefix:
    train.shared_prefix, the packed forward and the shared prefill) or "video_r1" (full-sequence logits and
    log_softmax, per-device batch 1, no fused loss; shared_prefix is ignored). Returns a dict of results."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import AutoConfig

    from videor1.config import load_config
    from videor1.engine import build_engine
    from videor1.policy import PolicyModule

    t0 = time.monotonic()
    shared_prefix = shared_prefix and style == "ours"
    install_patches()
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    mesh = init_device_mesh("cpu", (world,))  # before fake mode (DESIGN.md)
    cfg = load_config(os.path.join(ROOT, "configs", "qwen25vl_7b_tgrpo_8gpu.yaml"))
    cfg.rollout.max_completion_length = completion_len
    G = cfg.rollout.num_generations
    path = config_path or tempfile.mkdtemp(prefix="qwen25vl_7b_config_")
    write_config(path, layers, vision_depth)
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    g = group_inputs(hf_config, cfg.data, G, completion_len)
    g1 = shared_inputs(hf_config, cfg.data, g, completion_len) if shared_prefix else None
    batch = 1 if style == "video_r1" else per_device_batch
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        def build(trainable: bool):
            hf = build_model(hf_config, torch.float32 if trainable else torch.bfloat16, shared_prefix)
            module = PolicyModule(hf, kernel_backend="torch", temperature=cfg.rollout.temperature)
            if not trainable:
                module.requires_grad_(False)
            engine = build_engine(cfg, module, 1, 1, trainable=trainable, mesh=mesh)
            attach_root_methods(engine.module)
            return engine

        policy = build(True)
        reference = build(False) if cfg.algo.beta > 0 else None
        s = dict(policy=policy, reference=reference, mode=mode, g=g, cfg=cfg, hf_config=hf_config, G=G,
                 P=g["prompt_len"], C=completion_len, batch=batch, style=style, shared_prefix=shared_prefix, g1=g1)
        params = sum(p.numel() for p in policy.module.parameters())  # a DTensor's numel is the global one
        ref_bytes = 0 if reference is None else sum(p.to_local().numel() * 2 for p in reference.module.parameters())
        s["dtensor_params"], s["local_params"], s["local_optimizer"] = local_optimizer(cfg, policy)
        run_step(s, NullMeter())  # step 1 creates the optimiser state; step 2, measured, is the steady state
        tracker = FSDPMemTracker(policy.module, s["local_optimizer"])
        memory = MemoryMeter(tracker)
        with tracker:
            run_step(s, memory)
        # The frozen reference's sharded bf16 weights live through the whole step; the tracker does not see
        # a second FSDP2 model's shards (track_external of them records nothing), so they are added here
        # from their exact sizes, as their own category.
        for cats in memory.peaks.values():
            cats[REFERENCE_CATEGORY] = ref_bytes
            cats["Total"] += ref_bytes
        flops = None
        if count_flops:
            flops = FlopMeter()
            run_step(s, flops)
    res = dict(style=style, shared_prefix=shared_prefix, layers=layers, vision_depth=vision_depth, world=world,
               per_device_batch=batch,
               G=G, completion_len=completion_len, prompt_len=g["prompt_len"], video_tokens=g["video_tokens"],
               frame_hw=g["frame_hw"], params=params, reference_shard_bytes=ref_bytes, peaks=memory.peaks,
               flops={k: v for k, v in (flops.flops if flops else {}).items() if k != "decode step"},
               flops_by_tower=flops.by_tower if flops else {},
               decode_step_flops=flops.flops.get("decode step") if flops else None,  # one prompt's
               seconds=round(time.monotonic() - t0, 1))
    return res


# ---- report ---------------------------------------------------------------------------------------------

REFERENCE_CATEGORY = "Reference Param (sharded bf16)"
CATEGORY_ORDER = ["Sharded Param", REFERENCE_CATEGORY, "Unsharded Param", "Buffer", "Sharded Grad", "Unsharded Grad", "OptState",
                  "Activation", "Temp", "All Gather", "Reduce Scatter", "Inputs"]


def table(res: dict, order: list[str] = CATEGORY_ORDER) -> str:
    """The per-phase peaks as a markdown table, categories in `order` (those that are ever nonzero), GB."""
    phases = list(res["peaks"])
    lines = ["| per GPU, at each phase's peak (GB) | " + " | ".join(phases) + " |",
             "|---|" + "---:|" * len(phases)]
    cats = [c for c in order if any(res["peaks"][p].get(c, 0) for p in phases)]
    for c in cats + ["Total"]:
        vals = [res["peaks"][p].get(c, 0) / GB for p in phases]
        b = "**" if c == "Total" else ""
        lines.append(f"| {b}{c}{b} | " + " | ".join(f"{b}{v:.2f}{b}" for v in vals) + " |")
    return "\n".join(lines)


def flops_report(res: dict) -> list[str]:
    out = []
    train = sum(res["flops"].get(p, 0) for p in ("reference", "policy"))
    for p, f in res["flops"].items():
        tw = res["flops_by_tower"].get(p, {})
        out.append(f"  {p:10s} {f / 1e12:10.1f} TFLOP  (vision tower {tw.get('vision tower', 0) / 1e12:.1f}, "
                   f"language model + head {tw.get('language model + head', 0) / 1e12:.1f})")
    if res.get("decode_step_flops"):
        dec = res["decode_step_flops"] * res["completion_len"] * res["per_device_batch"]
        out.append(f"  rollout decode, all {res['completion_len']} steps x {res['per_device_batch']} prompts: "
                   f"{dec / 1e12:.1f} TFLOP (bandwidth-bound: no MFU estimate)")
    lo, hi = train / (H100_BF16_DENSE * 0.6), train / (H100_BF16_DENSE * 0.4)
    out.append(f"  reference + policy: {train / 1e12:.1f} TFLOP per GPU -> {lo:.2f}-{hi:.2f} s on an H100 at 60-40% "
               "MFU (an estimate from counted FLOPs, not a measurement)")
    return out


def run_labels(style: str, shared_prefix: str) -> list[str]:
    """The runs of --style and --shared-prefix, as style_label names (shared_prefix applies to ours)."""
    out = []
    for st in (["ours", "video_r1"] if style == "both" else [style]):
        if st == "ours":
            out += {"on": ["ours"], "off": ["ours_repeated"], "both": ["ours", "ours_repeated"]}[shared_prefix]
        else:
            out.append(st)
    return out


def compare(shared: dict, repeated: dict) -> dict:
    """The shared prefix against the repeated forward: per-phase peaks and the reference + policy FLOPs."""
    out = {"peak_gb": {p: [round(shared["peaks"][p]["Total"] / GB, 2), round(repeated["peaks"][p]["Total"] / GB, 2)]
                       for p in shared["peaks"]},
           "activation_gb": {p: [round(shared["peaks"][p].get("Activation", 0) / GB, 2),
                                 round(repeated["peaks"][p].get("Activation", 0) / GB, 2)] for p in shared["peaks"]},
           "columns": ["ours (shared prefix)", "ours_repeated"]}
    if shared["flops"] and repeated["flops"]:
        train = [sum(r["flops"].get(p, 0) for p in ("reference", "policy")) for r in (shared, repeated)]
        out["reference_policy_tflop"] = [round(f / 1e12, 1) for f in train]
        out["reference_policy_ratio"] = round(train[0] / train[1], 4)
        out["tflop_by_tower"] = {p: {t: [round(r["flops_by_tower"][p][t] / 1e12, 2) for r in (shared, repeated)]
                                     for t in ("vision tower", "language model + head")}
                                 for p in ("rollout", "reference", "policy")}
        G, P, C = shared["G"], shared["prompt_len"], shared["completion_len"]
        out["token_ratio"] = round((P + G * C) / (G * (P + C)), 4)  # packed tokens / repeated tokens
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--vision-depth", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2, help="prompts per GPU (default: the 7B config's 2)")
    ap.add_argument("--completion", type=int, default=768)
    ap.add_argument("--style", choices=["ours", "video_r1", "both"], default="both")
    ap.add_argument("--shared-prefix", choices=["on", "off", "both"], default="both",
                    help="ours with the shared-prefix forward (results 'ours'), repeated (train.shared_prefix: "
                         "false; results 'ours_repeated') or both")
    ap.add_argument("--fit", action="store_true", help="also search the longest completion that fits --gpu-gb "
                                                       "(each form of ours that runs)")
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    ap.add_argument("--margin-gb", type=float, default=4.0, help="CUDA context, NCCL and allocator slack (not tensors)")
    ap.add_argument("--no-flops", action="store_true")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--write-config", help="only write the 7B config.json into this directory")
    ap.add_argument("--one", choices=["ours", "ours_repeated", "video_r1"],
                    help=argparse.SUPPRESS)  # run_isolated's child
    args = ap.parse_args(argv)
    if args.one:
        style, shared = from_label(args.one)
        res = simulate(args.layers, args.vision_depth, args.batch, args.completion, style,
                       count_flops=not args.no_flops, shared_prefix=shared)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, default=list)
        return res
    if args.write_config:
        print(write_config(args.write_config, args.layers, args.vision_depth))
        return None
    t0 = time.monotonic()
    results = {}
    for label in run_labels(args.style, args.shared_prefix):
        res = run_isolated(args, label, args.completion, count_flops=not args.no_flops)
        results[label] = res
        peak = max(v.get("Total", 0) for v in res["peaks"].values())
        form = {"ours": " (shared prefix)", "ours_repeated": " (repeated, train.shared_prefix: false)"}.get(label, "")
        print(f"\n== {label}{form}: Qwen2.5-VL-{res['params'] / 1e9:.2f}B ({res['layers']} layers, vision depth "
              f"{res['vision_depth']}), FSDP2 over {res['world']} fake ranks, per-device batch {res['per_device_batch']}, "
              f"G = {res['G']}, {res['video_tokens']} video tokens ({res['frame_hw'][0]}x{res['frame_hw'][1]}), "
              f"prompt {res['prompt_len']}, completions {res['completion_len']}  [{res['seconds']} s]")
        print(table(res))
        print(f"peak per GPU: {peak / GB:.2f} GB of tensors (+ {args.margin_gb:.0f} GB margin = "
              f"{peak / GB + args.margin_gb:.2f} GB of {args.gpu_gb:.0f} GB)")
        if res["flops"]:
            print("FLOPs per GPU of the step:")
            print("\n".join(flops_report(res)))
    if "ours" in results and "ours_repeated" in results:
        results["shared_vs_repeated"] = cmp = compare(results["ours"], results["ours_repeated"])
        print("\n== shared prefix vs repeated (ours): peak per GPU by phase, GB:",
              ", ".join(f"{p} {a:.2f} vs {b:.2f}" for p, (a, b) in cmp["peak_gb"].items()))
        if "reference_policy_tflop" in cmp:
            a, b = cmp["reference_policy_tflop"]
            print(f"   reference + policy: {a:.1f} vs {b:.1f} TFLOP ({cmp['reference_policy_ratio']:.3f}x; packed / "
                  f"repeated tokens {cmp['token_ratio']:.3f}); vision tower in the policy phase "
                  f"{cmp['tflop_by_tower']['policy']['vision tower'][0]:.1f} vs "
                  f"{cmp['tflop_by_tower']['policy']['vision tower'][1]:.1f} TFLOP")
    if args.fit:
        for label in ("ours", "ours_repeated"):
            if label in results:
                results["fit" if label == "ours" else f"fit_{label}"] = fit(args, results[label], label)
    print("\nnotes:", json.dumps(SIMULATION_NOTES, indent=1))
    print(f"total: {time.monotonic() - t0:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**results, "notes": SIMULATION_NOTES}, f, indent=1, default=str)
    return results


def run_isolated(args, label: str, completion: int, count_flops: bool) -> dict:
    """simulate() in a fresh process: FSDP2's and the tracker's hooks and this script's patches are
    per process, and a second model in the same process trips the tracker's global state. label: a
    style_label."""
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--one", label, "--layers", str(args.layers),
               "--vision-depth", str(args.vision_depth), "--batch", str(args.batch), "--completion", str(completion),
               "--json", out] + ([] if count_flops else ["--no-flops"])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"simulation ({label}, completions {completion}) failed:\n{proc.stderr[-3000:]}")
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def fit(args, base: dict, label: str = "ours") -> dict:
    """The longest completion that fits gpu_gb - margin (memory only) for `label` (ours or ours_repeated).
    Every phase's peak is linear in the completion length at fixed shapes otherwise (activations, KV
    cache and flash attention all grow with the sequence, P + C or P + G*C; the loss's chunks do not),
    but the phase that peaks can change with it (the shared prefix peaks in the rollout at 768 tokens,
    in the policy phase from a few thousand on): a second measured point gives each phase's line, the
    longest length is where the first of them reaches the budget (rounded down to 256), and that length
    is simulated to check that it fits (if it does not, the lines through the last two points give the
    next guess, at most twice). The per-device batch does not enter from 2 on: prompt groups run one after
    another (tests/test_simulate_7b.py: batch 3 peaks as batch 2)."""
    budget = (args.gpu_gb - args.margin_gb) * GB

    def peak(r):
        return max(v.get("Total", 0) for v in r["peaks"].values())

    def longest(ca: int, ra: dict, cb: int, rb: dict) -> tuple[int, dict]:
        slopes = {ph: (rb["peaks"][ph]["Total"] - ra["peaks"][ph]["Total"]) / (cb - ca) for ph in ra["peaks"]}
        reach = {ph: (budget - rb["peaks"][ph]["Total"]) / sl + cb for ph, sl in slopes.items() if sl > 0}
        return int(min(reach.values())) // 256 * 256, slopes

    c0 = base["completion_len"]
    runs = {c0: base}
    c1 = 4096
    runs[c1] = run_isolated(args, label, c1, count_flops=False)
    last = [c0, c1]
    for _ in range(3):  # the prediction, then at most two corrections
        c_max, slopes = longest(last[-2], runs[last[-2]], last[-1], runs[last[-1]])
        if c_max in runs:
            break
        runs[c_max] = run_isolated(args, label, c_max, count_flops=False)
        last.append(c_max)
        if peak(runs[c_max]) <= budget:
            break
    fits = peak(runs[c_max]) <= budget
    peak_phase = {c: max(r["peaks"], key=lambda ph: r["peaks"][ph]["Total"]) for c, r in runs.items()}
    binding = peak_phase[c_max]
    out = {"style": label, "points": {c: peak(r) for c, r in runs.items()}, "peak_phase": peak_phase,
           "phase_slope_bytes_per_token": slopes, "slope_bytes_per_token": slopes[binding], "longest": c_max,
           "fits": fits, "budget": budget}
    for c in sorted(runs):
        print(f"fit ({label}): completions {c}: peak {peak(runs[c]) / GB:.2f} GB ({peak_phase[c]})")
    print(f"fit ({label}): longest completion within {args.gpu_gb:.0f} GB - {args.margin_gb:.0f} GB margin: {c_max} "
          f"tokens (simulated: {peak(runs[c_max]) / GB:.2f} GB in the {binding} phase, "
          f"{'fits' if fits else 'does NOT fit'}); {slopes[binding] * 1000 / GB:.2f} GB per 1000 completion tokens "
          "there")
    return out


if __name__ == "__main__":
    main()
