"""T-GRPO's algorithm as pure functions on per-rollout tensors (no model, no I/O).

Per prompt group: G rollouts on ordered frames and Gs on shuffled frames (videos only).
    p  = mean accuracy of the ordered rollouts, p~ = of the shuffled ones
    if p >= mu * p~: every ordered rollout with accuracy > 0.1 gets +alpha   (temporal bonus)
    +length_bonus to ordered rollouts of length_min..length_max tokens, when more than one ordered
     rollout of the group has accuracy > 0.1                                  (length bonus)
    r = sum_i w_i * reward_i + bonuses                                        (reward_weights)
    advantage = (r - mean_G(r)) / (std + 1e-4), std unbiased: the group's ("group", Video-R1),
                the whole step's ("batch", TRL), or no division ("none", Dr. GRPO)
Shuffled rollouts only decide the bonus; they never enter the loss. Unlike Video-R1's trainer,
which pools accuracies over a whole device batch, every rule here is computed per prompt group.
"""

from __future__ import annotations

import torch


def temporal_bonus(
    ordered_accuracy: torch.Tensor, shuffled_accuracy: torch.Tensor, *, alpha: float = 0.3, mu: float = 0.8
) -> tuple[torch.Tensor, bool]:
    """The temporal bonus of one prompt group.

    Args:
        ordered_accuracy: float [G], accuracy reward of each ordered-frame rollout.
        shuffled_accuracy: float [Gs], accuracy reward of each shuffled-frame rollout (Gs >= 1).
    Returns:
        (bonus float [G], applied): bonus is alpha for ordered rollouts with accuracy > 0.1 when
        mean(ordered) >= mu * mean(shuffled), else 0; `applied` says whether the rule fired.
    """
    if ordered_accuracy.dim() != 1 or shuffled_accuracy.dim() != 1 or shuffled_accuracy.numel() == 0:
        raise ValueError(
            f"temporal_bonus needs 1-D ordered [G] and non-empty shuffled [Gs] accuracies, got "
            f"{tuple(ordered_accuracy.shape)} and {tuple(shuffled_accuracy.shape)}"
        )
    applied = bool(ordered_accuracy.float().mean() >= mu * shuffled_accuracy.float().mean())
    bonus = torch.where(ordered_accuracy > 0.1, alpha, 0.0) if applied else torch.zeros_like(ordered_accuracy)
    return bonus.to(ordered_accuracy.dtype), applied


def length_bonus(
    accuracy: torch.Tensor, lengths: torch.Tensor, *, bonus: float = 0.2, length_min: int = 320, length_max: int = 512
) -> torch.Tensor:
    """Video-R1's length reward for one group: float [G].

    Args:
        accuracy: float [G] accuracy reward (before any temporal bonus).
        lengths: int [G] completion lengths in tokens (up to and including the first EOS).
    Returns +bonus for rollouts with accuracy > 0.1 and length_min <= length <= length_max, when more
    than one rollout of the group has accuracy > 0.1; else 0.
    """
    correct = accuracy > 0.1
    if int(correct.sum()) <= 1:
        return torch.zeros_like(accuracy)
    in_range = (lengths >= length_min) & (lengths <= length_max)
    return torch.where(correct & in_range, bonus, 0.0).to(accuracy.dtype)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group", batch_std: float | None = None,
                     eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages, (r - mean of the group) / (std + eps), with TRL's scale_rewards.

    Args:
        rewards: float [N * group_size], rollouts of one group contiguous.
        scale: "group" divides by the unbiased std of each group (GRPO, Video-R1); "batch" by
            `batch_std`, the unbiased std of every reward of the step on every rank (TRL's "batch";
            the caller computes it across ranks, see batch_reward_std); "none" leaves r - mean
            unscaled (Dr. GRPO). True / False are read as "group" / "none".
        batch_std: required with scale="batch".
    Returns: float [N * group_size].
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} items, got {tuple(rewards.shape)}")
    scale = {True: "group", False: "none"}.get(scale, scale)
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + eps)
    elif scale == "batch":
        if batch_std is None:
            raise ValueError("scale='batch' needs batch_std (the std of every reward of the step)")
        centred = centred / (batch_std + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return centred.reshape(-1)


def batch_reward_std(total: float, total_sq: float, count: float) -> float:
    """Unbiased std of a set of rewards from its sums (sum r, sum r^2, n), as gathered over ranks:
    TRL's scale_rewards="batch" divides by rewards.std() of the whole gathered step. 0 when n < 2."""
    if count < 2:
        return 0.0
    var = (total_sq - total * total / count) / (count - 1)
    return max(var, 0.0) ** 0.5


def group_stats(total: torch.Tensor, accuracy: torch.Tensor) -> dict[str, float]:
    """Per-group quantities TRL users read, for one group's ordered rollouts.

    Args:
        total: float [G] total reward; accuracy: float [G] accuracy reward.
    Returns: {"reward_std": unbiased std of total (0 when G == 1), "zero_std": 1.0 when every total is
    equal, "all_correct" / "all_wrong": 1.0 when every / no rollout has accuracy > 0.1}.
    """
    correct = accuracy > 0.1
    return {
        "reward_std": float(total.std()) if total.numel() > 1 else 0.0,
        "zero_std": float(bool(total.max() == total.min())),
        "all_correct": float(bool(correct.all())),
        "all_wrong": float(not bool(correct.any())),
    }


def shuffle_permutation(num_frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random frame order for the shuffled rollouts: int64 [num_frames], never the identity when
    num_frames > 1 (an identity 'shuffle' would make the bonus compare a group with itself)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    identity = torch.arange(num_frames)
    while True:
        perm = torch.randperm(num_frames, generator=generator)
        if num_frames == 1 or not torch.equal(perm, identity):
            return perm


def group_rewards(
    ordered: dict[str, torch.Tensor],
    lengths: torch.Tensor,
    shuffled_accuracy: torch.Tensor | None,
    *,
    temporal: bool = True,
    alpha: float = 0.3,
    mu: float = 0.8,
    length_bonus_value: float = 0.2,
    length_min: int = 320,
    length_max: int = 512,
    weights: dict[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | bool]]:
    """Total reward of each ordered rollout of one prompt group, as Video-R1 sums it.

    Args:
        ordered: reward name -> float [G] for the ordered rollouts; must contain "accuracy".
        lengths: int [G] completion lengths.
        shuffled_accuracy: float [Gs] accuracy of the shuffled rollouts, or None (images, or no
            temporal rollouts): then no temporal bonus.
        weights: reward name -> weight (TRL's reward_weights; missing names weigh 1.0). The total is
            sum_i w_i * reward_i + temporal bonus + length bonus: the bonuses are added unweighted, as
            Video-R1 adds them.
    Returns:
        (total float [G], parts) with parts["temporal_bonus"] [G], parts["length_bonus"] [G] and
        parts["temporal_applied"] (bool, or None when no rule was evaluated).
    """
    acc = ordered["accuracy"]
    weights = weights or {}
    total = sum(weights.get(name, 1.0) * value for name, value in ordered.items())
    applied = None
    t_bonus = torch.zeros_like(acc)
    if temporal and shuffled_accuracy is not None:
        t_bonus, applied = temporal_bonus(acc, shuffled_accuracy, alpha=alpha, mu=mu)
    l_bonus = torch.zeros_like(acc)
    if length_bonus_value:
        l_bonus = length_bonus(acc, lengths, bonus=length_bonus_value, length_min=length_min, length_max=length_max)
    total = total + t_bonus + l_bonus
    return total, {"temporal_bonus": t_bonus, "length_bonus": l_bonus, "temporal_applied": applied}
