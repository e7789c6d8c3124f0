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
from videor1.train import Group, PolicyStats, SafeRewards, optimizer_steps, step_record


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
