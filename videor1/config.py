"""One dataclass tree for every entry point; loaded from YAML with `--key value` overrides.

    cfg = load_config("configs/tiny_cpu.yaml", ["--rollout.num_generations", "4"])

Unknown keys, wrong types and out-of-range values raise ConfigError naming the dotted key, before
any work starts. Ranges and choices live next to each field (`field(metadata=...)`), so the check
and the default sit in one place.

TRL's GRPOConfig names are accepted too, flat, in YAML (top-level keys) and on the command line
(`--max_steps 5 --epsilon_high 0.28`): TRL_NAMES maps each onto our dotted key (README "Coming from
TRL"). Within one source (the YAML file, or the command line) a TRL name and its dotted key, or two
names of one setting, are an error naming both; the command line overrides the file whichever names
either uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


def _f(default: Any = dataclasses.MISSING, *, choices=None, ge=None, gt=None, le=None, lt=None, factory=None,
       finite=None):
    meta = {k: v for k, v in dict(choices=choices, ge=ge, gt=gt, le=le, lt=lt, finite=finite).items() if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = ""  # local HF checkpoint directory (no hub downloads)
    dtype: str = _f("float32", choices=("float32", "bfloat16", "float16"))
    attn_implementation: str = _f("auto", choices=("auto", "sdpa", "eager", "flash_attention_2"))  # auto: flash-attn when importable on CUDA, else SDPA
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    train_file: str = ""  # Video-R1 JSON / JSONL
    data_root: str = ""  # media paths are relative to this; default: the train file's folder
    fps: float = _f(2.0, gt=0)
    min_frames: int = _f(4, ge=1)
    max_frames: int = _f(16, ge=1)
    # How a video's frame size is bounded (README "Ours vs Video-R1's scripts"):
    #   qwen_vl_utils: Video-R1's data path (its vendored qwen-vl-utils fetch_video): smart_resize within
    #     [video_min_pixels, max(min(video_max_pixels, video_total_pixels / T * 2), int(video_min_pixels * 1.05))]
    #     for T sampled frames; with Video-R1's 128*28*28 both ways that is [100352, 105369] (640x480 -> 364x280).
    #   fixed: smart_resize within [video_min_pixels, video_max_pixels] as given (Qwen2VLVideoProcessor's rule).
    video_pixels: str = _f("qwen_vl_utils", choices=("qwen_vl_utils", "fixed"))
    video_min_pixels: int = _f(128 * 28 * 28, ge=28 * 28)  # qwen-vl-utils' VIDEO_MIN_PIXELS in Video-R1
    video_max_pixels: int = _f(128 * 28 * 28, ge=28 * 28)  # qwen-vl-utils' VIDEO_MAX_PIXELS in Video-R1
    video_total_pixels: int = _f(int(128000 * 28 * 28 * 0.9), ge=28 * 28)  # VIDEO_TOTAL_PIXELS (qwen_vl_utils mode only)
    # second_per_grid_ts of a video: "fps" = 2 / sample_fps (Qwen2.5-VL's intent, Video-R1's evaluation);
    # "one" = 1.0, what Video-R1's training effectively used (rollout and loss).
    second_per_grid_ts: str = _f("fps", choices=("fps", "one"))
    image_min_pixels: int = _f(3136, ge=28 * 28)  # qwen-vl-utils' MIN_PIXELS (4*28*28)
    image_max_pixels: int = _f(256 * 28 * 28, ge=28 * 28)  # qwen-vl-utils' MAX_PIXELS, Video-R1's image cap
    max_skip_rate: float = _f(0.05, ge=0, le=1)  # stop when more samples than this fail to load
    skip_rate_min_samples: int = _f(50, ge=1)  # ... judged once this many samples were attempted
    shuffle: bool = True
    cache_media: bool = False  # keep decoded frames in memory (small datasets, many epochs)
    max_prompt_length: int = _f(0, ge=0)  # prompts longer (tokens, vision included) are skipped and counted; 0 = off


@dataclass
class RolloutConfig:
    num_generations: int = _f(8, ge=2)  # G: ordered-frame rollouts per prompt
    num_shuffled: int = _f(-1, ge=-1)  # shuffled-frame rollouts per video prompt; -1 = G // 2
    max_completion_length: int = _f(768, ge=1)
    temperature: float = _f(1.0, gt=0)
    top_p: float = _f(0.95, gt=0, le=1)
    top_k: int = _f(0, ge=0)  # 0 = off
    min_p: float = _f(0.0, ge=0, le=1)  # 0 = off
    repetition_penalty: float = _f(1.0, gt=0)  # 1.0 = off; never inherited from the checkpoint
    # One generate call per rank per step for every prompt's ordered and shuffled rows (each prompt
    # prefilled once; videor1.rollout.hf.generate_batch); false: one call per prompt and frame order.
    batch_requests: bool = True
    # Who samples: "hf" (transformers' generate on the policy) or "vllm" (a vLLM server in its own venv,
    # videor1.rollout.vllm; weights synced after every optimiser step). The vllm_* keys are the server's.
    backend: str = _f("hf", choices=("hf", "vllm"))
    vllm_url: str = ""  # a server the user started (http://127.0.0.1:PORT); empty: each node starts one
    vllm_python: str = ""  # the vLLM venv's python; empty: .venv-vllm/bin/python (make vllm-env)
    vllm_port: int = _f(0, ge=0)  # 0: a free port
    vllm_start_timeout_s: float = _f(600.0, gt=0)  # a server not healthy by then fails the run, with its log
    vllm_request_timeout_s: float = _f(600.0, gt=0)
    vllm_max_model_len: int = _f(0, ge=0)  # 0: the checkpoint's
    vllm_enforce_eager: bool = True  # no torch.compile / CUDA graphs: starts in ~45 s on a CPU; false on GPUs
    vllm_kv_cache_gib: float = _f(1.0, gt=0)  # the CPU backend's KV cache (VLLM_CPU_KVCACHE_SPACE)
    vllm_gpu_memory_utilization: float = _f(0.0, ge=0, le=1)  # 0: vLLM's default
    vllm_tensor_parallel_size: int = _f(1, ge=1)
    # How the weights reach the server after each step: "nccl" (a torch.distributed group with its
    # workers, GPU to GPU), "gloo" (the same group on the CPU), "shm" (a safetensors file in /dev/shm);
    # "auto": nccl when the trainer has CUDA, else shm, and shm if the nccl group cannot be set up.
    vllm_weight_transfer: str = _f("auto", choices=("auto", "nccl", "gloo", "shm"))


@dataclass
class AlgoConfig:
    temporal: bool = True  # T-GRPO; false = plain GRPO
    alpha: float = _f(0.3, ge=0)  # temporal bonus
    mu: float = _f(0.8, ge=0)  # bonus when p_ordered >= mu * p_shuffled
    # (r - mean_group) / (std + 1e-4) with the group's std ("group", Video-R1), the whole step's std over
    # every rank ("batch", TRL), or unscaled ("none", Dr. GRPO). YAML true / false read as group / none.
    scale_rewards: str = _f("group", choices=("group", "batch", "none"))
    rewards: list[str] = _f(factory=lambda: ["accuracy", "format"])  # names in videor1.rewards.REWARDS
    reward_weights: list[float] = _f(factory=list)  # one per algo.rewards entry; empty = all 1.0
    mask_truncated_completions: bool = False  # completions without EOS at max length leave the loss
    reward_modules: list[str] = _f(factory=list)  # modules imported first, to @register_reward your own
    # false: answers that do not parse as finite numbers score 0 in every numeric rule; true: Video-R1's
    # rewards exactly, exploits included (regression gives "nan" 1.0; numerical gives "inf" vs "inf" 1.0).
    video_r1_compat_rewards: bool = False
    length_bonus: float = _f(0.2, ge=0)
    length_min: int = _f(320, ge=0)
    length_max: int = _f(512, ge=0)
    beta: float = _f(0.04, ge=0)
    eps_low: float = _f(0.2, ge=0)
    eps_high: float = _f(0.2, ge=0)
    kl_clamp: float = _f(10.0, gt=0)
    loss_type: str = _f("grpo", choices=("grpo", "bnpo", "dr_grpo", "dapo"))
    importance_level: str = _f("token", choices=("token", "sequence"))
    num_iterations: int = _f(1, ge=1)  # optimiser steps per batch of rollouts (old log-probs when > 1)
    kernel_backend: str = _f("auto", choices=("auto", "triton", "torch"))


@dataclass
class OptimConfig:
    lr: float = _f(1e-6, gt=0, finite=True)
    weight_decay: float = _f(0.01, ge=0, finite=True)  # Video-R1's GRPO scripts
    adam_beta1: float = _f(0.9, ge=0, lt=1)
    adam_beta2: float = _f(0.999, ge=0, lt=1)
    warmup_ratio: float = _f(0.0, ge=0, le=1)
    scheduler: str = _f("cosine", choices=("cosine", "constant", "linear"))
    max_grad_norm: float = _f(5.0, gt=0, finite=True)
    grad_accum: int = _f(1, ge=1)


@dataclass
class TrainConfig:
    output_dir: str = "runs/tgrpo"
    seed: int = 0
    max_steps: int = _f(-1, ge=-1)  # training steps; 0 or -1 = "by epochs": num_epochs passes over the data
    num_epochs: float = _f(1.0, gt=0)
    per_device_batch_size: int = _f(1, ge=1)  # prompts per rank per micro-step
    engine: str = _f("fsdp2", choices=("fsdp2", "deepspeed"))
    deepspeed_config: str = "configs/zero3.json"
    mixed_precision: str = _f("no", choices=("no", "bf16"))
    save_steps: int = _f(0, ge=0)  # 0 = only at the end
    resume_from: str = ""
    overwrite_output_dir: bool = False  # a fresh run into a non-empty output_dir refuses without it
    resume_allow_changes: list[str] = _f(factory=list)  # dotted keys that may differ from the checkpoint's config
    save_total_limit: int = _f(0, ge=0)  # keep the last N checkpoints (0 = all); final/ is always kept
    save_hf_checkpoints: bool = True  # each checkpoint-N also holds an HF copy (from_pretrained loads it)
    logging_steps: int = _f(10, ge=1)  # console summary every N steps, as TRL (metrics.jsonl gets every step)
    report_to: str = _f("none", choices=("none", "tensorboard", "wandb"))
    log_completions: bool = False  # a sample of prompts, completions and rewards every logging step
    dist_timeout_s: float = _f(600.0, gt=0)  # a collective waiting longer (a dead rank) fails the job
    # One packed [prompt; c1..cG] forward per prompt group (vision tower and prompt once, exact) in the
    # policy, reference and old-log-prob passes, and one prefill per prompt in rollouts; false: G copies.
    shared_prefix: bool = True


@dataclass
class SFTConfig:
    # "assistant": loss on the assistant turn only (prompt and vision tokens masked);
    # "video_r1": Video-R1's sft_video.py labels for Qwen2.5-VL: every token but padding and <|image_pad|>
    #   (its Qwen2.5-VL branch masks only processor.image_token: <|video_pad|>, <|vision_start|> and
    #   <|vision_end|> stay in the loss);
    # "all_but_vision": every token but padding, <|image_pad|> and <|video_pad|> (not Video-R1's).
    loss_on: str = _f("assistant", choices=("assistant", "video_r1", "all_but_vision"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def validate(self) -> "Config":
        """Cross-field checks (per-field ranges are checked while building)."""
        d, a = self.data, self.algo
        if d.min_frames > d.max_frames:
            raise ConfigError(f"data.min_frames ({d.min_frames}) > data.max_frames ({d.max_frames})")
        if d.video_min_pixels > d.video_max_pixels:
            raise ConfigError(f"data.video_min_pixels ({d.video_min_pixels}) > data.video_max_pixels ({d.video_max_pixels})")
        if d.image_min_pixels > d.image_max_pixels:
            raise ConfigError(f"data.image_min_pixels ({d.image_min_pixels}) > data.image_max_pixels ({d.image_max_pixels})")
        if a.length_min > a.length_max:
            raise ConfigError(f"algo.length_min ({a.length_min}) > algo.length_max ({a.length_max})")
        return self


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with errors that name the dotted key.


def _check_range(key: str, value: Any, meta: dict) -> None:
    if meta.get("finite") and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"config key '{key}' must be one of {list(meta['choices'])}, got {value!r}")
    for op, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                         ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        if op in meta and not ok(value, meta[op]):
            raise ConfigError(f"config key '{key}' must be {word} {meta[op]}, got {value!r}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(typ)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {typ}")


# Keys that were booleans in an older schema: bool -> today's value.
_LEGACY_BOOLS = {"algo.scale_rewards": {True: "group", False: "none"}}


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from nested dicts; unknown keys, wrong types, bad ranges raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            raise ConfigError(f"unknown config key '{prefix}{name}' (known in this section: {sorted(fields)})")
    kwargs = {}
    for name, value in data.items():
        key, typ = prefix + name, hints[name]
        if key in _LEGACY_BOOLS and isinstance(value, bool):  # values of an older schema still load
            value = _LEGACY_BOOLS[key][value]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = from_dict(typ, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, typ)
            _check_range(key, kwargs[name], dict(fields[name].metadata))
    obj = cls(**kwargs)
    for name, f in fields.items():  # defaults must satisfy the ranges too
        if name not in kwargs and not dataclasses.is_dataclass(hints[name]):
            _check_range(prefix + name, getattr(obj, name), dict(f.metadata))
    return obj


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (for logging and checkpoints)."""
    return dataclasses.asdict(cfg)


