"""Rewards the trainer tests load through `algo.reward_modules` (imported in every torchrun rank).

Behaviour is chosen by environment variables so one module serves several tests:
  VIDEOR1_TEST_RAISE=1        test_raises raises ValueError on completions of odd length
  VIDEOR1_TEST_NAN_CALL=K     test_signal returns NaN on its K-th call in this process
  VIDEOR1_TEST_DIE_CALL=K     test_signal kills this process (rank 1 only) on its K-th call
"""

import os

from videor1.rewards import register_reward

_calls = {"n": 0}


@register_reward("test_signal")
def test_signal(completion: str, row) -> float:
    """A dense, deterministic reward (fraction of 'e' characters), so advantages and gradients are non-zero."""
    _calls["n"] += 1
    if int(os.environ.get("VIDEOR1_TEST_NAN_CALL", "0")) == _calls["n"]:
        return float("nan")
    if int(os.environ.get("VIDEOR1_TEST_DIE_CALL", "0")) == _calls["n"] and os.environ.get("RANK") == "1":
        os._exit(3)
    return completion.count("e") / max(1, len(completion))


@register_reward("test_raises")
def test_raises(completion: str, row) -> float:
    if os.environ.get("VIDEOR1_TEST_RAISE") == "1" and len(completion) % 2 == 1:
        raise ValueError("odd length")
    return 0.0
