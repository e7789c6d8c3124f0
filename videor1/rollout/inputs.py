"""From a dataset row to model inputs, and from generated ids to completions.

One prompt's inputs are built once and used for every rollout and for training, so rollout and
training see the same input_ids, vision tensors and second_per_grid_ts (Video-R1's trainer drops
second_per_grid_ts for training but not for generation; we keep them equal).
"""

from __future__ import annotations

import dataclasses

import torch

from videor1 import vision
from videor1.config import DataConfig
from videor1.data import resolve_media_path
from videor1.prompts import build_messages
from videor1.tgrpo import shuffle_permutation

MERGE = 2  # Qwen2.5-VL spatial merge size: one LLM token per 2x2 patches


@dataclasses.dataclass
class Prompt:
    """One dataset row, ready for generate and for the policy forward.

    input_ids: int64 [P] (chat template with the vision pad token expanded to grid.prod() / 4)
    vision: model kwargs of one sample (pixel_values_videos [N, 1176], video_grid_thw [1, 3],
        second_per_grid_ts [1]; or pixel_values / image_grid_thw for an image)
    shuffled_vision: the same for the shuffled-frame copy, or None (images, or plain GRPO)
    media: the decoded frames the patches were made from (CPU uint8 [T, H, W, 3], or [H, W, 3] for
        an image), kept for rollout servers that patch them themselves (videor1.rollout.vllm)
    shuffle_order: int64 [T], the frame order of shuffled_vision (None without it)
    pixel_bounds: (min_pixels, max_pixels) the frames were resized within
    """

    row: dict
    input_ids: torch.Tensor
    vision: dict
    shuffled_vision: dict | None = None
    media: "Media | None" = None
    shuffle_order: torch.Tensor | None = None
    pixel_bounds: tuple[int, int] | None = None

    @property
    def is_video(self) -> bool:
        return self.row["data_type"] == "video"

    def to(self, device: torch.device | str) -> "Prompt":
        """A copy with input_ids and the vision tensors on `device`: the one host-to-device crossing
        of a prompt (train.py, sft.py and eval.py move each prompt there once, before the model)."""
        def move(vis: dict | None) -> dict | None:
            return None if vis is None else {k: v.to(device) for k, v in vis.items()}

        return dataclasses.replace(self, input_ids=self.input_ids.to(device), vision=move(self.vision),
                                   shuffled_vision=move(self.shuffled_vision))  # media stays on the CPU


def _expand_pad(text: str, token: str, count: int) -> str:
    if text.count(token) != 1:
        raise ValueError(f"chat template rendered {text.count(token)} {token} tokens, expected 1")
    return text.replace(token, token * count)


@dataclasses.dataclass
class Media:
    """A row's decoded media: uint8 frames [T, H, W, 3] with their sampling meta, or one image [H, W, 3]."""

    frames: torch.Tensor
    second_per_grid_t: float | None = None


def load_media(row: dict, data: DataConfig, data_root: str) -> Media:
    """Decode a row's video (frames sampled as configured) or image. Raises vision.MediaDecodeError
    for media that cannot be read (the caller counts and skips it; nothing is substituted)."""
    path = resolve_media_path(row, data_root)
    if row["data_type"] == "video":
        frames, meta = vision.load_video(path, fps=data.fps, min_frames=data.min_frames, max_frames=data.max_frames)
        return Media(frames, float(meta.second_per_grid_t))
    return Media(vision.load_image(path))


def video_pixel_bounds(data: DataConfig, num_frames: int) -> tuple[int, float]:
    """(min_pixels, max_pixels) a video of num_frames sampled frames is resized within, per
    data.video_pixels: "qwen_vl_utils" (Video-R1's fetch_video rule, vision.qwen_vl_utils_video_pixels)
    or "fixed" (data.video_min_pixels / data.video_max_pixels as given)."""
    if data.video_pixels == "fixed":
        return data.video_min_pixels, data.video_max_pixels
    if data.video_pixels == "qwen_vl_utils":
        return vision.qwen_vl_utils_video_pixels(num_frames, data.video_min_pixels, data.video_max_pixels,
                                                 data.video_total_pixels)
    raise ValueError(f"data.video_pixels must be 'qwen_vl_utils' or 'fixed', got {data.video_pixels!r}")


