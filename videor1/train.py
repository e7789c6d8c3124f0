"""T-GRPO training entry point.

    torchrun --nproc_per_node=8 videor1/train.py --config configs/qwen25vl_7b_tgrpo_8gpu.yaml
    torchrun --nproc_per_node=2 videor1/train.py --config configs/tiny_cpu.yaml --train.max_steps 10

One step on every rank: take prompts -> G rollouts on ordered frames and Gs on shuffled frames (with
the full weights gathered once) -> rewards -> temporal bonus per prompt group -> group advantages ->
reference (and old) log-probs -> fused loss on the completion positions, backward, optimiser step.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as a script: don't let videor1/*.py shadow top-level packages
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import dataclasses
import importlib
import logging
import math
import time
from collections import Counter

import torch

from videor1 import distributed as D
from videor1 import session
from videor1.config import Config, ConfigError, parse_cli, to_dict
from videor1.data import load_rows
from videor1.metrics import (MetricsLogger, StepTimer, check_report_to, peak_memory_gb, plot_curves, read_metrics,
                             summary_table)
from videor1.rewards import get_reward, set_video_r1_compat
from videor1.forward import build_inputs
from videor1.rollout import HFBackend, Prompt, Request, decode, truncated_completions, vision_token_ids
from videor1.rollout import sampling_mode  # noqa: F401 - its old home; tests and users import it from here
from videor1.sampler import PromptSampler
from videor1.tgrpo import batch_reward_std, group_advantages, group_rewards, group_stats

log = logging.getLogger("videor1.train")

SUMMARY_KEYS = ["loss", "reward", "reward/accuracy", "reward/format", "acc/ordered", "acc/shuffled",
                "temporal_bonus_rate", "kl", "clip_ratio", "completion_length", "grad_norm", "reward_std",
                "frac_reward_zero_std", "clipped_ratio"]


# ------------------------------------------------------------------------------------------------
# Setup checks: everything that can be wrong with the config fails here, before any model loads.


def check_config(cfg: Config) -> None:
    session.check_paths(cfg)
    for module in cfg.algo.reward_modules:
        try:
            importlib.import_module(module)  # lets user modules @register_reward before names are checked
        except ModuleNotFoundError as e:
            raise ConfigError(f"algo.reward_modules: cannot import {module!r} ({e}); is it on PYTHONPATH?") from None
    set_video_r1_compat(cfg.algo.video_r1_compat_rewards)  # before any reward is computed, on every rank
    if "accuracy" not in cfg.algo.rewards:
        raise ConfigError("algo.rewards must include 'accuracy' (the temporal and length rules read it)")
    for name in cfg.algo.rewards:
        try:
            get_reward(name)
        except KeyError as e:
            raise ConfigError(f"algo.rewards: {e.args[0]}") from None
    if cfg.algo.reward_weights and len(cfg.algo.reward_weights) != len(cfg.algo.rewards):
        raise ConfigError(f"algo.reward_weights has {len(cfg.algo.reward_weights)} entries but algo.rewards has "
                          f"{len(cfg.algo.rewards)} ({cfg.algo.rewards}): give one weight per reward, or none")


class SafeRewards:
    """Reward functions that never take the run down: an exception gives 0 for that answer, is
    counted, and is logged once per (reward, exception type). Returns float32 [n] CPU tensors."""

    def __init__(self, names: list[str]):
        self.fns = {name: get_reward(name) for name in names}
        self.errors: Counter = Counter()

    def __call__(self, texts: list[str], row: dict, only: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for name, fn in self.fns.items():
            if only is not None and name not in only:
                continue
            vals = []
            for text in texts:
                try:
                    vals.append(float(fn(text, row)))
                except Exception as e:  # noqa: BLE001 - any user reward failure is contained here
                    kind = (name, type(e).__name__)
                    if not self.errors[kind]:
                        log.warning("reward %r raised %s (%s) on problem %s; scoring 0 (logged once per kind)",
                                    name, type(e).__name__, e, row.get("problem_id"))
                    self.errors[kind] += 1
                    vals.append(0.0)
            out[name] = torch.tensor(vals)
        return out

    @property
    def total_errors(self) -> int:
        return int(sum(self.errors.values()))

    def state_dict(self) -> dict:  # the counts survive a resume
        return {"errors": [[name, kind, n] for (name, kind), n in self.errors.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.errors = Counter({(name, kind): int(n) for name, kind, n in state["errors"]})


@dataclasses.dataclass
class Group:
    """One prompt's rollouts: G ordered completions (these train) plus the shuffled ones' accuracy.

    Device tensors (the model's device): the prompt, completion_ids [G, C], mask [G, C] (attention:
    up to and including the first EOS), loss_mask [G, C] (mask, with truncated completions zeroed
    under algo.mask_truncated_completions), and the reference / old log-probs [G, C]. CPU tensors
    (rewards are CPU work): lengths [G], loss_lengths [G] (tokens in the loss), truncated bool [G]
    (reached max_completion_length without EOS), rewards, total [G], advantages [G],
    shuffled_accuracy [Gs]; texts: the G decoded completions.
    """

    prompt: Prompt
    completion_ids: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    rewards: dict
    total: torch.Tensor = None
    advantages: torch.Tensor = None
    shuffled_accuracy: torch.Tensor | None = None
    temporal_applied: bool | None = None
    ref_logprobs: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    texts: list[str] | None = None
    truncated: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    loss_lengths: torch.Tensor | None = None
    weight: float = 1.0  # 0: a copy that only keeps the ranks' passes in step (balance_groups)
    rollout_logprobs: torch.Tensor | None = None  # [G, C] the sampler's log-probs (vLLM), device

    def __post_init__(self):
        if self.truncated is None:
            self.truncated = torch.zeros(self.lengths.shape, dtype=torch.bool)
        if self.loss_mask is None:
            self.loss_mask = self.mask
        if self.loss_lengths is None:
            self.loss_lengths = self.lengths


@dataclasses.dataclass
class StepContext:
    """What one T-GRPO step needs besides its prompts: the config, the engines and the tokenizer."""

    cfg: Config
    policy: object  # an engine (videor1.engine): .device, .full_weights(), __call__, .backward, .step
    reference: object | None
    tokenizer: object
    rewards: SafeRewards
    eos_ids: list[int]
    pad_id: int
    suppress_ids: list[int]
    backend: object | None = None  # a rollout backend (videor1.rollout); None: the HF backend
    rollout_skipped: int = 0  # prompt groups whose rollouts failed (vLLM requests refused twice)

    def rollout_backend(self):
        if self.backend is None:
            self.backend = HFBackend(self.cfg, eos_ids=self.eos_ids, pad_id=self.pad_id, suppress_ids=self.suppress_ids)
        return self.backend

    @property
    def num_shuffled(self) -> int:
        c = self.cfg.rollout
        return c.num_generations // 2 if c.num_shuffled < 0 else c.num_shuffled


def step_count(cfg: Config, sampler: PromptSampler) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    prompts_per_step = cfg.train.per_device_batch_size * cfg.optim.grad_accum
    return max(1, math.ceil(cfg.train.num_epochs * sampler.rows_per_epoch / prompts_per_step))


def optimizer_steps(cfg: Config, steps: int) -> int:
    """Optimiser steps in `steps` training steps: each batch of rollouts is used num_iterations times
    (as TRL counts), so the learning-rate schedule spans steps * num_iterations."""
    return steps * cfg.algo.num_iterations


def loss_scale(cfg: Config, group: Group, groups: list[Group], global_tokens: float) -> tuple[float, dict]:
    """Each group is one micro-batch; scale its loss so the sum over groups is the step's loss."""
    kind = cfg.algo.loss_type
    if kind in ("grpo", "dr_grpo"):
        return 1.0 / len(groups), {}
    if kind == "bnpo":
        return float(group.loss_lengths.sum()) / max(1.0, float(sum(g.loss_lengths.sum() for g in groups))), {}
    # dapo: normalise by the global token count; ranks' gradients are averaged, hence * world size
    return 1.0, {"num_items": max(1.0, global_tokens) / D.world_size()}


