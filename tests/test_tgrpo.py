"""T-GRPO's pure functions on hand-computed cases."""

import pytest
import torch

from videor1.tgrpo import (batch_reward_std, group_advantages, group_rewards, group_stats, length_bonus,
                           shuffle_permutation, temporal_bonus)

T = torch.tensor


def test_temporal_bonus_fires_when_ordered_beats_mu_times_shuffled():
    ordered = T([1.0, 0.0, 1.0, 0.05])  # p = 0.5125
    shuffled = T([1.0, 0.0])  # p~ = 0.5, 0.8 * 0.5 = 0.4 <= p
    bonus, applied = temporal_bonus(ordered, shuffled, alpha=0.3, mu=0.8)
    assert applied is True
    assert torch.equal(bonus, T([0.3, 0.0, 0.3, 0.0]))  # only accuracy > 0.1 gets it


def test_temporal_bonus_withheld_when_shuffled_does_as_well():
    ordered = T([1.0, 0.0, 0.0, 0.0])  # p = 0.25
    shuffled = T([1.0, 0.0])  # 0.8 * 0.5 = 0.4 > 0.25
    bonus, applied = temporal_bonus(ordered, shuffled)
    assert applied is False and torch.equal(bonus, torch.zeros(4))


def test_temporal_bonus_edge_equal_and_zero():
    # p == mu * p~ fires (>=); all-zero groups fire too (0 >= 0) but nobody has accuracy > 0.1.
    bonus, applied = temporal_bonus(T([0.4, 0.4]), T([0.5, 0.5]), mu=0.8)
    assert applied is True and torch.allclose(bonus, T([0.3, 0.3]))
    bonus, applied = temporal_bonus(T([0.0, 0.0]), T([0.0]))
    assert applied is True and torch.equal(bonus, torch.zeros(2))
    with pytest.raises(ValueError, match="non-empty shuffled"):
        temporal_bonus(T([1.0]), torch.zeros(0))


def test_length_bonus_rule():
    acc = T([1.0, 1.0, 0.0, 1.0])
    lengths = T([320, 600, 400, 512])
    assert torch.equal(length_bonus(acc, lengths), T([0.2, 0.0, 0.0, 0.2]))
    # only one correct rollout -> no bonus at all
    assert torch.equal(length_bonus(T([1.0, 0.0]), T([400, 400])), torch.zeros(2))


