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
from videor1.config import Config, ConfigError, parse_cli
from videor1.data import load_rows
from videor1.metrics import MetricsLogger, StepTimer, peak_memory_gb, plot_curves, read_metrics, summary_table
from videor1.rewards import get_reward
from videor1.rollout import decode, generate, training_inputs, vision_token_ids
from videor1.sampler import PromptSampler
from videor1.tgrpo import group_advantages, group_rewards

log = logging.getLogger("videor1.train")

SUMMARY_KEYS = ["loss", "reward", "reward/accuracy", "reward/format", "acc/ordered", "acc/shuffled",
                "temporal_bonus_rate", "kl", "clip_ratio", "completion_length", "grad_norm"]


# ------------------------------------------------------------------------------------------------
# Setup checks: everything that can be wrong with the config fails here, before any model loads.


def check_config(cfg: Config) -> None:
    session.check_paths(cfg)
    for module in cfg.algo.reward_modules:
        importlib.import_module(module)  # lets user modules @register_reward before names are checked
    if "accuracy" not in cfg.algo.rewards:
        raise ConfigError("algo.rewards must include 'accuracy' (the temporal and length rules read it)")
    for name in cfg.algo.rewards:
        try:
            get_reward(name)
        except KeyError as e:
            raise ConfigError(f"algo.rewards: {e.args[0]}") from None


class SafeRewards:
    """Reward functions that never take the run down: an exception gives 0 for that answer, is
    counted, and is logged once per (reward, exception type)."""

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


@dataclasses.dataclass
class Group:
    """One prompt's rollouts: G ordered completions (these train) plus the shuffled ones' accuracy."""

    prompt: object
    completion_ids: torch.Tensor  # [G, C]
    mask: torch.Tensor  # [G, C]
    rewards: dict
    total: torch.Tensor = None
    advantages: torch.Tensor = None
    shuffled_accuracy: torch.Tensor | None = None
    temporal_applied: bool | None = None
    ref_logprobs: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None


def step_count(cfg: Config, sampler: PromptSampler) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    prompts_per_step = cfg.train.per_device_batch_size * cfg.optim.grad_accum
    return max(1, math.ceil(cfg.train.num_epochs * sampler.rows_per_epoch / prompts_per_step))


def loss_scale(cfg: Config, group: Group, groups: list[Group], global_tokens: float) -> tuple[float, dict]:
    """Each group is one micro-batch; scale its loss so the sum over groups is the step's loss."""
    kind = cfg.algo.loss_type
    if kind in ("grpo", "dr_grpo"):
        return 1.0 / len(groups), {}
    if kind == "bnpo":
        return float(group.mask.sum()) / float(sum(g.mask.sum() for g in groups)), {}
    # dapo: normalise by the global token count; ranks' gradients are averaged, hence * world size
    return 1.0, {"num_items": global_tokens / D.world_size()}


