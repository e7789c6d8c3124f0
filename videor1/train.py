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
from videor1.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from videor1.config import Config, ConfigError, parse_cli, to_dict
from videor1.data import load_rows
from videor1.engine import build_engine, hf_deepspeed_context, load_deepspeed_config
from videor1.metrics import MetricsLogger, StepTimer, peak_memory_gb, plot_curves, read_metrics, summary_table
from videor1.model import load_model, load_processor
from videor1.policy import PolicyModule
from videor1.rewards import get_reward
from videor1.rollout import decode, generate, prepare_prompt, training_inputs, vision_token_ids
from videor1.sampler import PromptSampler
from videor1.tgrpo import group_advantages, group_rewards
from videor1.vision import MediaDecodeError

log = logging.getLogger("videor1.train")

SUMMARY_KEYS = ["loss", "reward", "reward/accuracy", "reward/format", "acc/ordered", "acc/shuffled",
                "temporal_bonus_rate", "kl", "clip_ratio", "completion_length", "grad_norm"]


# ------------------------------------------------------------------------------------------------
# Setup checks: everything that can be wrong with the config fails here, before any model loads.


def check_config(cfg: Config) -> None:
    if not os.path.isfile(cfg.data.train_file):
        raise ConfigError(f"data.train_file not found: {cfg.data.train_file!r}")
    if not os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        raise ConfigError(f"model.path is not a checkpoint directory (no config.json): {cfg.model.path!r}")
    if cfg.train.engine == "deepspeed" and not os.path.isfile(cfg.train.deepspeed_config):
        raise ConfigError(f"train.deepspeed_config not found: {cfg.train.deepspeed_config!r}")
    if cfg.train.resume_from not in ("", "auto") and not os.path.isdir(cfg.train.resume_from):
        raise ConfigError(f"train.resume_from not found: {cfg.train.resume_from!r}")
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


class PromptStream:
    """Rows for this rank; undecodable media are skipped (logged, counted), never substituted."""

    def __init__(self, cfg: Config, rows: list[dict], processor, sampler: PromptSampler, generator: torch.Generator):
        self.cfg, self.rows, self.processor, self.sampler, self.generator = cfg, rows, processor, sampler, generator
        self.data_root = cfg.data.data_root or os.path.dirname(os.path.abspath(cfg.data.train_file))
        self.attempted = self.skipped = 0

    def take(self, n: int) -> list:
        prompts = []
        while len(prompts) < n:
            row = self.rows[self.sampler.next()]
            self.attempted += 1
            try:
                prompts.append(prepare_prompt(row, self.processor, self.cfg.data, self.data_root,
                                              shuffled=self.cfg.algo.temporal, generator=self.generator))
            except (MediaDecodeError, FileNotFoundError) as e:
                self.skipped += 1
                log.warning("skipping problem %s: %s", row["problem_id"], e)
                self.check_rate(self.skipped, self.attempted)
        return prompts

    def check_rate(self, skipped: int, attempted: int) -> None:
        limit = self.cfg.data.max_skip_rate
        if attempted >= self.cfg.data.skip_rate_min_samples and skipped > limit * attempted:
            raise RuntimeError(f"{skipped} of {attempted} samples could not be loaded ({skipped / attempted:.1%}), "
                               f"over data.max_skip_rate={limit:.1%}: check data.data_root and the media files")


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
    processor = load_processor(cfg.model.path)
    tok = processor.tokenizer
    eos_ids = sorted({tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} - {None, tok.unk_token_id})
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]
    suppress = vision_token_ids(tok)
    ds_config = load_deepspeed_config(cfg, groups_per_step) if cfg.train.engine == "deepspeed" else None
    ds_keep = hf_deepspeed_context(ds_config) if ds_config and ds_config["zero_optimization"].get("stage") == 3 else None

    def wrapped(trainable: bool):
        hf = load_model(cfg.model.path, cfg.model.dtype, cfg.model.attn_implementation)
        module = PolicyModule(hf, kernel_backend=cfg.algo.kernel_backend, temperature=cfg.rollout.temperature)
        if not trainable:
            module.requires_grad_(False)
        return build_engine(cfg, module, total_steps, groups_per_step, trainable=trainable, ds_config=ds_config)

    policy = wrapped(trainable=True)
    reference = wrapped(trainable=False) if cfg.algo.beta > 0 else None
    del ds_keep

    # Resume: model, optimiser, scheduler, RNGs and data position, so the next steps match exactly.
    start_step, stream_counts = 0, {"attempted": 0, "skipped": 0}
    resume = latest_checkpoint(cfg.train.output_dir) if cfg.train.resume_from == "auto" else cfg.train.resume_from
    if resume:
        state, mine = load_checkpoint(resume, policy)
        start_step, stream_counts = state["step"], state["stream"]
        sampler.load_state_dict(mine["sampler"])
        set_rng_state(mine["rng"], {"shuffle": shuffle_gen})
        if main_rank:
            log.info("resumed from %s at step %d", resume, start_step)
    stream = PromptStream(cfg, rows, processor, sampler, shuffle_gen)
    stream.attempted, stream.skipped = stream_counts["attempted"], stream_counts["skipped"]
    rewards = SafeRewards(cfg.algo.rewards)
    logger = MetricsLogger(cfg.train.output_dir, cfg.train.tensorboard, main_rank, resume_step=start_step)
    if main_rank:
        with open(os.path.join(cfg.train.output_dir, "config.yaml"), "w", encoding="utf-8") as f:
            import yaml

            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        log.info("T-GRPO: %d steps, %d ranks x %d prompts/step, G=%d ordered + %d shuffled rollouts, engine=%s",
                 total_steps, world, groups_per_step, G, Gs if cfg.algo.temporal else 0, cfg.train.engine)
    progress = None
    if main_rank:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc="T-GRPO", dynamic_ncols=True)

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
                    losses.append(float(loss) * scale)
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
            save_checkpoint(cfg.train.output_dir, step + 1, policy,
                            {"stream": {"attempted": stream.attempted, "skipped": stream.skipped}},
                            {"sampler": sampler.state_dict(), "rng": rng_state({"shuffle": shuffle_gen})})

    # Final model in HF format (from_pretrained loads it), then the summary and the plot.
    final_dir = os.path.join(cfg.train.output_dir, "final")
    sd = policy.full_state_dict()
    if main_rank:
        progress.close()
        save_hf(policy.module.hf, sd, processor, final_dir)
        records = read_metrics(logger.path)
        print("\n" + summary_table(records, SUMMARY_KEYS + ["time/rollout", "time/reference", "time/policy",
                                                           "time/optimizer", "time/step", "tokens_per_s"]))
        png = plot_curves(records, SUMMARY_KEYS, os.path.join(cfg.train.output_dir, "reward_curves.png"),
                          f"T-GRPO ({'temporal' if cfg.algo.temporal else 'plain GRPO'})")
        print(f"final model: {final_dir}\nmetrics: {logger.path}\nplot: {png}")
    logger.close()
    D.barrier()
    D.cleanup()
    return final_dir


def save_hf(hf_model, state_dict: dict, processor, out_dir: str) -> None:
    """Write an HF checkpoint (config, safetensors, processor) that from_pretrained loads; atomic."""
    import shutil

    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    hf_model.save_pretrained(tmp, state_dict=state_dict)
    processor.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


if __name__ == "__main__":
    main()
