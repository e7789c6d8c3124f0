"""Distributed engines behind one small interface: FSDP2 (torch) or DeepSpeed ZeRO-3.

    engine = build_engine(cfg, module, num_training_steps, micro_batches_per_step)
    engine.device                      # where the model computes: inputs go there once (Prompt.to)
    out = engine(...)                  # forward of the wrapped root module
    engine.backward(loss)              # once per micro-batch
    result = engine.step()             # clip, optimiser + scheduler step, zero grads; skips non-finite
    with engine.full_weights():        # rollout phase: every weight gathered once, not per token
        engine.module.generate(...)
    engine.save(dir) / engine.load(dir) / engine.save_hf(dir, processor)

The root module is videor1.policy.PolicyModule: its forward runs the HF model and the fused kernels
against lm_head.weight, so both engines have the head's weight gathered when the kernel reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from videor1 import distributed as D
from videor1.config import Config


@dataclasses.dataclass
class StepResult:
    grad_norm: float
    applied: bool  # False when the gradient was non-finite and the step was skipped
    lr: float


def _shard_units(hf_model: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one: HF's own no-split units (decoder layers, vision blocks)."""
    names = set(getattr(hf_model, "_no_split_modules", None) or [])
    units = [m for m in hf_model.modules() if type(m).__name__ in names]
    if not units:
        raise ValueError(f"{type(hf_model).__name__} declares no _no_split_modules to shard")
    return units


def _scheduler(cfg: Config, optimizer: torch.optim.Optimizer, num_training_steps: int):
    from transformers import get_scheduler

    warmup = int(math.ceil(cfg.optim.warmup_ratio * num_training_steps))
    name = {"cosine": "cosine", "constant": "constant_with_warmup", "linear": "linear"}[cfg.optim.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(1, num_training_steps))


