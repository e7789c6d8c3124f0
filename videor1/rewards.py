"""Rewards of Video-R1, exactly: accuracy per problem type, format; and a registry by name.

`accuracy_reward` and `format_reward` return Video-R1's value for every input (its grpo.py rules):
  multiple choice  1 if the <answer> text equals the solution's, stripped, else 0 (strict match)
  numerical        0 if exactly one side has a decimal point or comma; else 1 if both parse as
                   floats (commas removed) and agree after rounding to 2 decimals, else 0
  OCR              1 - word error rate (word-level Levenshtein / reference words), clipped to [0, 1]
  free-form        mean of ROUGE-1/2/L F-measures with stemming (rouge_score), clipped to [0, 1]
  regression       1 - min(1, relative error) (0 when either side does not parse)
  anything else    0
The answer is the text between <answer> and </answer> (stripped), "" when absent.

One departure by default: a number that is not finite ("nan", "inf", "-inf", "1e999", ...) does not
parse, on either side, so it scores 0 in every numeric rule. Video-R1 clamps the regression error
as min(1, max(0, nan)) = 0, which gives a "nan" answer reward 1.0 on any regression question (and
passes its temporal and length gates, acc > 0.1), and its numerical rule gives "inf" 1.0 against an
"inf" solution. `algo.video_r1_compat_rewards: true` (set_video_r1_compat(True), which train.py calls
at startup) restores Video-R1's values exactly, for comparisons with its runs.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Callable, Mapping

from videor1.data import extract_answer

RewardFn = Callable[[str, Mapping], float]
"""A reward: (decoded completion text, dataset row) -> float."""

REWARDS: dict[str, RewardFn] = {}

_VIDEO_R1_COMPAT = False  # algo.video_r1_compat_rewards; set once at startup by set_video_r1_compat


def set_video_r1_compat(enabled: bool) -> None:
    """Score as Video-R1 does, non-finite numbers included (True), or reject them (False, the default).
    Process-wide: train.check_config sets it from algo.video_r1_compat_rewards on every rank."""
    global _VIDEO_R1_COMPAT
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    _VIDEO_R1_COMPAT = enabled


def video_r1_compat() -> bool:
    """Whether the rewards reproduce Video-R1's values exactly (non-finite numbers included)."""
    return _VIDEO_R1_COMPAT


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn(completion, row) -> float` available as `algo.rewards: [name]`."""

    def wrap(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return wrap


def get_reward(name: str) -> RewardFn:
    """The registered reward `name`; a KeyError lists the known names."""
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}")
    return REWARDS[name]


def _to_float(text: str, allow_non_finite: bool = False) -> float | None:
    # Video-R1's normalize_number: Python float() after removing thousands separators; None when it
    # fails, and (unless allow_non_finite, Video-R1's behaviour) when the value is nan or +-inf.
    try:
        value = float(text.replace(",", ""))
    except (ValueError, OverflowError):
        return None
    return value if allow_non_finite or math.isfinite(value) else None


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance / number of reference words (at least 1), as Video-R1's wer."""
    ref, hyp = reference.split(), hypothesis.split()
    prev = list(range(len(hyp) + 1))
    for i in range(1, len(ref) + 1):
        cur = [i] + [0] * len(hyp)
        for j in range(1, len(hyp) + 1):
            cur[j] = prev[j - 1] if ref[i - 1] == hyp[j - 1] else 1 + min(prev[j], cur[j - 1], prev[j - 1])
        prev = cur
    return prev[len(hyp)] / max(1, len(ref))


@functools.lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge_mean_f(reference: str, hypothesis: str) -> float:
    """Mean of ROUGE-1, ROUGE-2 and ROUGE-L F-measures, with stemming."""
    s = _rouge().score(reference, hypothesis)
    return (s["rouge1"].fmeasure + s["rouge2"].fmeasure + s["rougeL"].fmeasure) / 3


def accuracy_reward(completion: str, solution: str, problem_type: str, *, video_r1_compat: bool | None = None) -> float:
    """Video-R1's accuracy reward of one completion against its `<answer>` solution; in [0, 1].
    video_r1_compat: None = the process-wide setting (set_video_r1_compat); True = Video-R1's values
    exactly (a "nan" regression answer scores 1.0); False = non-finite numbers never parse (score 0)."""
    compat = _VIDEO_R1_COMPAT if video_r1_compat is None else video_r1_compat
    out, gt = extract_answer(completion), extract_answer(solution)
    if problem_type == "multiple choice":
        return 1.0 if out.strip() == gt.strip() else 0.0
    if problem_type == "numerical":
        if (("." in gt) or ("," in gt)) != (("." in out) or ("," in out)):
            return 0.0
        g, o = _to_float(gt, compat), _to_float(out, compat)
        if g is None or o is None:
            return 0.0
        return 1.0 if round(g, 2) == round(o, 2) else 0.0
    if problem_type == "OCR":
        return max(0.0, min(1.0, 1 - word_error_rate(gt, out)))
    if problem_type == "free-form":
        return max(0.0, min(1.0, rouge_mean_f(gt, out)))
    if problem_type == "regression":
        g, o = _to_float(gt, compat), _to_float(out, compat)
        if g is None or o is None:
            return 0.0
        rel = (abs(o - g) + 1e-9) / (abs(g) + 1e-9)
        # Video-R1's clamp order: a NaN error clamps to 0 (reward 1). Only reachable in compat mode;
        # otherwise both sides are finite (an inf error from an overflowing difference clamps to 1).
        rel = min(1.0, max(0.0, rel))
        return 1 - rel
    return 0.0


_FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def format_reward(completion: str) -> float:
    """1 if the whole completion is <think>...</think> then <answer>...</answer>, else 0 (Video-R1)."""
    return 1.0 if _FORMAT_RE.fullmatch(completion) else 0.0


@register_reward("accuracy")
def _accuracy(completion: str, row: Mapping) -> float:
    return accuracy_reward(completion, row["solution"], row["problem_type"])


@register_reward("format")
def _format(completion: str, row: Mapping) -> float:
    return format_reward(completion)
