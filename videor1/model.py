"""Load the policy, the reference model and the processor from a local HF checkpoint directory."""

from __future__ import annotations

import importlib.util
import os

import torch

from videor1.generation import detach_checkpoint_defaults
from videor1.mrope import install_original_rope_index

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_attn_implementation(requested: str) -> str:
    """"auto" -> flash_attention_2 when flash-attn is importable and CUDA is present, else sdpa."""
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError("model.attn_implementation=flash_attention_2 but flash-attn is not installed "
                             "(pip install videor1[gpu]); use auto or sdpa")
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _check_dir(path: str) -> None:
    if not path:
        raise ValueError("model.path is empty: point it at a local checkpoint directory (no hub downloads)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model.path {path!r} is not a checkpoint directory (no config.json)")


def load_model(path: str, dtype: str = "float32", attn_implementation: str = "auto"):
    """A Qwen2.5-VL from a local directory, in `dtype`, on CPU, ready for our paths: its M-RoPE
    positions follow Qwen2.5-VL's original rule (videor1.mrope) in every forward and in generate,
    and it keeps none of the checkpoint's sampling defaults (videor1.generation)."""
    from transformers import AutoModelForImageTextToText

    _check_dir(path)
    model = AutoModelForImageTextToText.from_pretrained(
        path,
        dtype=DTYPES[dtype],
        attn_implementation=resolve_attn_implementation(attn_implementation),
        local_files_only=True,
    )
    return install_original_rope_index(detach_checkpoint_defaults(model))


def load_processor(path: str):
    """The checkpoint's processor (tokenizer + chat template + image/video processors)."""
    from transformers import AutoProcessor

    _check_dir(path)
    return AutoProcessor.from_pretrained(path, local_files_only=True)