def parse_overrides(args: list[str]) -> dict:
    """`--a.b value` / `--a.b=value` pairs -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected an override like --section.key value, got {arg!r}")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key} conflicts with another override")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


# ----------------------------------------------------------------------------------------------
# TRL GRPOConfig names (flat) -> our dotted keys. A transform turns TRL's value into ours and raises
# ValueError (reported as a ConfigError naming both names) for a TRL value we do not support.


class _Unsupported(ValueError):
    pass


def _bf16(v):
    if not isinstance(v, bool):
        raise _Unsupported(f"must be true or false, got {v!r}")
    return "bf16" if v else "no"


def _scale_rewards(v):
    if isinstance(v, bool):  # TRL < 0.22: a bool
        return "group" if v else "none"
    return v  # group | batch | none, checked by algo.scale_rewards' choices


TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # TRL also has cispo, sapo, luspo, ...: not implemented


def _loss_type(v):
    if isinstance(v, str) and v not in TRL_LOSS_TYPES:
        raise _Unsupported(f"TRL loss_type {v!r} is not implemented here; supported: {list(TRL_LOSS_TYPES)}")
    return v


def _report_to(v):
    if v is None or v == []:
        return "none"
    if isinstance(v, list):
        names = [x for x in v if x != "none"]
        if len(names) > 1:
            raise _Unsupported(f"one backend at a time (tensorboard, wandb or none), got {v!r}")
        return names[0] if names else "none"
    if v == "all":
        raise _Unsupported("'all' is not supported: name one of tensorboard, wandb, none")
    return v


def _none_as(default):
    return lambda v: default if v is None else v


def _resume_from_checkpoint(v):
    if v is True:
        return "auto"  # TRL: True = the latest checkpoint in output_dir
    if v is None or v is False:
        return ""
    return v


_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}


def _scheduler(v):
    if isinstance(v, str) and v not in _SCHEDULERS:
        raise _Unsupported(f"lr_scheduler_type {v!r} is not supported; supported: {sorted(_SCHEDULERS)}")
    return _SCHEDULERS.get(v, v)


# TRL name -> (dotted key, value transform or None). README "Coming from TRL" has the same table with notes.
TRL_NAMES: dict[str, tuple[str, Any]] = {
    "max_steps": ("train.max_steps", None),
    "num_train_epochs": ("train.num_epochs", None),
    "per_device_train_batch_size": ("train.per_device_batch_size", None),  # ours counts prompts, not completions
    "gradient_accumulation_steps": ("optim.grad_accum", None),
    "learning_rate": ("optim.lr", None),
    "weight_decay": ("optim.weight_decay", None),
    "warmup_ratio": ("optim.warmup_ratio", None),
    "lr_scheduler_type": ("optim.scheduler", _scheduler),
    "max_grad_norm": ("optim.max_grad_norm", None),
    "seed": ("train.seed", None),
    "output_dir": ("train.output_dir", None),
    "overwrite_output_dir": ("train.overwrite_output_dir", None),
    "resume_from_checkpoint": ("train.resume_from", _resume_from_checkpoint),
    "save_steps": ("train.save_steps", None),
    "save_total_limit": ("train.save_total_limit", _none_as(0)),
    "logging_steps": ("train.logging_steps", None),
    "report_to": ("train.report_to", _report_to),
    "log_completions": ("train.log_completions", None),
    "bf16": ("train.mixed_precision", _bf16),
    "gradient_checkpointing": ("model.gradient_checkpointing", None),
    "num_generations": ("rollout.num_generations", None),
    "max_completion_length": ("rollout.max_completion_length", None),
    "max_prompt_length": ("data.max_prompt_length", _none_as(0)),
    "temperature": ("rollout.temperature", None),
    "top_p": ("rollout.top_p", None),
    "top_k": ("rollout.top_k", _none_as(0)),
    "min_p": ("rollout.min_p", _none_as(0.0)),
    "repetition_penalty": ("rollout.repetition_penalty", None),
    "beta": ("algo.beta", None),
    "epsilon": ("algo.eps_low", None),  # also algo.eps_high unless given (TRL: epsilon_high defaults to epsilon)
    "epsilon_high": ("algo.eps_high", None),
    "importance_sampling_level": ("algo.importance_level", None),
    "loss_type": ("algo.loss_type", _loss_type),
    "scale_rewards": ("algo.scale_rewards", _scale_rewards),
    "num_iterations": ("algo.num_iterations", None),
    "mask_truncated_completions": ("algo.mask_truncated_completions", None),
    "reward_weights": ("algo.reward_weights", None),
}


def _has(data: dict, dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _set(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config section '{part}' must be a mapping, got {node!r}")
    node[parts[-1]] = value


def translate_trl_names(data: dict, source: str, cls: type = Config) -> tuple[dict, set[str], set[str]]:
    """Replace the flat TRL names in one source's `data` by our dotted keys. Returns (data, the dotted
    keys that source set under either name, the TRL names it used). A TRL name whose key is also
    given, or two TRL names of one key, raise ConfigError naming both; so does an unknown top-level
    name (listing the TRL names)."""
    sections = {f.name for f in dataclasses.fields(cls)}
    out = {k: v for k, v in data.items() if k in sections}
    by_trl: dict[str, str] = {}
    for name, value in data.items():
        if name in sections:
            continue
        if name not in TRL_NAMES:
            raise ConfigError(f"unknown config key '{name}' in {source}: not a section ({sorted(sections)}) nor a "
                              f"supported TRL GRPOConfig name ({sorted(TRL_NAMES)})")
        dotted, transform = TRL_NAMES[name]
        if _has(data, dotted):
            raise ConfigError(f"{source} sets '{name}' (TRL name for {dotted}) and '{dotted}': give one of them")
        if dotted in by_trl:
            raise ConfigError(f"{source} sets '{by_trl[dotted]}' and '{name}', both for {dotted}: give one of them")
        by_trl[dotted] = name
        if transform is not None:
            try:
                value = transform(value)
            except _Unsupported as e:
                raise ConfigError(f"'{name}' (TRL name for {dotted}) in {source}: {e}") from None
        _set(out, dotted, value)
    return out, set(flatten(out)), set(by_trl.values())


# ----------------------------------------------------------------------------------------------
# The config that shapes training: hashed into every checkpoint, compared on resume.

# Keys that do not change what is trained (where it is written, how often it is saved or logged,
# how long it runs, memory-only and fault-handling options): they may differ on resume. Every other
# key, model.path and data.train_file included, must match unless listed in train.resume_allow_changes.
RESUME_IGNORED_KEYS = (
    "train.output_dir", "train.resume_from", "train.overwrite_output_dir", "train.resume_allow_changes",
    "train.save_steps", "train.save_total_limit", "train.save_hf_checkpoints", "train.logging_steps",
    "train.report_to", "train.log_completions", "train.dist_timeout_s", "train.max_steps", "train.num_epochs",
    "data.cache_media", "data.max_skip_rate", "data.skip_rate_min_samples",
    "train.shared_prefix",  # the same losses and gradients either way (tests/test_shared_prefix.py)
    # where the vLLM server runs and how it is reached, not what it samples (rollout.backend is kept)
    "rollout.vllm_url", "rollout.vllm_python", "rollout.vllm_port", "rollout.vllm_start_timeout_s",
    "rollout.vllm_request_timeout_s", "rollout.vllm_kv_cache_gib", "rollout.vllm_gpu_memory_utilization",
    "rollout.vllm_weight_transfer",
)


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested config dict -> {dotted key: value}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def training_config(cfg_or_dict: Any) -> dict:
    """{dotted key: value} of the keys that shape training (all but RESUME_IGNORED_KEYS)."""
    d = cfg_or_dict if isinstance(cfg_or_dict, dict) else to_dict(cfg_or_dict)
    return {k: v for k, v in flatten(d).items() if k not in RESUME_IGNORED_KEYS}


def config_hash(cfg_or_dict: Any) -> str:
    """sha256 of the keys that shape training (stable across runs and key order)."""
    blob = json.dumps(training_config(cfg_or_dict), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} of the training-shaping keys that differ between two config dicts
    (a key missing on one side, e.g. from an older version, reads as '<absent>')."""
    a, b = training_config(old), training_config(new)
    return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>")}