def test_group_advantages_hand_computed():
    r = T([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(r, 4)
    std = torch.tensor([1.0, 0.0, 1.0, 0.0]).std()  # unbiased: sqrt(1/3)
    expect0 = (T([1.0, 0.0, 1.0, 0.0]) - 0.5) / (std + 1e-4)
    assert torch.allclose(adv[:4], expect0)
    assert torch.equal(adv[4:], torch.zeros(4))  # identical rewards -> zero advantage, no NaN
    assert torch.allclose(group_advantages(r, 4, scale=False)[:4], T([0.5, -0.5, 0.5, -0.5]))
    with pytest.raises(ValueError, match="group_size=3"):
        group_advantages(r, 3)


def test_group_rewards_video_vs_image_and_plain_grpo():
    ordered = {"accuracy": T([1.0, 0.0, 1.0, 1.0]), "format": T([1.0, 1.0, 0.0, 1.0])}
    lengths = T([10, 10, 10, 10])
    total, parts = group_rewards(ordered, lengths, T([0.0, 0.0]), temporal=True)
    assert parts["temporal_applied"] is True
    assert torch.allclose(total, T([2.3, 1.0, 1.3, 2.3]))
    # image (no shuffled rollouts): no bonus, rule not evaluated
    total, parts = group_rewards(ordered, lengths, None, temporal=True)
    assert parts["temporal_applied"] is None and torch.allclose(total, T([2.0, 1.0, 1.0, 2.0]))
    # plain GRPO ignores the shuffled group entirely
    total, parts = group_rewards(ordered, lengths, T([0.0, 0.0]), temporal=False)
    assert parts["temporal_applied"] is None and torch.allclose(total, T([2.0, 1.0, 1.0, 2.0]))
    # length bonus stacks on top (lengths in range, more than one correct)
    total, _ = group_rewards(ordered, T([400, 400, 400, 100]), None, length_bonus_value=0.2)
    assert torch.allclose(total, T([2.2, 1.0, 1.2, 2.0]))


def test_shuffle_permutation_is_a_non_identity_permutation():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 8, 16):
        for _ in range(50):
            p = shuffle_permutation(n, g)
            assert sorted(p.tolist()) == list(range(n))
            assert not torch.equal(p, torch.arange(n))
    assert torch.equal(shuffle_permutation(1, g), T([0]))


def test_scale_rewards_group_batch_none():
    r = T([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    centred = T([0.5, -0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0])
    group_std = T([1.0, 0.0, 1.0, 0.0]).std()
    assert torch.allclose(group_advantages(r, 4, scale="group")[:4], centred[:4] / (group_std + 1e-4))
    assert torch.allclose(group_advantages(r, 4, scale="none"), centred)
    # "batch" (TRL): the group's mean, the whole step's unbiased std: sum 10, sum sq 18, n 8
    std = float(r.std())
    assert batch_reward_std(float(r.sum()), float((r * r).sum()), 8) == pytest.approx(std, rel=1e-6)
    assert std == pytest.approx(((18 - 10 ** 2 / 8) / 7) ** 0.5)
    assert torch.allclose(group_advantages(r, 4, scale="batch", batch_std=std), centred / (std + 1e-4))
    # the all-equal group keeps zero advantages under every scaling
    for scale in ("group", "none"):
        assert torch.equal(group_advantages(r, 4, scale=scale)[4:], torch.zeros(4))
    assert batch_reward_std(3.0, 9.0, 1) == 0.0 and batch_reward_std(4.0, 8.0, 2) == 0.0
    with pytest.raises(ValueError, match="batch_std"):
        group_advantages(r, 4, scale="batch")
    with pytest.raises(ValueError, match="scale must be"):
        group_advantages(r, 4, scale="bogus")


def test_reward_weights_scale_rewards_not_bonuses():
    ordered = {"accuracy": T([1.0, 0.0, 1.0, 1.0]), "format": T([1.0, 1.0, 0.0, 1.0])}
    # 2 * accuracy + 0.5 * format + temporal bonus 0.3 (unweighted) on the correct ones
    total, parts = group_rewards(ordered, T([10, 10, 10, 10]), T([0.0, 0.0]), weights={"accuracy": 2.0, "format": 0.5})
    assert parts["temporal_applied"] is True
    assert torch.allclose(total, T([2.8, 0.5, 2.3, 2.8]))
    # length bonus unweighted too; a weight of 0 removes a reward; missing names weigh 1.0
    total, _ = group_rewards(ordered, T([400, 400, 400, 100]), None, length_bonus_value=0.2, weights={"format": 0.0})
    assert torch.allclose(total, T([1.2, 0.0, 1.2, 1.0]))


def test_group_stats():
    s = group_stats(T([1.0, 0.0, 1.0, 0.0]), T([1.0, 0.0, 1.0, 0.0]))
    assert s["reward_std"] == pytest.approx(float(T([1.0, 0.0, 1.0, 0.0]).std()))
    assert (s["zero_std"], s["all_correct"], s["all_wrong"]) == (0.0, 0.0, 0.0)
    s = group_stats(T([2.0, 2.0]), T([1.0, 0.5]))
    assert s == {"reward_std": 0.0, "zero_std": 1.0, "all_correct": 1.0, "all_wrong": 0.0}
    s = group_stats(T([0.0, 0.3]), T([0.1, 0.0]))  # 0.1 is not > 0.1
    assert s["all_wrong"] == 1.0 and s["all_correct"] == 0.0 and s["zero_std"] == 0.0
