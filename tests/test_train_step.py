"""The train step's bookkeeping without a model: the learning-rate schedule counts optimiser steps,
and every logged aggregate is what its name says across ranks."""

import math

import pytest
import torch

from videor1 import distributed as D
from videor1.config import Config
from videor1.engine import StepResult, _scheduler
from videor1.metrics import StepTimer
from videor1.rollout import Prompt
from videor1.train import Group, PolicyStats, SafeRewards, loss_scale, optimizer_steps, score_groups, step_record


def lr_sequence(cfg: Config, steps: int, built_for: int) -> list[float]:
    """The learning rate of each optimiser step of `steps` training steps, with a scheduler built for
    `built_for` optimiser steps, stepped once per optimiser step as the engines do."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.optim.lr)
    sched = _scheduler(cfg, opt, built_for)
    out = []
    for _ in range(steps * cfg.algo.num_iterations):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedule_spans_every_optimizer_step_with_num_iterations():
    cfg = Config()
    cfg.algo.num_iterations, cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.scheduler = 2, 1.0, 0.0, "cosine"
    steps = 4
    assert optimizer_steps(cfg, steps) == 8
    got = lr_sequence(cfg, steps, optimizer_steps(cfg, steps))
    want = [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert got == pytest.approx(want, abs=1e-12)
    assert all(a > b for a, b in zip(got, got[1:])) and got[-1] > 0
    # Before the fix the schedule was built for the training steps: 0 half way, then climbing back.
    old = lr_sequence(cfg, steps, steps)
    assert old[4] == pytest.approx(0.0, abs=1e-12) and old[6] > old[4]


def _group(rewards: list[float], lengths: list[int], shuffled: list[float] | None, applied: bool | None) -> Group:
    n = len(rewards)
    g = Group(Prompt({"data_type": "video"}, torch.zeros(10, dtype=torch.long), {}), torch.zeros(n, 4),
              torch.ones(n, 4), torch.tensor(lengths), {"accuracy": torch.tensor(rewards),
                                                         "format": torch.ones(n)})
    g.total = g.rewards["accuracy"] + 1.0
    g.shuffled_accuracy = None if shuffled is None else torch.tensor(shuffled)
    g.temporal_applied = applied
    return g


def test_step_metrics_are_token_weighted_and_summed_over_ranks(monkeypatch):
    """Two ranks with different token counts: kl and clip_ratio are means over every completion token
    of both ranks, rewards means over every rollout, counters summed, peak memory the larger one."""
    ranks = {
        0: dict(groups=[_group([1, 0], [2, 4], [0.0, 0.0], True)], kl=0.1, clip=0.0, errors=1, skipped=0,
                mem=3.0),
        1: dict(groups=[_group([0, 0], [10, 10], None, None)], kl=0.5, clip=0.2, errors=2, skipped=1, mem=5.0),
    }

    def stats(r):
        tokens = float(sum(g.lengths.sum() for g in ranks[r]["groups"]))
        return PolicyStats(loss=0.1 * (r + 1), kl_tokens=ranks[r]["kl"] * tokens, clip_tokens=ranks[r]["clip"] * tokens,
                           tokens=tokens, results=[StepResult(1.5, True, 1e-3)])

    # Rank 1's sums, as all_reduce would see them.
    sent = {}
    monkeypatch.setattr(D, "all_reduce_sum", lambda v: sent.setdefault("v", torch.tensor(v, dtype=torch.float64)))
    monkeypatch.setattr(D, "all_reduce_max", lambda v: torch.tensor(v, dtype=torch.float64))
    r1 = ranks[1]
    step_record(1, r1["groups"], stats(1), StepTimer(), 1.0, r1["errors"], 5, r1["skipped"])
    other = sent["v"]
    # Rank 0 with the reductions over both ranks.
    monkeypatch.setattr(D, "world_size", lambda: 2)
    monkeypatch.setattr(D, "all_reduce_sum", lambda v: torch.tensor(v, dtype=torch.float64) + other)
    monkeypatch.setattr(D, "all_reduce_max", lambda v: torch.maximum(torch.tensor(v, dtype=torch.float64),
                                                                      torch.tensor([r1["mem"]])))
    monkeypatch.setattr("videor1.train.peak_memory_gb", lambda: ranks[0]["mem"])
    r0 = ranks[0]
    rec = step_record(1, r0["groups"], stats(0), StepTimer(), 2.0, r0["errors"], 7, r0["skipped"])

    tokens0, tokens1 = 6.0, 20.0
    assert rec["kl"] == pytest.approx((0.1 * tokens0 + 0.5 * tokens1) / (tokens0 + tokens1))
    assert rec["clip_ratio"] == pytest.approx(0.2 * tokens1 / (tokens0 + tokens1))
    assert rec["kl"] != pytest.approx((0.1 + 0.5) / 2)  # not the unweighted mean of the ranks
    assert rec["reward/accuracy"] == pytest.approx(1 / 4) and rec["acc/ordered"] == pytest.approx(1 / 4)
    assert rec["reward"] == pytest.approx(1 + 1 / 4)
    assert rec["completion_length"] == pytest.approx((2 + 4 + 10 + 10) / 4)
    assert rec["acc/shuffled"] == 0.0 and rec["temporal_bonus_rate"] == 1.0  # only rank 0 had a video group
    assert rec["reward_errors"] == 3 and rec["samples_skipped"] == 1 and rec["samples_attempted"] == 12
    assert rec["loss"] == pytest.approx((0.1 + 0.2) / 2)
    assert rec["peak_mem_gb"] == 5.0
    assert rec["tokens_per_s"] == pytest.approx((6 + 2 * 10 + 20 + 2 * 10) / 2.0)


def test_reward_error_counts_survive_a_resume(monkeypatch):
    from videor1 import rewards as rewards_module

    monkeypatch.setitem(rewards_module.REWARDS, "always_fails", lambda text, row: 1 / 0)
    rewards = SafeRewards(["always_fails"])
    rewards(["a", "b"], {"problem_id": 1})
    assert rewards.total_errors == 2
    restored = SafeRewards(["always_fails"])
    restored.load_state_dict(rewards.state_dict())
    restored(["c"], {"problem_id": 2})
    assert restored.total_errors == 3 and restored.errors == {("always_fails", "ZeroDivisionError"): 3}


def _trl_group(total: list[float], accuracy: list[float], truncated: list[bool]) -> Group:
    n = len(total)
    g = Group(Prompt({"data_type": "image"}, torch.zeros(3, dtype=torch.long), {}), torch.zeros(n, 4),
              torch.ones(n, 4), torch.full((n,), 4), {"accuracy": torch.tensor(accuracy)},
              truncated=torch.tensor(truncated))
    g.total = torch.tensor(total)
    return g


def test_trl_metrics_are_over_every_group_of_every_rank(monkeypatch):
    """reward_std, frac_reward_zero_std, frac_all_correct / _wrong are means over the prompt groups of
    both ranks; clipped_ratio over their ordered completions; samples_too_long summed."""
    rank1 = [_trl_group([1.0, 1.0], [1.0, 1.0], [False, False]),  # std 0, all correct
             _trl_group([0.0, 0.0], [0.0, 0.0], [True, True])]  # std 0, all wrong, both clipped
    rank0 = [_trl_group([1.0, 0.0], [1.0, 0.0], [True, False])]  # std sqrt(0.5), mixed
    stats = PolicyStats(tokens=1.0, results=[StepResult(1.0, True, 1e-3)])
    sent = {}
    monkeypatch.setattr(D, "all_reduce_sum", lambda v: sent.setdefault("v", torch.tensor(v, dtype=torch.float64)))
    monkeypatch.setattr(D, "all_reduce_max", lambda v: torch.tensor(v, dtype=torch.float64))
    step_record(1, rank1, stats, StepTimer(), 1.0, 0, 4, 0, too_long=2)
    other = sent["v"]
    monkeypatch.setattr(D, "world_size", lambda: 2)
    monkeypatch.setattr(D, "all_reduce_sum", lambda v: torch.tensor(v, dtype=torch.float64) + other)
    rec = step_record(1, rank0, stats, StepTimer(), 1.0, 0, 3, 0, too_long=1)
    assert rec["reward_std"] == pytest.approx((0 + 0 + 0.5 ** 0.5) / 3)
    assert rec["frac_reward_zero_std"] == pytest.approx(2 / 3)
    assert rec["frac_all_correct"] == pytest.approx(1 / 3) and rec["frac_all_wrong"] == pytest.approx(1 / 3)
    assert rec["clipped_ratio"] == pytest.approx(3 / 6)
    assert rec["samples_too_long"] == 3


def test_batch_scaled_advantages_use_every_rank_rewards(monkeypatch):
    """scale_rewards="batch": each group is centred on its own mean and divided by the std of every
    reward of the step on both ranks (TRL), computed from summed (sum, sum of squares, count)."""
    cfg = Config()
    cfg.rollout.num_generations, cfg.algo.scale_rewards, cfg.algo.temporal, cfg.algo.length_bonus = 2, "batch", False, 0.0
    cfg.algo.rewards = ["accuracy"]

    def group(acc):
        return Group(Prompt({"data_type": "image"}, torch.zeros(3, dtype=torch.long), {}), torch.zeros(2, 4),
                     torch.ones(2, 4), torch.full((2,), 4), {"accuracy": torch.tensor(acc)})

    other = [group([0.0, 0.0]), group([1.0, 1.0])]  # rank 1
    mine = [group([1.0, 0.0])]  # rank 0
    sent = {}
    monkeypatch.setattr(D, "all_reduce_sum", lambda v: sent.setdefault("v", torch.tensor(v, dtype=torch.float64)))
    score_groups(cfg, other)
    monkeypatch.setattr(D, "all_reduce_sum", lambda v: torch.tensor(v, dtype=torch.float64) + sent["v"])
    score_groups(cfg, mine)
    std = float(torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64).std())
    assert torch.allclose(mine[0].advantages, torch.tensor([0.5, -0.5]) / (std + 1e-4))
    # reward_weights scale the named rewards before the advantages
    cfg.algo.scale_rewards, cfg.algo.reward_weights = "none", [3.0]
    g = group([1.0, 0.0])
    score_groups(cfg, [g])
    assert torch.allclose(g.total, torch.tensor([3.0, 0.0])) and torch.allclose(g.advantages, torch.tensor([1.5, -1.5]))


def test_masked_truncated_completions_leave_the_token_counts():
    """Under mask_truncated_completions a truncated completion's tokens are out of bnpo's normaliser."""
    cfg = Config()
    cfg.algo.loss_type = "bnpo"
    a = _trl_group([1.0, 0.0], [1.0, 0.0], [True, False])
    b = _trl_group([1.0, 0.0], [1.0, 0.0], [False, False])
    a.loss_lengths = a.lengths * ~a.truncated  # as rollout_phase sets it
    assert loss_scale(cfg, a, [a, b], 0.0)[0] == pytest.approx(4 / 12)
    cfg.algo.loss_type = "dapo"
    assert loss_scale(cfg, a, [a, b], 0.0)[1] == {"num_items": 1.0}  # never 0 when every completion is masked


def test_adamw_decays_matrices_only_as_hf_trainer():
    """Video-R1's HF Trainer puts biases and norm weights in a no-decay group; so do we (ZeRO-3's
    flat partitions are judged by their full shape, ds_shape)."""
    from videor1.engine import decay_groups

    layer, norm = torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)
    flat = torch.nn.Parameter(torch.zeros(0))
    flat.ds_shape = torch.Size([4, 3])  # a ZeRO-3 partition of a matrix
    decay, no_decay = decay_groups([layer.weight, layer.bias, norm.weight, norm.bias, flat], 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert [p is layer.weight or p is flat for p in decay["params"]] == [True, True]
    assert len(no_decay["params"]) == 3 and all(p.dim() == 1 and p is not flat for p in no_decay["params"])


def test_balance_groups_pads_with_weightless_copies_or_skips_the_step():
    """A rank that lost groups (vLLM requests refused twice) runs as many passes as the others: copies of
    its first group with weight 0 (loss scale 0, out of the statistics). No group left: no step."""
    from videor1.train import balance_groups

    a, b = _group([1.0, 0.0], [3, 4], None, None), _group([0.0, 1.0], [2, 2], None, None)
    work = balance_groups([a, b], 4)
    assert [g.weight for g in work] == [1.0, 1.0, 0.0, 0.0]
    assert work[2].completion_ids is a.completion_ids and a.weight == 1.0  # a copy, the original untouched
    assert balance_groups([a, b], 2) == [a, b]
    assert balance_groups([], 2) is None