def second_per_grid_t(data: DataConfig, media: Media) -> float:
    """A video's second_per_grid_ts entry per data.second_per_grid_ts: "fps" = 2 / sample_fps (from
    the sampling, Qwen2.5-VL's intent), "one" = 1.0 (what Video-R1's training effectively used: its
    processor call fell back to fps 2.0 for rollouts, and its loss forward dropped the key)."""
    if data.second_per_grid_ts == "one":
        return 1.0
    if data.second_per_grid_ts == "fps":
        return float(media.second_per_grid_t)
    raise ValueError(f"data.second_per_grid_ts must be 'fps' or 'one', got {data.second_per_grid_ts!r}")


def build_prompt(row: dict, media: Media, processor, data: DataConfig, *, shuffled: bool,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Prompt:
    """Patches (fused frame-to-patch kernel) and token ids of a row; a shuffled-frame copy when asked."""
    text = processor.apply_chat_template(build_messages(row), tokenize=False, add_generation_prompt=True)
    shuffled_vision, order = None, None
    if row["data_type"] == "video":
        min_px, max_px = video_pixel_bounds(data, media.frames.shape[0])
        px = dict(min_pixels=min_px, max_pixels=max_px, dtype=dtype)
        pixels, grid = vision.frames_to_patches(media.frames, **px)
        sec = torch.tensor([second_per_grid_t(data, media)])
        vis = {"pixel_values_videos": pixels, "video_grid_thw": grid.view(1, 3), "second_per_grid_ts": sec}
        if shuffled:
            order = shuffle_permutation(media.frames.shape[0], generator)
            s_pixels, _ = vision.frames_to_patches(media.frames, frame_order=order, **px)
            shuffled_vision = dict(vis, pixel_values_videos=s_pixels)
        text = _expand_pad(text, "<|video_pad|>", int(grid.prod()) // MERGE**2)
        bounds = (int(min_px), int(max_px))
    else:
        pixels, grid = vision.image_to_patches(
            media.frames, min_pixels=data.image_min_pixels, max_pixels=data.image_max_pixels, dtype=dtype
        )
        vis = {"pixel_values": pixels, "image_grid_thw": grid.view(1, 3)}
        text = _expand_pad(text, "<|image_pad|>", int(grid.prod()) // MERGE**2)
        bounds = (int(data.image_min_pixels), int(data.image_max_pixels))
    ids = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    media = Media(media.frames, second_per_grid_t(data, media) if row["data_type"] == "video" else None)
    return Prompt(row=row, input_ids=ids, vision=vis, shuffled_vision=shuffled_vision, media=media,
                  shuffle_order=order, pixel_bounds=bounds)


def prepare_prompt(row: dict, processor, data: DataConfig, data_root: str, *, shuffled: bool,
                   generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Prompt:
    """load_media + build_prompt."""
    return build_prompt(row, load_media(row, data, data_root), processor, data, shuffled=shuffled,
                        generator=generator, dtype=dtype)


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """int64 [B, C]: 1 up to and including the first EOS of each row (all 1 when there is none)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    length = completion_ids.shape[1]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], length, dtype=torch.long))
    return (torch.arange(length, device=completion_ids.device)[None] <= first[:, None]).long()


def truncated_completions(completion_ids: torch.Tensor, mask: torch.Tensor, eos_ids: list[int],
                          max_completion_length: int) -> torch.Tensor:
    """bool [B]: completions that reached max_completion_length without an EOS (TRL's clipped
    completions; mask_truncated_completions drops them from the loss). completion_ids / mask [B, C]."""
    has_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device)).any(1)
    return ~has_eos & (mask.sum(1) >= max_completion_length)


VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def vision_token_ids(tokenizer) -> list[int]:
    """Ids a completion must never contain: a generated <|video_pad|> would be read as a vision slot."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def decode(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Completion texts as the rewards see them (special tokens skipped, as Video-R1). Takes CPU copies."""
    return [tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=True) for ids, m in zip(completion_ids, mask)]
