"""Qwen2.5-VL's M-RoPE position ids, by the model's original rule (DESIGN.md, "Numerics and kernel rules").

The rule (Qwen2.5-VL as released: transformers 4.x `get_rope_index`, vLLM's `MRotaryEmbedding`):
- text tokens get 1D positions, the same value on the (time, height, width) axes, counting on from
  the previous token's position + 1;
- a vision segment with grid (t, h, w) has t * (h / m) * (w / m) tokens (m = spatial_merge_size), in
  (time, row, column) order, at (st + floor(i_t * second_per_grid_t * tokens_per_second), st + row,
  st + column) where st is where the segment starts (the previous max + 1); an image's time index is 0;
- the text after a vision segment starts at max(all positions so far) + 1.

transformers 5.24 starts that text at st + max(h, w) / m instead, ignoring the video's temporal
extent: the two differ whenever (t - 1) * second_per_grid_t * tokens_per_second >= max(h, w) / m
(e.g. 8 frames at 2 fps, a 2 x 2 merged grid: time indices st + 0, 2, 4, 6, but 5.24 resumes the
text at st + 2, inside the video's time span). `install_original_rope_index` makes a loaded model
use this rule for forward and generate; `position_ids_for` gives explicit position_ids.

The time index is computed as vLLM does (float32 i_t * second * tokens_per_second, truncated).
transformers 4.x cast second_per_grid_t to its arange's int64 dtype first, dropping fractional
seconds (0.25 s -> time index 0 throughout); Video-R1's 2 fps (second 1.0) is unaffected.
"""

from __future__ import annotations

import functools
import itertools

import torch

# The position written at padded slots (attention_mask 0), as transformers 4.x; they are masked out.
PAD_POSITION = 1