def main(argv: list[str] | None = None) -> str:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_cli(sys.argv[1:] if argv is None else argv)
    check_config(cfg)
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

    # Models: the policy (trained) and the frozen reference, sharded the same way.
    processor, policy, reference = session.build_models(cfg, total_steps, groups_per_step, cfg.algo.beta > 0)
    tok = processor.tokenizer
    eos_ids, pad_id = session.special_ids(tok)
    suppress = vision_token_ids(tok)

    # Resume: model, optimiser, scheduler, RNGs and data position, so the next steps match exactly.
    generators = {"shuffle": shuffle_gen}
    stream = session.PromptStream(cfg, rows, processor, sampler, shuffle_gen, shuffled=cfg.algo.temporal)
    start_step = session.resume(cfg, policy, stream, generators)
    rewards = SafeRewards(cfg.algo.rewards)
    logger = MetricsLogger(cfg.train.output_dir, cfg.train.tensorboard, main_rank, resume_step=start_step)
    session.write_run_config(cfg)
    if main_rank:
        log.info("T-GRPO: %d steps, %d ranks x %d prompts/step, G=%d ordered + %d shuffled rollouts, engine=%s",
                 total_steps, world, groups_per_step, G, Gs if cfg.algo.temporal else 0, cfg.train.engine)
    progress = session.progress_bar(total_steps, start_step, "T-GRPO")

    loss_kwargs = dict(beta=cfg.algo.beta, eps_low=cfg.algo.eps_low, eps_high=cfg.algo.eps_high,
                       loss_type=cfg.algo.loss_type, importance_level=cfg.algo.importance_level,
                       kl_clamp=cfg.algo.kl_clamp, max_completion_length=cfg.rollout.max_completion_length)

    for step in range(start_step, total_steps):
        timer = StepTimer()
        t0 = time.perf_counter()
        # 1. Prompts (media decoded, patched by the fused kernel; shuffled copies for videos).
        with timer("data"):
            prompts = stream.take(groups_per_step)

        # 2. Rollouts with the full weights gathered once for the whole phase.
        groups: list[Group] = []
        with timer("rollout"), policy.full_weights() as model:
            for p in prompts:
                ids, mask = generate(model, p, p.vision, G, cfg.rollout, eos_ids, pad_id, suppress_ids=suppress)
                g = Group(p, ids, mask, rewards(decode(tok, ids, mask), p.row))
                if cfg.algo.temporal and p.shuffled_vision is not None and Gs > 0:
                    s_ids, s_mask = generate(model, p, p.shuffled_vision, Gs, cfg.rollout, eos_ids, pad_id,
                                             suppress_ids=suppress)
                    g.shuffled_accuracy = rewards(decode(tok, s_ids, s_mask), p.row, only=("accuracy",))["accuracy"]
                groups.append(g)

        # 3. Rewards -> temporal bonus per prompt group -> group-normalised advantages (pure functions).
        for g in groups:
            g.total, parts = group_rewards(
                g.rewards, g.mask.sum(1), g.shuffled_accuracy, temporal=cfg.algo.temporal, alpha=cfg.algo.alpha,
                mu=cfg.algo.mu, length_bonus_value=cfg.algo.length_bonus, length_min=cfg.algo.length_min,
                length_max=cfg.algo.length_max)
            g.temporal_applied = parts["temporal_applied"]
            g.rewards = dict(g.rewards, length_bonus=parts["length_bonus"], temporal_bonus=parts["temporal_bonus"])
            g.advantages = group_advantages(g.total, G, scale=cfg.algo.scale_rewards)

        # 4. Reference log-probs (and old ones when a batch is reused), completion positions only.
        with timer("reference"), torch.no_grad():
            for g in groups:
                inputs = training_inputs(g.prompt, g.completion_ids, g.mask)
                P = g.prompt.input_ids.numel()
                if reference is not None:
                    g.ref_logprobs = reference(inputs, P, g.completion_ids, mode="logprobs")
                if cfg.algo.num_iterations > 1:
                    g.old_logprobs = policy(inputs, P, g.completion_ids, mode="logprobs")

        # 5. Policy forward/backward per prompt group, then one optimiser step (per iteration).
        global_tokens = float(D.all_reduce_sum([float(sum(g.mask.sum() for g in groups))])[0])
        losses, kls, clips, weights, results = [], [], [], [], []
        for _ in range(cfg.algo.num_iterations):
            with timer("policy"):
                for g in groups:
                    scale, extra = loss_scale(cfg, g, groups, global_tokens)
                    inputs = training_inputs(g.prompt, g.completion_ids, g.mask)
                    loss, m = policy(inputs, g.prompt.input_ids.numel(), g.completion_ids, mode="loss",
                                     advantages=g.advantages, completion_mask=g.mask,
                                     loss_kwargs=dict(loss_kwargs, old_logprobs=g.old_logprobs,
                                                      ref_logprobs=g.ref_logprobs, **extra))
                    policy.backward(loss * scale)
                    losses.append(float(loss.detach()) * scale)
                    kls.append(float(m["kl"]))
                    clips.append(float(m["clip_ratio"]))
                    weights.append(float(g.mask.sum()))
            with timer("optimizer"):
                results.append(policy.step())

        # 6. Metrics, summed over ranks.
        step_time = time.perf_counter() - t0
        n_tok = sum(float(g.mask.sum()) + g.mask.shape[0] * g.prompt.input_ids.numel() for g in groups)
        video = [g for g in groups if g.shuffled_accuracy is not None]
        local = {
            "loss": sum(losses) / cfg.algo.num_iterations,
            "reward": float(torch.cat([g.total for g in groups]).mean()),
            **{f"reward/{k}": float(torch.cat([g.rewards[k] for g in groups]).mean()) for k in groups[0].rewards},
            "acc/ordered": float(torch.cat([g.rewards["accuracy"] for g in groups]).mean()),
            "kl": sum(k * w for k, w in zip(kls, weights)) / max(1.0, sum(weights)),
            "clip_ratio": sum(c * w for c, w in zip(clips, weights)) / max(1.0, sum(weights)),
            "completion_length": float(torch.cat([g.mask.sum(1) for g in groups]).float().mean()),
        }
        sums = D.all_reduce_sum([*local.values(), len(video), sum(float(g.shuffled_accuracy.mean()) for g in video),
                                 sum(bool(g.temporal_applied) for g in video), n_tok, stream.attempted, stream.skipped])
        record = {"step": step + 1, **{k: float(v) / world for k, v in zip(local, sums)}}
        n_video, s_acc, fired, tokens, attempted, skipped = (float(x) for x in sums[len(local):])
        if n_video:
            record["acc/shuffled"] = s_acc / n_video
            record["temporal_bonus_rate"] = fired / n_video
        last = results[-1]
        record.update({
            "grad_norm": last.grad_norm, "lr": last.lr, "step_skipped": not all(r.applied for r in results),
            "reward_errors": int(sum(rewards.errors.values())), "samples_skipped": int(skipped),
            **{f"time/{k}": v for k, v in timer.times.items()}, "time/step": step_time,
            "tokens_per_s": tokens / step_time, "peak_mem_gb": peak_memory_gb(),
        })
        if not all(r.applied for r in results) and main_rank:
            log.warning("step %d: non-finite gradient (norm %s); update skipped", step + 1, last.grad_norm)
        stream.check_rate(int(skipped), int(attempted))
        logger.log(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['acc/ordered']:.2f}",
                                 kl=f"{record['kl']:.4f}", refresh=False)

        # 7. Checkpoint (atomic: written to a temp dir, then renamed).
        if cfg.train.save_steps and (step + 1) % cfg.train.save_steps == 0 and step + 1 < total_steps:
            session.checkpoint(cfg, step + 1, policy, stream, generators)

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
    D.cleanup()
    return final_dir


if __name__ == "__main__":
    main()