def load_config(path: str | None = None, overrides: list[str] | None = None, cls: type = Config) -> Any:
    """Load `cls` from a YAML file (optional) plus `--key value` overrides (our dotted keys or TRL's
    flat names), validated."""
    data: dict = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    cli = parse_overrides(list(overrides or []))
    if cls is Config:
        data, file_keys, file_trl = translate_trl_names(data, f"config file {path}")
        cli, cli_keys, cli_trl = translate_trl_names(cli, "the command line")
        epsilon_given = "epsilon" in file_trl | cli_trl
    data = _merge(data, cli)
    if cls is Config and epsilon_given and "algo.eps_high" not in file_keys | cli_keys:
        # TRL: epsilon_high defaults to epsilon. Here too, unless algo.eps_high is given (under either name).
        _set(data, "algo.eps_high", data["algo"]["eps_low"])
    cfg = from_dict(cls, data)
    return cfg.validate() if hasattr(cfg, "validate") else cfg


def parse_cli(argv: list[str], cls: type = Config) -> Any:
    """`--config FILE` plus overrides, as every entry point takes them."""
    argv = list(argv)
    path = None
    for i, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                path = arg.split("=", 1)[1]
                del argv[i]
            else:
                if i + 1 >= len(argv):
                    raise ConfigError("--config needs a file path")
                path = argv[i + 1]
                del argv[i : i + 2]
            break
    return load_config(path, argv, cls)