def rollout_phase(ctx: StepContext, prompts: list[Prompt], timer: StepTimer, step: int = 0) -> list[Group]:
    """G rollouts per prompt on ordered frames (+ Gs on shuffled frames for videos), scored: every
    request of the step sampled together by the rollout backend (ctx.backend: HF generate with each
    prompt's vision tower and prefill once, or the vLLM server after a weight sync).

    Each prompt crosses to the model's device once (Prompt.to); completions stay there for
    training, and one CPU copy of them feeds the rewards. Completions that hit max_completion_length
    without an EOS are marked truncated; under algo.mask_truncated_completions their loss mask is
    all zero (TRL: they are still scored and still count in their group's advantages). A prompt
    whose ordered or shuffled request failed twice (vLLM) is skipped: ctx.rollout_skipped counts it."""
    cfg, G, Gs = ctx.cfg, ctx.cfg.rollout.num_generations, ctx.num_shuffled
    backend = ctx.rollout_backend()
    with timer("weight_sync"):
        backend.sync_weights(ctx.policy, step)  # vLLM: the weights of the last optimiser step; HF: nothing
    groups: list[Group] = []
    with timer("rollout"):
        prompts = [p.to(ctx.policy.device) for p in prompts]
        shuffled = [cfg.algo.temporal and p.shuffled_vision is not None and Gs > 0 for p in prompts]
        requests = [Request(p, p.vision, G) for p in prompts]
        requests += [Request(p, p.shuffled_vision, Gs) for p, s in zip(prompts, shuffled) if s]
        samples = backend.sample(ctx.policy, requests, step)
        ordered, rest = samples[:len(prompts)], iter(samples[len(prompts):])
        for p, got, s in zip(prompts, ordered, shuffled):
            got_shuffled = next(rest) if s else None
            if got is None or (s and got_shuffled is None):
                ctx.rollout_skipped += 1
                log.warning("problem %s: its rollouts failed twice; group skipped (%d so far)",
                            p.row.get("problem_id"), ctx.rollout_skipped)
                continue
            ids, mask = got.ids, got.mask
            ids_cpu, mask_cpu = ids.cpu(), mask.cpu()
            texts = decode(ctx.tokenizer, ids_cpu, mask_cpu)
            g = Group(p, ids, mask, mask_cpu.sum(1), ctx.rewards(texts, p.row), texts=texts,
                      truncated=truncated_completions(ids_cpu, mask_cpu, ctx.eos_ids, cfg.rollout.max_completion_length),
                      rollout_logprobs=got.logprobs)
            if cfg.algo.mask_truncated_completions:
                keep = ~g.truncated
                g.loss_mask = mask * keep.to(ctx.policy.device)[:, None]
                g.loss_lengths = g.lengths * keep
            if s:
                texts = decode(ctx.tokenizer, got_shuffled.ids.cpu(), got_shuffled.mask.cpu())
                g.shuffled_accuracy = ctx.rewards(texts, p.row, only=("accuracy",))["accuracy"]
            groups.append(g)
    return groups