def rope_index(
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    spatial_merge_size: int = 2,
    tokens_per_second: float = 2,
    **ignored,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D M-RoPE positions of a batch by Qwen2.5-VL's original rule (module docstring).

    input_ids: [B, T] (only its shape and device are used); mm_token_type_ids: [B, T], 0 text,
    1 image, 2 video (the processor's / videor1.policy.with_mm_token_types'); image_grid_thw,
    video_grid_thw: int [N, 3], consumed in order across the whole batch (adjacent segments of one
    kind are split by their grids' token counts); second_per_grid_ts: [N_videos] (1.0 each when None);
    attention_mask: [B, T] or None; 0 marks padding (left, right or anywhere): positions are counted
    over the unpadded tokens and padded slots get PAD_POSITION. Other keyword arguments (generate passes
    all its model kwargs) are ignored.

    Returns position_ids int64 [3, B, T] and rope_deltas int64 [B, 1] = max(position) + 1 - (unpadded
    tokens), the convention of transformers 5.24's decode path (compute_3d_position_ids adds it to
    the 1D count of tokens), so that cached decoding continues at max + 1.
    All tensors are made on input_ids.device; the token types are read to the host once.
    """
    device = input_ids.device
    batch, length = input_ids.shape
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {(batch, length)}")
    grids = {1: [] if image_grid_thw is None else image_grid_thw.tolist(),
             2: [] if video_grid_thw is None else video_grid_thw.tolist()}  # fmt: skip
    seconds = [1.0] * len(grids[2]) if second_per_grid_ts is None else second_per_grid_ts.flatten().tolist()
    used = {1: 0, 2: 0}
    types = mm_token_type_ids.long()
    if attention_mask is not None:
        types = types.masked_fill(attention_mask == 0, -1)  # -1: padding, so one host read covers both
    rows, deltas = [], []
    for row in types.tolist():
        # `start` stays a device scalar (the max so far + 1): no host sync per segment.
        pieces, start, count = [], torch.zeros((), dtype=torch.long, device=device), 0
        for kind, run in itertools.groupby(row):
            n = len(list(run))
            if kind == -1:
                pieces.append(torch.full((3, n), PAD_POSITION, dtype=torch.long, device=device))
                continue
            count += n
            if kind == 0:
                pieces.append(torch.arange(n, device=device).expand(3, n) + start)
                start = start + n
                continue
            while n > 0:  # one or more images / videos back to back
                name = {1: "image", 2: "video"}[kind]
                if used[kind] >= len(grids[kind]):
                    raise ValueError(f"more {name} segments in mm_token_type_ids than {name} grids "
                                     f"({len(grids[kind])})")  # fmt: skip
                t, h, w = grids[kind][used[kind]]
                h, w = h // spatial_merge_size, w // spatial_merge_size
                if t * h * w > n:
                    raise ValueError(f"{name} {used[kind]} has {t * h * w} tokens but its segment only {n}")
                # As vLLM: float32 arange * second * tokens_per_second, truncated (images: 0).
                t_idx = torch.arange(t, device=device)
                t_idx = (t_idx * seconds[used[2]] * tokens_per_second).long() if kind == 2 else t_idx * 0
                h_idx = torch.arange(h, device=device)
                w_idx = torch.arange(w, device=device)
                grid = torch.stack(torch.meshgrid(t_idx, h_idx, w_idx, indexing="ij")).reshape(3, -1)
                pieces.append(grid + start)
                start = start + t_idx[-1].clamp(min=max(h, w) - 1) + 1  # the text resumes at max + 1
                used[kind] += 1
                n -= t * h * w
        rows.append(torch.cat(pieces, 1) if pieces else torch.empty((3, 0), dtype=torch.long, device=device))
        deltas.append(start - count)
    return torch.stack(rows, 1), torch.stack(deltas).view(batch, 1)


def _qwen_models(model) -> list:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    return [m for m in model.modules() if isinstance(m, Qwen2_5_VLModel)] if hasattr(model, "modules") else []


def install_original_rope_index(hf_model):
    """Make every Qwen2_5_VLModel inside `hf_model` (a Qwen2_5_VLForConditionalGeneration, its `.model`,
    or a wrapper such as PolicyModule) compute positions with `rope_index`; returns `hf_model`.

    transformers 5.24 routes both forward without position_ids (compute_3d_position_ids) and generate
    (_prepare_position_ids_for_generation) through `model.get_rope_index`, so an instance attribute of
    that name covers both. It lives in the module's __dict__, which FSDP2's fully_shard keeps (it only
    swaps __class__ for a subclass, torch.distributed.fsdp._fully_shard._fsdp_init._apply_to_module):
    install before or after sharding. A functools.partial of a module-level function pickles and deep-
    copies. Idempotent: installing again rebinds the same rule with the config's current values.
    Raises TypeError when there is no Qwen2_5_VLModel inside.
    """
    models = _qwen_models(hf_model)
    if not models:
        raise TypeError(
            f"install_original_rope_index: {type(hf_model).__module__}.{type(hf_model).__qualname__} has no "
            "Qwen2_5_VLModel submodule (expected a Qwen2_5_VLForConditionalGeneration or Qwen2_5_VLModel)"
        )
    for m in models:
        vision = m.config.vision_config
        m.get_rope_index = functools.partial(
            rope_index, spatial_merge_size=vision.spatial_merge_size, tokens_per_second=vision.tokens_per_second
        )
        m.rope_deltas = None  # deltas cached under the old rule must not steer a later cached decode
    return hf_model


def position_ids_for(model_config, model_inputs: dict) -> torch.Tensor:
    """int64 [3, B, T] positions for the trainer's model kwargs (input_ids, attention_mask, and
    image_grid_thw / video_grid_thw / second_per_grid_ts; mm_token_type_ids derived from the ids when
    absent), to pass as explicit `position_ids`. model_config: the Qwen2_5_VLConfig."""
    from videor1.policy import with_mm_token_types  # late: policy may import this module

    inputs = with_mm_token_types(model_inputs, model_config)
    vision = model_config.vision_config
    keys = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask")
    position_ids, _ = rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], **{k: inputs.get(k) for k in keys},
        spatial_merge_size=vision.spatial_merge_size, tokens_per_second=vision.tokens_per_second,
    )  # fmt: skip
    return position_ids
