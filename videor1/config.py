"""One dataclass tree for every entry point; loaded from YAML with `--key value` overrides.

    cfg = load_config("configs/tiny_cpu.yaml", ["--rollout.num_generations", "4"])

Unknown keys, wrong types and out-of-range values raise ConfigError naming the dotted key, before
any work starts. Ranges and choices live next to each field (`field(metadata=...)`), so the check
and the default sit in one place.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


def _f(default: Any = dataclasses.MISSING, *, choices=None, ge=None, gt=None, le=None, lt=None, factory=None):
    meta = {k: v for k, v in dict(choices=choices, ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
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
    video_min_pixels: int = _f(128 * 28 * 28, ge=28 * 28)
    video_max_pixels: int = _f(128 * 28 * 28, ge=28 * 28)
    image_min_pixels: int = _f(3136, ge=28 * 28)
    image_max_pixels: int = _f(12845056, ge=28 * 28)
    max_skip_rate: float = _f(0.05, ge=0, le=1)  # stop when more samples than this fail to load
    skip_rate_min_samples: int = _f(50, ge=1)  # ... judged once this many samples were attempted
    shuffle: bool = True
    cache_media: bool = False  # keep decoded frames in memory (small datasets, many epochs)


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


@dataclass
class AlgoConfig:
    temporal: bool = True  # T-GRPO; false = plain GRPO
    alpha: float = _f(0.3, ge=0)  # temporal bonus
    mu: float = _f(0.8, ge=0)  # bonus when p_ordered >= mu * p_shuffled
    scale_rewards: bool = True  # (r - mean) / (std + 1e-4); false = Dr. GRPO's unscaled form
    rewards: list[str] = _f(factory=lambda: ["accuracy", "format"])  # names in videor1.rewards.REWARDS
    reward_modules: list[str] = _f(factory=list)  # modules imported first, to @register_reward your own
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
    lr: float = _f(1e-6, gt=0)
    weight_decay: float = _f(0.0, ge=0)
    adam_beta1: float = _f(0.9, ge=0, lt=1)
    adam_beta2: float = _f(0.999, ge=0, lt=1)
    warmup_ratio: float = _f(0.0, ge=0, le=1)
    scheduler: str = _f("cosine", choices=("cosine", "constant", "linear"))
    max_grad_norm: float = _f(5.0, gt=0)
    grad_accum: int = _f(1, ge=1)


@dataclass
class TrainConfig:
    output_dir: str = "runs/tgrpo"
    seed: int = 0
    max_steps: int = _f(-1, ge=-1)  # -1 = num_epochs over the data
    num_epochs: float = _f(1.0, gt=0)
    per_device_batch_size: int = _f(1, ge=1)  # prompts per rank per micro-step
    engine: str = _f("fsdp2", choices=("fsdp2", "deepspeed"))
    deepspeed_config: str = "configs/zero3.json"
    mixed_precision: str = _f("no", choices=("no", "bf16"))
    save_steps: int = _f(0, ge=0)  # 0 = only at the end
    resume_from: str = ""
    tensorboard: bool = False
    dist_timeout_s: float = _f(600.0, gt=0)  # a collective waiting longer (a dead rank) fails the job


@dataclass
class SFTConfig:
    # "assistant": loss on the assistant turn only (prompt and vision tokens masked);
    # "all_but_vision": Video-R1's SFT, every token but padding and vision placeholders.
    loss_on: str = _f("assistant", choices=("assistant", "all_but_vision"))


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


def load_config(path: str | None = None, overrides: list[str] | None = None, cls: type = Config) -> Any:
    """Load `cls` from a YAML file (optional) plus `--key value` overrides, validated."""
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
    data = _merge(data, parse_overrides(list(overrides or [])))
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