def balance_groups(groups: list[Group], target: int) -> list[Group] | None:
    """Every rank runs `target` (the prompts per step) forward/backward passes: FSDP2 and ZeRO-3 gather
    in each, and ZeRO-3's accumulation boundary counts them. A rank that skipped groups repeats its
    first one with weight 0 (no gradient, no metrics). None, on every rank, when some rank has no
    group at all: the step is skipped. Collective."""
    fewest = -int(D.all_reduce_max([-float(len(groups))])[0])
    if fewest == 0:
        return None
    return groups + [dataclasses.replace(groups[0], weight=0.0) for _ in range(target - len(groups))]


def score_groups(cfg: Config, groups: list[Group]) -> None:
    """Weighted rewards -> temporal bonus per prompt group -> group-relative advantages (CPU, pure
    functions). scale_rewards="batch" divides by the std of every reward of the step on every rank:
    a collective (sum, sum of squares and count summed over ranks)."""
    a = cfg.algo
    weights = dict(zip(a.rewards, a.reward_weights))  # empty: every reward weighs 1.0
    for g in groups:
        g.total, parts = group_rewards(
            g.rewards, g.lengths, g.shuffled_accuracy, temporal=a.temporal, alpha=a.alpha, mu=a.mu,
            length_bonus_value=a.length_bonus, length_min=a.length_min, length_max=a.length_max, weights=weights)
        g.temporal_applied = parts["temporal_applied"]
        g.rewards = dict(g.rewards, length_bonus=parts["length_bonus"], temporal_bonus=parts["temporal_bonus"])
    batch_std = None
    if a.scale_rewards == "batch":
        totals = torch.cat([g.total for g in groups]).double()
        sums = D.all_reduce_sum([float(totals.sum()), float((totals * totals).sum()), float(totals.numel())])
        batch_std = batch_reward_std(*sums.tolist())
    for g in groups:
        g.advantages = group_advantages(g.total, cfg.rollout.num_generations, scale=a.scale_rewards, batch_std=batch_std)