def decay_groups(params, weight_decay: float) -> list[dict]:
    """AdamW parameter groups as HF Trainer (and so Video-R1) makes them: biases and norm weights
    (the 1-D parameters) are not decayed. ZeRO-3 partitions hold a flat piece of a parameter: its
    full shape is `ds_shape`."""
    params = list(params)
    matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in params]
    groups = [{"params": [p for p, m in zip(params, matrix) if m], "weight_decay": weight_decay},
              {"params": [p for p, m in zip(params, matrix) if not m], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _adamw(cfg: Config, params) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.AdamW(decay_groups(params, o.weight_decay), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2))


class FSDP2Engine:
    """torch FSDP2: fully_shard per decoder layer and vision block, then the root; AdamW on DTensors."""

    def __init__(self, cfg: Config, module: nn.Module, num_training_steps: int, trainable: bool = True,
                 mesh=None):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        self.cfg = cfg
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        if mesh is None:  # benchmarks/simulate_7b.py passes one made before it enters fake-tensor mode
            mesh = init_device_mesh(device_type, (D.world_size(),))
        device_type = mesh.device_type
        # fully_shard moves the parameters to the mesh's device: this rank's current CUDA device.
        self.device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
        mp = None
        if cfg.train.mixed_precision == "bf16":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs = {"mesh": mesh} if mp is None else {"mesh": mesh, "mp_policy": mp}
        for unit in _shard_units(module.hf):
            fully_shard(unit, **kwargs)
        # The root's inputs include fp32 advantages and reference / old log-probs for the loss: FSDP2
        # would cast every float input of the root to bf16 (rounding log-probs by up to ~0.03 nats).
        # The units below still cast their own inputs; HF casts the patches to the vision dtype.
        root = kwargs if mp is None else {**kwargs, "mp_policy": dataclasses.replace(mp, cast_forward_inputs=False)}
        fully_shard(module, **root)
        register_fsdp_forward_method(module, "generate")
        register_fsdp_forward_method(module, "prefill")  # rollouts' shared prefill (videor1.rollout.generate)
        self.module = module
        self.trainable = trainable
        self.optimizer = self.scheduler = None
        if trainable:
            self.optimizer = _adamw(cfg, [p for p in module.parameters() if p.requires_grad])
            self.scheduler = _scheduler(cfg, self.optimizer, num_training_steps)

    def __call__(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        if not self.trainable:
            # FSDP2 keeps the root's parameters (embeddings, lm_head: 2.2 GB in bf16 at 7B) gathered after
            # forward, expecting a backward; a frozen reference has none (benchmarks/simulate_7b.py)
            self.module.reshard()
        return out

    def _fsdp_modules(self) -> list[nn.Module]:
        from torch.distributed.fsdp import FSDPModule

        return [m for m in self.module.modules() if isinstance(m, FSDPModule)]

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[nn.Module]:
        """All-gather every shard once and keep it gathered for the whole rollout phase (generate would
        otherwise all-gather every layer for every generated token); reshard on exit."""
        modules = self._fsdp_modules()
        inner = [m for m in modules if m is not self.module]
        for m in inner:
            m.set_reshard_after_forward(False, recurse=False)
        for m in modules:
            m.unshard()
        try:
            yield self.module
        finally:
            for m in inner:
                m.set_reshard_after_forward(True, recurse=False)
            for m in modules:
                m.reshard()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> StepResult:
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.max_grad_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        lr = self.scheduler.get_last_lr()[0]
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(norm, False, lr)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm, True, lr)

    def save(self, path: str) -> None:
        """Sharded model + optimiser (torch.distributed.checkpoint) and the scheduler into `path`."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(path, "engine"))
        if D.is_main():
            torch.save(self.scheduler.state_dict(), os.path.join(path, "scheduler.pt"))

    def load(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(self.module, self.optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=os.path.join(path, "engine"))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The HF model's full (unsharded) weights on rank 0's CPU; {} on other ranks."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("hf."): v for k, v in sd.items()} if D.is_main() else {}


class DeepSpeedEngine:
    """DeepSpeed ZeRO (stage from the JSON, 3 for T-GRPO). The JSON's "auto" values are filled from
    the config: micro-batch 1, accumulation = micro-batches per step, clipping, bf16."""

    def __init__(self, cfg: Config, module: nn.Module, num_training_steps: int, micro_batches_per_step: int,
                 ds_config: dict, trainable: bool = True):
        import deepspeed

        self.cfg = cfg
        self.ds_config = ds_config
        # The fused kernels read lm_head.weight outside lm_head's own forward: tell ZeRO-3 to gather it
        # (and route its gradient) whenever the root module runs.
        if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
            deepspeed.zero.register_external_parameter(module, module.hf.lm_head.weight)
        self.optimizer = self.scheduler = None
        if trainable:
            optimizer = _adamw(cfg, [p for p in module.parameters() if p.requires_grad])
            # The scheduler drives the torch optimizer's param_groups, which ZeRO's wrapper reads.
            self.scheduler = _scheduler(cfg, optimizer, num_training_steps)
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        else:
            self.engine, *_ = deepspeed.initialize(model=module, config=ds_config)
            self.engine.eval()
        self.module = self.engine.module
        self.device = torch.device(self.engine.device)  # deepspeed.initialize moved the module there
        self.micro_batches_per_step = micro_batches_per_step

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[nn.Module]:
        """Gather every ZeRO-3 partition once for the rollout phase (as TRL's unwrap_model_for_generation)."""
        import deepspeed

        if self.ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
            yield self.module
            return
        # ZeRO-3's per-module hooks would still all-gather (and release) every layer at every forward
        # call of generate; detach them while the full weights are held, re-attach afterwards.
        offload = getattr(self.engine.optimizer, "parameter_offload", None) or self.engine.parameter_offload
        with deepspeed.zero.GatheredParameters(list(self.module.parameters())):
            for p in self.module.parameters():
                p.ds_active_sub_modules.clear()
            for hook in offload.forward_hooks + offload.backward_hooks:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield self.module
            finally:
                offload._register_deepspeed_module(offload.module)

    def backward(self, loss: torch.Tensor) -> None:
        # Our loss is already scaled by its share of the step; DeepSpeed must not divide it again.
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed only advances its micro-step counter here

    def step(self) -> StepResult:
        lr = self.scheduler.get_last_lr()[0]
        self.engine.step()  # at the boundary: reduce, clip, and skip by itself when the norm is not finite
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        applied = math.isfinite(norm)
        if applied:
            self.scheduler.step()
        return StepResult(norm, applied, lr)

    def save(self, path: str) -> None:
        self.engine.save_checkpoint(os.path.join(path, "engine"), tag="state", save_latest=False)
        if D.is_main():
            torch.save(self.scheduler.state_dict(), os.path.join(path, "scheduler.pt"))

    def load(self, path: str) -> None:
        load_path, _ = self.engine.load_checkpoint(os.path.join(path, "engine"), tag="state")
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}/engine")
        self.scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        import deepspeed

        sd: dict[str, torch.Tensor] = {}
        for name, p in self.module.hf.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                if D.is_main():
                    sd[name] = p.detach().cpu().clone()
        if D.is_main():
            for name, b in self.module.hf.named_buffers():
                sd.setdefault(name, b.detach().cpu().clone())
        return sd


def load_deepspeed_config(cfg: Config, micro_batches_per_step: int) -> dict:
    """The DeepSpeed JSON with its "auto" fields filled from the config; errors name the file."""
    path = cfg.train.deepspeed_config
    if not os.path.isfile(path):
        raise FileNotFoundError(f"train.deepspeed_config file not found: {path}")
    from videor1.config import ConfigError

    try:
        with open(path, encoding="utf-8") as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config {path} is not valid JSON: {e.msg} at line {e.lineno} column "
                          f"{e.colno}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"train.deepspeed_config {path} is not UTF-8 text (byte offset {e.start})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed_config {path} must hold a JSON object, got {type(ds).__name__}")
    fills = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": micro_batches_per_step,
        "gradient_clipping": cfg.optim.max_grad_norm,
    }
    for key, value in fills.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds.pop("train_batch_size", None)
    stray = [k for k, v in ds.items() if v == "auto"]
    if stray:
        raise ValueError(f"{path}: 'auto' is only understood for {sorted(fills)}; set {stray} explicitly")
    bf16 = cfg.train.mixed_precision == "bf16"
    ds["bf16"] = {"enabled": bf16}
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def hf_deepspeed_context(ds_config: dict):
    """Keep transformers' HfDeepSpeedConfig alive so from_pretrained partitions weights while loading
    (ZeRO-3): no rank ever holds the full model."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def build_engine(cfg: Config, module: nn.Module, num_training_steps: int, micro_batches_per_step: int,
                 trainable: bool = True, ds_config: dict | None = None, mesh=None):
    """Wrap `module` (a PolicyModule) in the configured engine (FSDP2: on `mesh`, default one over
    the world on this rank's device)."""
    # from_pretrained leaves a model in eval mode, and transformers' activation checkpointing only runs
    # in training mode: without train(), the 7B config's checkpointing would silently do nothing.
    module.train(trainable)
    if cfg.model.gradient_checkpointing and trainable:
        module.hf.activation_checkpointing_enable()
    if cfg.train.engine == "fsdp2":
        if not dist.is_initialized():
            raise RuntimeError("the fsdp2 engine needs torch.distributed: launch with torchrun")
        return FSDP2Engine(cfg, module, num_training_steps, trainable=trainable, mesh=mesh)
    if ds_config is None:
        ds_config = load_deepspeed_config(cfg, micro_batches_per_step)
    return DeepSpeedEngine(cfg, module, num_training_steps, micro_batches_per_step, ds_config, trainable=trainable)
