"""7B on 8 GPUs with DeepSpeed ZeRO-3, simulated: the memory of one T-GRPO step, without GPUs.

    python benchmarks/simulate_7b_zero3.py                               # full depth (28 layers, 32 blocks)
    python benchmarks/simulate_7b_zero3.py --layers 2 --vision-depth 2   # reduced depth (minutes on 2 cores)
    python benchmarks/simulate_7b_zero3.py --shared-prefix off           # only the repeated forward

Both forms of our forward by default (--shared-prefix on|off|both), each in its own process, reported
as simulate_7b.py reports them: "ours" (train.shared_prefix: true, the default: one packed sequence per
prompt group, the prompt's prefill once in the rollout) and "ours_repeated" (G sequences of prompt +
completion). Both run through the same ZeRO-3 engine; the shared prefix's patches are simulate_7b's
(sim_causal_attention, sim_packed_position_ids, expand_cache: see its docstring).

The DeepSpeed counterpart of benchmarks/simulate_7b.py (read its docstring first: the model, the shapes,
the attention and vision patches, the inputs and the phases are that script's, imported from it). What
differs is the engine: train.engine = "deepspeed" with configs/zero3.json, built by our own code as the
trainer builds it (videor1.session.build_models): videor1.engine.load_deepspeed_config, the
HfDeepSpeedConfig of videor1.engine.hf_deepspeed_context kept alive while the models are built (so
transformers' _from_config builds them inside deepspeed.zero.Init: every parameter is partitioned as
its module is constructed), videor1.policy.PolicyModule, videor1.engine.build_engine (DeepSpeedEngine:
deepspeed.initialize with the engine's AdamW; ZeRO-3 with bf16 keeps bf16 partitions plus an fp32
master partition and AdamW's moments in fp32), the frozen bf16 reference as a second ZeRO-3 engine.

What runs: real DeepSpeed 0.19 code (zero.Init, the ZeRO-3 parameter coordinator and its all-gather /
release hooks, the IPG gradient buckets and reduce-scatter, the stage-3 optimizer step) under torch's
FakeTensorMode on one process that is rank 0 of a fake world of 8 (torch's "fake" process group:
collectives are no-ops with the right output shapes), with DS_ACCELERATOR=cpu (no GPU here). Memory is
counted by torch.distributed._tools.mem_tracker.MemTracker, entered before the models are built (so
every DeepSpeed buffer is seen), with categories for ZeRO-3 (ZeroMemTracker below): each tensor's
storage is labelled by what DeepSpeed holds it as; the categories add up to the total.

Shims (this script only), each replacing a host-side read of tensor values, which fake tensors do not
have, or a CPU-only piece that a GPU run does not have:
  - deepspeed.runtime.zero.stage3.is_invalid_grad_norm -> False: the optimizer step reads
    bool(~isfinite(norm) | norm < 0) to skip a step on a non-finite gradient norm.
  - partitioned_param_coordinator.assert_ints_same_as_other_ranks -> no-op: after the first
    forward + backward ZeRO-3 checks that every rank recorded the same module / parameter trace
    (a broadcast and .item()); one simulated rank is the same as the others by construction.
  - deepspeed.comm.torch.build_shm_op -> None: the CPU accelerator JIT-compiles a shared-memory
    all-reduce extension (CPU inference all-reduce); the CUDA accelerator has none.
  - the optimizer step: videor1.engine.DeepSpeedEngine.step() calls DeepSpeed's engine.step() and
    then float(get_global_grad_norm()) (a host read); here DeepSpeed's engine.step() is called
    directly (policy.engine.step()), the rest of ours (the norm's float, the LR scheduler) is host-side.
Patches of the simulation itself (not of DeepSpeed or videor1):
  - attention: simulate_7b's sim_flash, re-registered to find a vision cu_seqlens' segments by its
    length (install_attention: ZeRO-3's hooks pass every tensor of the root's inputs on as an alias);
    with the shared prefix the one video's cu_seqlens (the only ones that run). The shared-prefix
    attention wraps it by name, looked up at call time, so it wraps this registration. The packed
    positions are looked up by the group's PrefixLayout (not a tensor: ZeRO-3's aliasing leaves it be).
  - MemTracker: no gradient hooks on frozen parameters (MemTracker registers one on every parameter,
    which raises on the reference's); ModTracker's post-backward callbacks queued by no-grad forwards
    (rollout, reference) are dropped at each top-level call (ZeroMemTracker.reset_mod_stats).
  - AdamW runs foreach (torch's choice for CUDA tensors; for CPU tensors, as these are, it picks its
    per-tensor loop, which over ZeRO's one flat fp32 partition holds one more partition-sized temporary).
  - AdamW's moments exist before the step (init_optimizer_states; --first-step leaves them out): every
    step after the first holds them through its rollout, reference and policy phases.
Not as on a GPU: DS_ACCELERATOR=cpu is a "synchronized device" to DeepSpeed: no side streams, so no
record_stream and no overlap of communication with compute (overlap_comm has no effect). On a GPU the
caching allocator keeps freed blocks until the side stream has used them: transient all-gather and
reduce buffers live a little longer there than here (not tensors' bytes, part of the flat margin).
FLOPs are not counted here: the model's are the same as under FSDP2 (benchmarks/simulate_7b.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: no GPU here
os.environ.setdefault("DS_BUILD_OPS", "0")
os.environ.setdefault("LOCAL_RANK", "0")

import simulate_7b as sim  # noqa: E402  (sets HF_HUB_OFFLINE, TRANSFORMERS_DISABLE_TORCH_CHECK; imports torch)
import torch  # noqa: E402
from torch.distributed._tools.common_utils import get_untyped_storages  # noqa: E402
from torch.distributed._tools.mem_tracker import MemTracker, _RefType, _UpdateType, _WeakRefInfo  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
from torch.utils.weak import WeakIdKeyDictionary  # noqa: E402

GB = sim.GB


# ---- the shims (see the module docstring) --------------------------------------------------------------

def install_zero3_shims() -> None:
    import importlib

    import deepspeed.runtime.zero.partitioned_param_coordinator as ppc
    import deepspeed.runtime.zero.stage3 as s3

    s3.is_invalid_grad_norm = lambda norm: False
    ppc.assert_ints_same_as_other_ranks = lambda ints: None
    # (the module by name: the attribute deepspeed.comm.torch is the torch package itself)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


# ---- attention: simulate_7b.sim_flash, found through DeepSpeed's aliases --------------------------------

SEGMENTS_BY_LENGTH: dict[int, list[int]] = {}  # len(cu_seqlens) -> its segment lengths (from the real grid)


def install_attention(g: dict) -> None:
    """simulate_7b.sim_flash finds a vision cu_seqlens' segments by the tensor's id. ZeRO-3's module hooks
    hand every positional tensor argument on as a detached alias (parameter_offload's
    _post_backward_module_hook applies an autograd Function, output.detach(), to every tensor in the
    root's positional model_inputs dict, in place), so the tensor that reaches attention is not the one
    simulate_7b.model_inputs registered. Every group here has the same grid: the frames' and windows'
    cu_seqlens are told apart by their lengths (checked to differ)."""
    from transformers import AttentionInterface

    frames, windows = len(g["seg"]) + 1, len(g["seg_win"]) + 1
    if frames == windows:
        raise ValueError("frame and window cu_seqlens of the same length: cannot tell them apart")
    SEGMENTS_BY_LENGTH.update({frames: g["seg"], windows: g["seg_win"]})

    def sim_flash(module, q, k, v, attention_mask=None, **kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None:
            sim.SEGMENTS[id(cu)] = SEGMENTS_BY_LENGTH[cu.shape[0]]
        return sim.sim_flash(module, q, k, v, attention_mask, **kwargs)

    AttentionInterface.register("sim_flash", sim_flash)


# ---- memory accounting for ZeRO-3 ------------------------------------------------------------------------

class ZeroRefType(_RefType):
    """MemTracker's categories for DeepSpeed ZeRO-3 (MemTracker's own are mapped onto these)."""

    SHARDED_PARAM = "Sharded Param"        # the policy's bf16 partitions (param.ds_tensor)
    MASTER_PARAM = "fp32 Master"           # the policy's fp32 master partitions (the optimizer's params)
    REFERENCE_PARAM = getattr(sim, "REFERENCE_CATEGORY", "Reference Param (sharded bf16)")  # the reference's partitions
    UNSHARDED_PARAM = "Unsharded Param"    # gathered parameters (param.data while available; persistent ones)
    BUFFER = "Buffer"
    SHARDED_GRAD = "Sharded Grad"          # the gradient partitions (grad_accum_dtype) and the step's fp32 copy
    UNSHARDED_GRAD = "Unsharded Grad"      # full parameter gradients from autograd, before bucketing
    ACT = "Activation"
    TEMP = "Temp"
    ALL_GATHER = "All Gather"              # all-gather output buffers (before the per-parameter copies)
    REDUCE_SCATTER = "Reduce Scatter"      # the IPG gradient buckets and reduce-scatter inputs
    OPT = "OptState"
    OTH = "Other"                          # alive after the build and none of the above


MAP = {"Parameter": ZeroRefType.UNSHARDED_PARAM, "Buffer": ZeroRefType.BUFFER, "Gradient": ZeroRefType.UNSHARDED_GRAD,
       "Activation": ZeroRefType.ACT, "Temp": ZeroRefType.TEMP, "Optstate": ZeroRefType.OPT, "Other": ZeroRefType.OTH}
CATEGORY_ORDER = [c.value for c in ZeroRefType]


class ZeroMemTracker(MemTracker):
    """MemTracker with ZeRO-3 categories: a storage labelled with label(..., fixed=True) keeps its label
    whatever MemTracker later calls it (a ZeRO parameter's data is what the module hooks see; a bucket
    view is what the gradient hooks see); MemTracker's PARAM (a module's parameter with storage: under
    ZeRO-3 always a gathered one) is Unsharded Param, GRAD Unsharded Grad. Collectives' buffers are
    labelled as they are dispatched."""

    def __init__(self):
        super().__init__()
        self._ref_class = ZeroRefType
        self._fixed = WeakIdKeyDictionary()

    def _label_of(self, st, reftype):
        fixed = self._fixed.get(st)
        if fixed is not None:
            return fixed
        return reftype if isinstance(reftype, ZeroRefType) else MAP[reftype.value]

    def _update_and_maybe_create_winfos(self, t, reftype, update_existing=False):
        winfos = set()
        for st in get_untyped_storages(t):
            label = self._label_of(st, reftype)
            winfo, _ = self._WINFO.get(st, (None, None))
            if winfo is not None:
                if winfo.reftype != label:
                    old = winfo.reftype
                    winfo.reftype = label
                    self._update_snap(_UpdateType.REF, winfo, old_reftype=old)
            elif update_existing:
                raise KeyError("No existing winfo found")
            else:
                winfo, w_st = _WeakRefInfo.create_winfo(st, t.device, label, self._delete_callback)
                self._WINFO[st] = (winfo, w_st)
                if winfo.mem_consumed > 0:
                    self._update_snap(_UpdateType.ADD, winfo)
            winfos.add(winfo)
        return winfos

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        # MemTracker would register a gradient hook on every parameter, which fails on a frozen one (the
        # reference): its gradient hooks only for parameters that have gradients
        frozen = [p for p in module.parameters() if not p.requires_grad]
        for p in frozen:
            self._param_to_grad_hook_handles.setdefault(p, ())  # "already hooked"
        try:
            return super()._track_module_params_and_buffers(module, install_grad_hooks)
        finally:
            for p in frozen:
                if self._param_to_grad_hook_handles.get(p) == ():
                    del self._param_to_grad_hook_handles[p]

    def reset_mod_stats(self) -> None:
        super().reset_mod_stats()
        # ModTracker queues a post-backward callback for each module whose inputs need no gradient, run at
        # the next backward: a no-grad forward (rollout, reference) has none, and its modules' stats are
        # gone with this reset (MemTracker's post-backward hook would raise KeyError on them)
        self._mod_tracker._post_bw_callbacks_to_enqueue.clear()

    def _pre_bw_hook(self, module, args) -> None:
        if module is None or module in self.memory_tracking:
            super()._pre_bw_hook(module, args)

    def _post_bw_hook(self, module, args) -> None:
        if module is None or module in self.memory_tracking:
            super()._post_bw_hook(module, args)

    def _track(self, reftype, t):
        sts = get_untyped_storages(t)
        if all(st in self._WINFO for st in sts):
            return super()._track(reftype, t)  # a size change of a known storage (labels kept)
        self._update_and_maybe_create_winfos(t, reftype)

    def label(self, tensors, reftype: ZeroRefType, fixed: bool = False) -> None:
        for t in tensors:
            if t is None:
                continue
            if fixed:
                for st in get_untyped_storages(t):
                    self._fixed[st] = reftype
            self._update_and_maybe_create_winfos(t, reftype)

    def relabel(self, old: ZeroRefType, new: ZeroRefType) -> None:
        for _, (winfo, _) in list(self._WINFO.items()):
            if winfo.reftype == old:
                winfo.reftype = new
                self._update_snap(_UpdateType.REF, winfo, old_reftype=old)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        res = super().__torch_dispatch__(func, types, args, kwargs)
        name = getattr(func, "__name__", "")
        if getattr(func, "namespace", None) == "c10d":
            if "allgather" in name:
                self.label(tree_flatten(args[0])[0], ZeroRefType.ALL_GATHER)
            elif "reduce_scatter" in name:
                self.label(tree_flatten(args[1])[0], ZeroRefType.REDUCE_SCATTER)
        return res


def instrument_deepspeed(tracker: ZeroMemTracker) -> None:
    """Label DeepSpeed's tensors as it makes them: a submodule's parameters once the coordinator has
    fetched them, every parameter inside GatheredParameters (the rollout's full weights), the step's
    flat fp32 gradient copy."""
    import deepspeed.runtime.zero.partition_parameters as pp
    import deepspeed.runtime.zero.partitioned_param_coordinator as ppc
    import deepspeed.runtime.zero.stage3 as s3

    coord = ppc.PartitionedParameterCoordinator
    fetch = coord._fetch_sub_module_impl

    def _fetch_sub_module_impl(self, current_submodule, forward, is_leaf):
        fetch(self, current_submodule, forward, is_leaf)
        tracker.label([p.data for p in ppc.iter_params(current_submodule, recurse=is_leaf)],
                      ZeroRefType.UNSHARDED_PARAM)

    coord._fetch_sub_module_impl = _fetch_sub_module_impl

    enter = pp.GatheredParameters.__enter__

    def gathered_enter(self):
        out = enter(self)
        tracker.label([p.data for p in (self.params or [])], ZeroRefType.UNSHARDED_PARAM)
        return out

    pp.GatheredParameters.__enter__ = gathered_enter

    opt = s3.DeepSpeedZeroOptimizer_Stage3
    prep = opt._prepare_fp32_grad_for_sub_group

    def _prepare_fp32_grad_for_sub_group(self, sub_group_id):
        prep(self, sub_group_id)
        tracker.label([self.fp32_partitioned_groups_flat[sub_group_id].grad], ZeroRefType.SHARDED_GRAD)

    opt._prepare_fp32_grad_for_sub_group = _prepare_fp32_grad_for_sub_group


def label_engines(tracker: ZeroMemTracker, policy, reference) -> None:
    """After the build: every storage DeepSpeed keeps, by what it is; the rest of the build's leftovers
    (Activation: nothing has run yet) are Other."""
    zopt = policy.engine.optimizer  # DeepSpeedZeroOptimizer_Stage3
    tracker.label([p.ds_tensor for p in policy.module.parameters()], ZeroRefType.SHARDED_PARAM, fixed=True)
    tracker.label(zopt.fp32_partitioned_groups_flat, ZeroRefType.MASTER_PARAM, fixed=True)
    tracker.track_external(zopt.optimizer)  # AdamW's moments (and step counters): OptState
    tracker.label([zopt.grad_partitions_flat_buffer], ZeroRefType.SHARDED_GRAD, fixed=True)
    tracker.label([b.buffer for b in zopt.ipg_buckets.values() if getattr(b, "buffer", None) is not None],
                  ZeroRefType.REDUCE_SCATTER, fixed=True)
    engines = [policy] + ([reference] if reference is not None else [])
    if reference is not None:
        tracker.label([p.ds_tensor for p in reference.module.parameters()], ZeroRefType.REFERENCE_PARAM, fixed=True)
    for e in engines:
        tracker.label(list(e.module.buffers()), ZeroRefType.BUFFER)
        tracker.label([p.data for p in e.module.parameters() if p.data.numel()], ZeroRefType.UNSHARDED_PARAM)
    tracker.relabel(ZeroRefType.ACT, ZeroRefType.OTH)
    tracker.relabel(ZeroRefType.TEMP, ZeroRefType.OTH)


def init_optimizer_states(policy) -> None:
    """AdamW's moments as every step after the first holds them: torch's AdamW (and so DeepSpeed 0.19's
    stage 3, initialize_optimizer_states) creates them lazily in the first step, so a first step's
    rollout, reference and policy phases would hold no optimizer state. One DeepSpeed sub-group step
    per sub-group on zero gradients, as DeepSpeed's own step runs it (_optimizer_step), creates them."""
    zopt = policy.engine.optimizer
    for i, flat in enumerate(zopt.fp32_partitioned_groups_flat):
        flat.grad = torch.zeros_like(flat)
        zopt._optimizer_step(i)
        flat.grad = None


# ---- one step ---------------------------------------------------------------------------------------------

def run_step(s: dict, meter) -> None:
    """simulate_7b.run_step's phases ("ours" style) on the DeepSpeed engines: the rollout's forwards go
    straight through the HF model (full_weights detaches ZeRO-3's module hooks while every partition is
    gathered: no hooks left to route through the engine's root), and the step is DeepSpeed's own (reduce,
    clip, AdamW on the fp32 partitions, copy to the bf16 partitions, zero the gradients; see the module
    docstring for why not videor1's DeepSpeedEngine.step)."""
    def forward(module, inputs: dict, cache):
        return module.hf(**inputs, cache=cache, use_cache=True, logits_to_keep=1)

    sim.run_step({**s, "style": "ours", "rollout_forward": forward, "optimizer_step": s["policy"].engine.step},
                 meter)


def simulate_zero3(layers: int = 28, vision_depth: int = 32, per_device_batch: int = 2, completion_len: int = 768,
                   world: int = 8, first_step: bool = False, config_path: str | None = None,
                   shared_prefix: bool = True) -> dict:
    """One rank's T-GRPO step ("ours": fused loss, per-device batch `per_device_batch`; shared_prefix:
    train.shared_prefix, the packed forward and the shared prefill, as simulate_7b.simulate) under DeepSpeed
    ZeRO-3 on a fake world of `world` ranks: a step after the first (AdamW's moments already held; see
    init_optimizer_states) unless first_step. Returns a dict of results (peaks: phase -> category -> bytes)."""
    import deepspeed
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import AutoConfig

    from videor1.config import load_config
    from videor1.engine import build_engine, hf_deepspeed_context, load_deepspeed_config
    from videor1.policy import PolicyModule

    t0 = time.monotonic()
    sim.install_patches()
    install_zero3_shims()
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    deepspeed.init_distributed(dist_backend="fake")
    cfg = load_config(os.path.join(ROOT, "configs", "qwen25vl_7b_tgrpo_8gpu.yaml"))
    cfg.train.engine = "deepspeed"
    if not os.path.isabs(cfg.train.deepspeed_config):
        cfg.train.deepspeed_config = os.path.join(ROOT, cfg.train.deepspeed_config)
    cfg.rollout.max_completion_length = completion_len
    G = cfg.rollout.num_generations
    batch = per_device_batch
    micro_batches = batch * cfg.optim.grad_accum  # one micro-batch per prompt group, as videor1.train
    ds_config = load_deepspeed_config(cfg, micro_batches)
    path = config_path or tempfile.mkdtemp(prefix="qwen25vl_7b_config_")
    sim.write_config(path, layers, vision_depth)
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    g = sim.group_inputs(hf_config, cfg.data, G, completion_len)
    g1 = sim.shared_inputs(hf_config, cfg.data, g, completion_len) if shared_prefix else None
    install_attention(g1 if shared_prefix else g)  # the only vision inputs that run
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        tracker = ZeroMemTracker()  # entered before the build: every DeepSpeed allocation is seen
        instrument_deepspeed(tracker)
        with tracker:
            keep = hf_deepspeed_context(ds_config)  # _from_config builds inside deepspeed.zero.Init

            def build(trainable: bool):
                hf = sim.build_model(hf_config, torch.float32 if trainable else torch.bfloat16, shared_prefix)
                module = PolicyModule(hf, kernel_backend="torch", temperature=cfg.rollout.temperature)
                if not trainable:
                    module.requires_grad_(False)
                return build_engine(cfg, module, 1, micro_batches, trainable=trainable, ds_config=ds_config)

            policy = build(True)
            reference = build(False) if cfg.algo.beta > 0 else None
            del keep
            label_engines(tracker, policy, reference)
            # torch's AdamW runs its foreach implementation on CUDA tensors and its per-tensor loop on CPU
            # ones (these): foreach, as on a GPU (over ZeRO's one flat fp32 partition the per-tensor loop
            # holds two partition-sized temporaries, foreach one)
            for group in policy.engine.optimizer.optimizer.param_groups:
                group["foreach"] = True
            if not first_step:
                init_optimizer_states(policy)
            after_build = dict(next(iter(tracker.get_tracker_snapshot().values())))
            s = dict(policy=policy, reference=reference, mode=mode, g=g, cfg=cfg, hf_config=hf_config, G=G,
                     P=g["prompt_len"], C=completion_len, batch=batch, shared_prefix=shared_prefix, g1=g1)
            meter = sim.MemoryMeter(tracker)
            run_step(s, meter)
            after_step = dict(next(iter(tracker.get_tracker_snapshot().values())))
        params = sum(p.ds_numel for p in policy.module.parameters())
        shard = sum(p.ds_tensor.numel() for p in policy.module.parameters())
        ref_bytes = 0 if reference is None else sum(p.ds_tensor.numel() * 2 for p in reference.module.parameters())
        persistent = sum(p.ds_numel for p in policy.module.parameters() if p.ds_persist)
        # DeepSpeed accumulates gradients in the model's dtype (bf16) unless the JSON sets
        # data_types.grad_accum_dtype: configs/zero3.json does not, so the partitions are bf16
        grad_dtype = str(policy.engine.optimizer.gradient_accumulation_dtype)
    as_str = lambda d: {getattr(k, "value", k): int(v) for k, v in d.items()}  # noqa: E731
    return dict(style="ours", shared_prefix=shared_prefix, engine="deepspeed_zero3", first_step=first_step,
                layers=layers, vision_depth=vision_depth, world=world,
                per_device_batch=batch, G=G, completion_len=completion_len, prompt_len=g["prompt_len"],
                video_tokens=g["video_tokens"], frame_hw=g["frame_hw"], params=params, shard_numel=shard,
                persistent_params=persistent, reference_shard_bytes=ref_bytes, grad_accum_dtype=grad_dtype,
                ds_config={k: v for k, v in ds_config.items()},
                after_build=as_str(after_build), after_step=as_str(after_step),
                peaks={p: as_str(c) for p, c in meter.peaks.items()},
                seconds=round(time.monotonic() - t0, 1))


# ---- report ---------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--vision-depth", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2, help="prompts per GPU (default: the 7B config's 2)")
    ap.add_argument("--completion", type=int, default=768)
    ap.add_argument("--shared-prefix", choices=["on", "off", "both"], default="both",
                    help="the shared-prefix forward (results 'ours'), repeated (results 'ours_repeated') or both")
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    ap.add_argument("--margin-gb", type=float, default=4.0, help="CUDA context, NCCL and allocator slack (not tensors)")
    ap.add_argument("--first-step", action="store_true", help="the very first step (no optimizer state before it)")
    ap.add_argument("--json", help="write the results here ({label: result}, label 'ours' / 'ours_repeated')")
    ap.add_argument("--one", choices=["ours", "ours_repeated"], help=argparse.SUPPRESS)  # run_isolated's child
    args = ap.parse_args(argv)
    if args.one:
        res = simulate_zero3(args.layers, args.vision_depth, args.batch, args.completion, first_step=args.first_step,
                             shared_prefix=args.one == "ours")
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, default=str)
        return res
    t0 = time.monotonic()
    results = {}
    for label in {"on": ["ours"], "off": ["ours_repeated"], "both": ["ours", "ours_repeated"]}[args.shared_prefix]:
        results[label] = res = run_isolated(args, label)
        peak = max(v.get("Total", 0) for v in res["peaks"].values())
        form = "shared prefix" if res["shared_prefix"] else "repeated, train.shared_prefix: false"
        print(f"\n== {label} ({form}), DeepSpeed ZeRO-3 (configs/zero3.json): Qwen2.5-VL-{res['params'] / 1e9:.2f}B "
              f"({res['layers']} layers, vision depth {res['vision_depth']}) over {res['world']} fake ranks, per-device "
              f"batch {res['per_device_batch']}, G = {res['G']}, {res['video_tokens']} video tokens ({res['frame_hw'][0]}x"
              f"{res['frame_hw'][1]}), prompt {res['prompt_len']}, completions {res['completion_len']}  [{res['seconds']} s]")
        print(sim.table(res, CATEGORY_ORDER))
        print(f"({'the first step' if res['first_step'] else 'a step after the first (AdamW moments held throughout)'}; "
              f"before the step: {res['after_build'].get('Total', 0) / GB:.2f} GB; "
              f"{res['persistent_params'] / 1e6:.2f} M parameters persistent (never partitioned away, "
              f"stage3_param_persistence_threshold); the reference's bf16 partitions {res['reference_shard_bytes'] / GB:.2f} GB; "
              f"gradients accumulated in {res['grad_accum_dtype'].removeprefix('torch.')})")
        print(f"peak per GPU: {peak / GB:.2f} GB of tensors (+ {args.margin_gb:.0f} GB margin = "
              f"{peak / GB + args.margin_gb:.2f} GB of {args.gpu_gb:.0f} GB)")
    if "ours" in results and "ours_repeated" in results:
        print("\n== shared prefix vs repeated (ZeRO-3): peak per GPU by phase, GB:",
              ", ".join(f"{p} {results['ours']['peaks'][p]['Total'] / GB:.2f} vs "
                        f"{results['ours_repeated']['peaks'][p]['Total'] / GB:.2f}" for p in results["ours"]["peaks"]))
    print(f"total: {time.monotonic() - t0:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)
    return results


def run_isolated(args, label: str) -> dict:
    """simulate_zero3 in a fresh process (DeepSpeed's, the tracker's and the patches' state are per process)."""
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--one", label, "--layers", str(args.layers),
               "--vision-depth", str(args.vision_depth), "--batch", str(args.batch), "--completion",
               str(args.completion), "--json", out] + (["--first-step"] if args.first_step else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ZeRO-3 simulation ({label}) failed:\n{proc.stderr[-3000:]}")
        with open(out, encoding="utf-8") as f:
            return json.load(f)


if __name__ == "__main__":
    main()