def reference_phase(ctx: StepContext, groups: list[Group], timer: StepTimer) -> None:
    """Reference (and, when a batch is reused, old) log-probs of the completion positions (device)."""
    with timer("reference"), torch.no_grad():
        for g in groups:
            inputs = build_inputs(g.prompt, g.completion_ids, g.mask, shared=ctx.cfg.train.shared_prefix,
                                  lengths=g.lengths)
            P = g.prompt.input_ids.numel()
            if ctx.reference is not None:
                g.ref_logprobs = ctx.reference(inputs, P, g.completion_ids, mode="logprobs", completion_mask=g.mask)
            if ctx.cfg.algo.num_iterations > 1:
                g.old_logprobs = ctx.policy(inputs, P, g.completion_ids, mode="logprobs", completion_mask=g.mask)


@dataclasses.dataclass
class PolicyStats:
    """This rank's loss statistics of one step: loss (the step's, summed over groups, averaged over
    iterations) and token-weighted sums of kl and clip_ratio with their token count."""

    loss: float = 0.0
    kl_tokens: float = 0.0
    clip_tokens: float = 0.0
    tokens: float = 0.0
    results: list = dataclasses.field(default_factory=list)


def policy_phase(ctx: StepContext, groups: list[Group], timer: StepTimer) -> PolicyStats:
    """Forward/backward per prompt group through the fused loss, one optimiser step per iteration
    (groups of weight 0 run with a zero loss scale and stay out of the statistics)."""
    cfg = ctx.cfg
    loss_kwargs = dict(beta=cfg.algo.beta, eps_low=cfg.algo.eps_low, eps_high=cfg.algo.eps_high,
                       loss_type=cfg.algo.loss_type, importance_level=cfg.algo.importance_level,
                       kl_clamp=cfg.algo.kl_clamp, max_completion_length=cfg.rollout.max_completion_length)
    real = [g for g in groups if g.weight]  # the rest only keep the ranks' passes in step
    global_tokens = float(D.all_reduce_sum([float(sum(g.loss_lengths.sum() for g in real))])[0])
    stats = PolicyStats()
    for _ in range(cfg.algo.num_iterations):
        with timer("policy"):
            for g in groups:
                scale, extra = loss_scale(cfg, g, real, global_tokens)
                scale *= g.weight
                inputs = build_inputs(g.prompt, g.completion_ids, g.mask, shared=cfg.train.shared_prefix,
                                      lengths=g.lengths)
                loss, m = ctx.policy(inputs, g.prompt.input_ids.numel(), g.completion_ids, mode="loss",
                                     advantages=g.advantages.to(ctx.policy.device), completion_mask=g.loss_mask,
                                     loss_kwargs=dict(loss_kwargs, old_logprobs=g.old_logprobs,
                                                      ref_logprobs=g.ref_logprobs, **extra))
                ctx.policy.backward(loss * scale)
                if not g.weight:
                    continue
                n = float(g.loss_lengths.sum())
                stats.loss += float(loss.detach()) * scale / cfg.algo.num_iterations
                stats.kl_tokens += float(m["kl"]) * n
                stats.clip_tokens += float(m["clip_ratio"]) * n
                stats.tokens += n
        with timer("optimizer"):
            stats.results.append(ctx.policy.step())
    return stats


def tgrpo_step(ctx: StepContext, prompts: list[Prompt], timer: StepTimer,
               step: int = 0) -> tuple[list[Group], PolicyStats | None]:
    """One T-GRPO step on this rank's prompts (CPU Prompts, as PromptStream.take returns them).
    Returns the scored groups (weight-1 ones) and the loss statistics; (groups, None) when some rank
    has no group left (every rollout request of it failed): the step is skipped on every rank."""
    groups = rollout_phase(ctx, prompts, timer, step)
    score_groups(ctx.cfg, groups)
    work = balance_groups(groups, len(prompts))
    if work is None:
        return groups, None
    reference_phase(ctx, work, timer)
    return groups, policy_phase(ctx, work, timer)


def step_record(step: int, groups: list[Group], stats: PolicyStats, timer: StepTimer, step_time: float,
                reward_errors: int, attempted: int, skipped: int, too_long: int = 0, rollout_skipped: int = 0,
                weight_sync: dict | None = None) -> dict:
    """The step's metrics over all ranks (collective): sums summed; means over every rollout (or
    every completion token, for kl and clip_ratio) of every rank; peak memory the largest rank's.

    The names TRL users read, over every prompt group of every rank: reward_std (mean of each group's
    std of the total reward), frac_reward_zero_std (groups whose rewards are all equal: no signal),
    frac_all_correct / frac_all_wrong (groups where every / no ordered rollout has accuracy > 0.1),
    clipped_ratio (ordered completions that hit max_completion_length without an EOS)."""
    cat = lambda key: torch.cat([g.rewards[key] for g in groups])  # noqa: E731
    video = [g for g in groups if g.shuffled_accuracy is not None]
    per_group = [group_stats(g.total, g.rewards["accuracy"]) for g in groups]
    group_sum = lambda key: float(sum(s[key] for s in per_group))  # noqa: E731
    sums = {
        "loss": stats.loss,
        "reward": float(torch.cat([g.total for g in groups]).sum()),
        **{f"reward/{k}": float(cat(k).sum()) for k in groups[0].rewards},
        "completion_length": float(torch.cat([g.lengths for g in groups]).sum()),
        "kl": stats.kl_tokens, "clip_ratio": stats.clip_tokens,
        "n_rollouts": float(sum(g.lengths.numel() for g in groups)), "n_tokens": stats.tokens,
        "n_video": len(video), "shuffled_acc": float(sum(g.shuffled_accuracy.sum() for g in video)),
        "n_shuffled": float(sum(g.shuffled_accuracy.numel() for g in video)),
        "fired": float(sum(bool(g.temporal_applied) for g in video)),
        "seq_tokens": float(sum(g.lengths.sum() + g.lengths.numel() * g.prompt.input_ids.numel() for g in groups)),
        "reward_errors": reward_errors, "attempted": attempted, "skipped": skipped, "too_long": too_long,
        "rollout_skipped": rollout_skipped,
        "n_groups": float(len(groups)), "reward_std": group_sum("reward_std"), "zero_std": group_sum("zero_std"),
        "all_correct": group_sum("all_correct"), "all_wrong": group_sum("all_wrong"),
        "clipped": float(sum(g.truncated.sum() for g in groups)),
    }
    total = dict(zip(sums, (float(v) for v in D.all_reduce_sum(list(sums.values())))))
    world = D.world_size()
    n, tokens = total["n_rollouts"], max(1.0, total["n_tokens"])
    record = {"step": step, "loss": total["loss"] / world,
              **{k: total[k] / n for k in sums if k == "reward" or k.startswith("reward/")},
              "acc/ordered": total["reward/accuracy"] / n,
              "kl": total["kl"] / tokens, "clip_ratio": total["clip_ratio"] / tokens,
              "completion_length": total["completion_length"] / n}
    n_groups = max(1.0, total["n_groups"])
    record.update({"reward_std": total["reward_std"] / n_groups, "frac_reward_zero_std": total["zero_std"] / n_groups,
                   "frac_all_correct": total["all_correct"] / n_groups, "frac_all_wrong": total["all_wrong"] / n_groups,
                   "clipped_ratio": total["clipped"] / n})
    if total["n_video"]:
        record["acc/shuffled"] = total["shuffled_acc"] / total["n_shuffled"]
        record["temporal_bonus_rate"] = total["fired"] / total["n_video"]
    last = stats.results[-1]
    record.update({
        "grad_norm": last.grad_norm, "lr": last.lr, "step_skipped": not all(r.applied for r in stats.results),
        "reward_errors": int(total["reward_errors"]), "samples_skipped": int(total["skipped"]),
        "samples_attempted": int(total["attempted"]), "samples_too_long": int(total["too_long"]),
        "rollouts_skipped": int(total["rollout_skipped"]),
        **{f"time/{k}": v for k, v in timer.times.items()}, "time/step": step_time,
        **{f"weight_sync/{k}": v for k, v in (weight_sync or {}).items()},
        "tokens_per_s": total["seq_tokens"] / step_time, "peak_mem_gb": float(D.all_reduce_max([peak_memory_gb()])[0]),
    })
    return record


def summary_line(record: dict, total_steps: int) -> str:
    """The console line printed every train.logging_steps steps."""
    return (f"step {record['step']}/{total_steps}: reward {record['reward']:.4f} acc {record['acc/ordered']:.3f} "
            f"kl {record['kl']:.5f} loss {record['loss']:.5f} step {record['time/step']:.2f}s")


def completion_sample(step: int, group: Group, limit: int = 4) -> dict:
    """A readable sample of one scored prompt group (train.log_completions): the problem and at most
    `limit` ordered completions with each reward, the total and the advantage."""
    row = group.prompt.row
    return {"step": step, "problem_id": row.get("problem_id"), "problem": row.get("problem"),
            "data_type": row.get("data_type"),
            "completions": [{"text": text, "rewards": {k: float(v[i]) for k, v in group.rewards.items()},
                             "reward": float(group.total[i]), "advantage": float(group.advantages[i])}
                            for i, text in enumerate((group.texts or [])[:limit])]}


def main(argv: list[str] | None = None) -> str:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_cli(sys.argv[1:] if argv is None else argv)
    check_config(cfg)
    check_report_to(cfg.train.report_to)
    rows = load_rows(cfg.data.train_file)

    D.init_distributed(cfg.train.dist_timeout_s)
    rank, world, main_rank = D.rank(), D.world_size(), D.is_main()
    torch.manual_seed(cfg.train.seed * 1000 + rank)
    shuffle_gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + rank)
    sampler = PromptSampler(len(rows), cfg.train.seed, rank, world, cfg.data.shuffle)
    total_steps = step_count(cfg, sampler)
    groups_per_step = cfg.train.per_device_batch_size * cfg.optim.grad_accum
    G = cfg.rollout.num_generations
    Gs = G // 2 if cfg.rollout.num_shuffled < 0 else cfg.rollout.num_shuffled

    # The rollout backend: with vLLM, this node's server starts loading now, while our models build.
    backend = start_rollout_backend(cfg)

    # Models: the policy (trained) and the frozen reference, sharded the same way. The schedule
    # counts optimiser steps (num_iterations per training step).
    processor, policy, reference = session.build_models(cfg, optimizer_steps(cfg, total_steps), groups_per_step,
                                                        cfg.algo.beta > 0)
    tok = processor.tokenizer
    eos_ids, pad_id = session.special_ids(tok)
    if backend is not None:
        backend.configure(eos_ids=eos_ids, pad_id=pad_id, suppress_ids=vision_token_ids(tok),
                          vision_pad_ids=[tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")])
        backend.wait_ready()
    rewards = SafeRewards(cfg.algo.rewards)
    ctx = StepContext(cfg, policy, reference, tok, rewards, eos_ids, pad_id, vision_token_ids(tok), backend=backend)

    # Resume: model, optimiser, scheduler, RNGs, data position and counters, so the next steps match exactly.
    generators = {"shuffle": shuffle_gen}
    stream = session.PromptStream(cfg, rows, processor, sampler, shuffle_gen, shuffled=cfg.algo.temporal)
    stateful = {"stream": stream, "rewards": rewards}
    start_step = session.resume(cfg, policy, stateful, generators)
    ctx.rollout_skipped = stream.rollout_failed
    logger = MetricsLogger(cfg.train.output_dir, cfg.train.report_to, main_rank, resume_step=start_step,
                           run_config=to_dict(cfg))
    session.write_run_config(cfg)
    if main_rank:
        log.info("T-GRPO: %d steps, %d ranks x %d prompts/step, G=%d ordered + %d shuffled rollouts, engine=%s, "
                 "device=%s", total_steps, world, groups_per_step, cfg.rollout.num_generations,
                 ctx.num_shuffled if cfg.algo.temporal else 0, cfg.train.engine, policy.device)
    progress = session.progress_bar(total_steps, start_step, "T-GRPO")

    for step in range(start_step, total_steps):
        timer = StepTimer()
        t0 = time.perf_counter()
        with timer("data"):  # media decoded and patched by the fused kernel; shuffled copies for videos
            prompts = stream.take(groups_per_step)
        groups, stats = tgrpo_step(ctx, prompts, timer, step)
        stream.rollout_failed = ctx.rollout_skipped
        if stats is None:  # some rank has no group left (every rollout request of it failed twice)
            if main_rank:
                log.warning("step %d: a rank has no rollouts left (%d groups skipped so far); no update this step",
                            step + 1, ctx.rollout_skipped)
        else:
            record = step_record(step + 1, groups, stats, timer, time.perf_counter() - t0, rewards.total_errors,
                                 stream.attempted, stream.skipped, stream.too_long, ctx.rollout_skipped,
                                 ctx.rollout_backend().last_sync)
            if record["step_skipped"] and main_rank:
                log.warning("step %d: non-finite gradient (norm %s); update skipped", step + 1, record["grad_norm"])
            stream.check_rate(record["samples_skipped"], record["samples_attempted"])
            logger.log(record)  # every step; the console line and the completions sample every logging_steps
            if main_rank and ((step + 1) % cfg.train.logging_steps == 0 or step + 1 == total_steps):
                log.info(summary_line(record, total_steps))
                if cfg.train.log_completions:
                    logger.log_completions(completion_sample(step + 1, groups[0]))
            if progress is not None:
                progress.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['acc/ordered']:.2f}",
                                     kl=f"{record['kl']:.4f}", refresh=False)
        if progress is not None:
            progress.update(1)

        # Checkpoint (atomic: written to a temp dir, then renamed), with an HF copy in checkpoint-N/hf.
        if cfg.train.save_steps and (step + 1) % cfg.train.save_steps == 0 and step + 1 < total_steps:
            session.checkpoint(cfg, step + 1, policy, stateful, generators,
                               hf_writer=session.hf_writer(policy, processor) if cfg.train.save_hf_checkpoints else None)

    # Final model in HF format (from_pretrained loads it), then the summary and the plot.
    final_dir = os.path.join(cfg.train.output_dir, "final")
    session.save_final(policy, processor, final_dir)
    if main_rank:
        progress.close()
        records = read_metrics(logger.path)
        print("\n" + summary_table(records, SUMMARY_KEYS + ["time/rollout", "time/reference", "time/policy",
                                                           "time/optimizer", "time/step", "tokens_per_s"]))
        png = plot_curves(records, SUMMARY_KEYS, os.path.join(cfg.train.output_dir, "reward_curves.png"),
                          f"T-GRPO ({'temporal' if cfg.algo.temporal else 'plain GRPO'})")
        print(f"final model: {final_dir}\nmetrics: {logger.path}\nplot: {png}")
    logger.close()
    ctx.rollout_backend().close()
    D.cleanup()
    return final_dir


def start_rollout_backend(cfg: Config):
    """None for rollout.backend "hf" (StepContext builds it); the vLLM backend otherwise, its server
    starting (videor1.rollout.vllm.start_backend), stopped when this process exits however it exits."""
    if cfg.rollout.backend != "vllm":
        return None
    import atexit

    from videor1.rollout.vllm import start_backend

    backend = start_backend(cfg, log_dir=cfg.train.output_dir)
    atexit.register(backend.close)
    return backend


if __name__ == "__main__":
    main()
