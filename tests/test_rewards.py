"""Rewards against a literal transcription of Video-R1's grpo.py accuracy/format rewards."""

import random
import re

import pytest
from rouge_score import rouge_scorer

from videor1 import rewards as rewards_mod
from videor1.rewards import (REWARDS, accuracy_reward, format_reward, get_reward, register_reward, set_video_r1_compat,
                             video_r1_compat, word_error_rate)


def video_r1_accuracy(content: str, sol: str, question_type: str) -> float:
    # Transcribed from Video-R1 src/r1-v/src/open_r1/grpo.py::accuracy_reward (the oracle).
    def extract_answer(text):
        match = re.search(r"<answer>\s*(.*?)\s*</answer>", text, re.DOTALL)
        return match.group(1).strip() if match else ""

    def normalize_number(num_str):
        try:
            return float(num_str.replace(",", ""))
        except Exception:
            return None

    def wer(reference, hypothesis):
        r, h = reference.split(), hypothesis.split()
        d = [[0] * (len(h) + 1) for _ in range(len(r) + 1)]
        for i in range(len(r) + 1):
            d[i][0] = i
        for j in range(len(h) + 1):
            d[0][j] = j
        for i in range(1, len(r) + 1):
            for j in range(1, len(h) + 1):
                d[i][j] = d[i - 1][j - 1] if r[i - 1] == h[j - 1] else 1 + min(d[i - 1][j], d[i][j - 1], d[i - 1][j - 1])
        return d[len(r)][len(h)] / max(1, len(r))

    try:
        out, gt = extract_answer(content), extract_answer(sol)
        if question_type == "multiple choice":
            return 1.0 if out.strip() == gt.strip() else 0.0
        if question_type == "numerical":
            if (("." in gt) or ("," in gt)) != (("." in out) or ("," in out)):
                return 0.0
            g, o = normalize_number(gt), normalize_number(out)
            if g is None or o is None:
                return 0.0
            return 1.0 if round(g, 2) == round(o, 2) else 0.0
        if question_type == "OCR":
            return max(0.0, min(1.0, 1 - wer(gt, out)))
        if question_type == "free-form":
            s = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(gt, out)
            return max(0.0, min(1.0, (s["rouge1"].fmeasure + s["rouge2"].fmeasure + s["rougeL"].fmeasure) / 3))
        if question_type == "regression":
            g, o = normalize_number(gt), normalize_number(out)
            if g is None or o is None:
                reward = 0.0
            rel_diff = (abs(o - g) + 1e-9) / (abs(g) + 1e-9)
            return 1 - min(1.0, max(0.0, rel_diff))
        return 0.0
    except Exception:
        return 0.0


def A(x):
    return f"<think>hmm</think><answer>{x}</answer>"


CASES = [
    # multiple choice: strict
    (A("B"), A("B"), "multiple choice", 1.0),
    (A(" B "), A("B"), "multiple choice", 1.0),
    (A("B."), A("B"), "multiple choice", 0.0),
    (A("b"), A("B"), "multiple choice", 0.0),
    ("B", A("B"), "multiple choice", 0.0),
    (A("B") + A("C"), A("B"), "multiple choice", 1.0),  # first <answer> counts
    # numerical: decimal-point rule, 2-decimal rounding, commas
    (A("42"), A("42"), "numerical", 1.0),
    (A("42.0"), A("42"), "numerical", 0.0),
    (A("3.141"), A("3.14"), "numerical", 1.0),
    (A("3.15"), A("3.14"), "numerical", 0.0),
    (A("1,000"), A("1000.5"), "numerical", 0.0),
    (A("1,000"), A("1,000"), "numerical", 1.0),
    (A("seven"), A("7"), "numerical", 0.0),
    (A(""), A("7"), "numerical", 0.0),
    (A("nan"), A("7"), "numerical", 0.0),
    # OCR: 1 - WER clipped
    (A("HELLO WORLD"), A("HELLO WORLD"), "OCR", 1.0),
    (A("HELLO"), A("HELLO WORLD"), "OCR", 0.5),
    (A("a b c d e"), A("x"), "OCR", 0.0),
    # free-form: ROUGE
    (A("the red square moves left"), A("the red square moves left"), "free-form", 1.0),
    (A("completely different words"), A("the red square moves left"), "free-form", 0.0),
    # regression: 1 - relative error, clipped
    (A("10"), A("10"), "regression", 1.0),
    (A("12"), A("10"), "regression", pytest.approx(0.8)),
    (A("100"), A("10"), "regression", 0.0),
    (A("x"), A("10"), "regression", 0.0),
    (A("inf"), A("10"), "regression", 0.0),
    # unknown type
    (A("B"), A("B"), "essay", 0.0),
]


@pytest.mark.parametrize("completion, solution, ptype, expected", CASES)
def test_accuracy_hand_checked_and_equal_to_video_r1(completion, solution, ptype, expected):
    got = accuracy_reward(completion, solution, ptype)
    assert got == pytest.approx(expected, abs=1e-8)
    assert got == pytest.approx(video_r1_accuracy(completion, solution, ptype), abs=1e-12)
    assert accuracy_reward(completion, solution, ptype, video_r1_compat=True) == got  # finite inputs: the same


NON_FINITE = ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e999", "1" * 400]
UNPARSABLE = ["", "seven", "1.2.3", "--1"]


@pytest.mark.parametrize("answer", NON_FINITE + UNPARSABLE)
@pytest.mark.parametrize("ptype", ["numerical", "regression"])
def test_default_scores_non_finite_and_unparsable_numbers_zero(answer, ptype):
    assert not video_r1_compat()  # the process-wide default
    for gt in ("10", "7", "3.14", "1,000", answer):  # the answer against numbers, and against itself
        assert accuracy_reward(A(answer), A(gt), ptype) == 0.0, (answer, gt)
        assert accuracy_reward(A(gt), A(answer), ptype) == 0.0, (gt, answer)  # a bad solution scores 0 too
    # ... also through the registry, as train.SafeRewards calls it
    assert get_reward("accuracy")(A(answer), {"solution": A("10"), "problem_type": ptype}) == 0.0


def test_the_exploit_is_real_in_video_r1_and_closed_by_default():
    # Video-R1's regression clamp: min(1, max(0, nan)) = 0 error, reward 1.0, past its 0.1 gates.
    assert video_r1_accuracy(A("nan"), A("10"), "regression") == 1.0
    assert video_r1_accuracy(A("inf"), A("inf"), "numerical") == 1.0
    assert accuracy_reward(A("nan"), A("10"), "regression") == 0.0
    assert accuracy_reward(A("inf"), A("inf"), "numerical") == 0.0


@pytest.mark.parametrize("answer", NON_FINITE + UNPARSABLE)
@pytest.mark.parametrize("gt", ["10", "0", "-3.5", "inf", "nan", "1,000"])
@pytest.mark.parametrize("ptype", ["numerical", "regression"])
def test_compat_mode_reproduces_video_r1_exactly(answer, gt, ptype):
    want = video_r1_accuracy(A(answer), A(gt), ptype)
    assert accuracy_reward(A(answer), A(gt), ptype, video_r1_compat=True) == pytest.approx(want, abs=1e-12, nan_ok=False)
    assert accuracy_reward(A(gt), A(answer), ptype, video_r1_compat=True) == pytest.approx(
        video_r1_accuracy(A(gt), A(answer), ptype), abs=1e-12)


def test_compat_mode_values_by_hand():
    compat = dict(video_r1_compat=True)
    assert accuracy_reward(A("nan"), A("10"), "regression", **compat) == 1.0
    assert accuracy_reward(A("inf"), A("10"), "regression", **compat) == 0.0  # error inf clamps to 1
    assert accuracy_reward(A("1e999"), A("10"), "regression", **compat) == 0.0
    assert accuracy_reward(A("-inf"), A("10"), "regression", **compat) == 0.0
    assert accuracy_reward(A(""), A("10"), "regression", **compat) == 0.0
    assert accuracy_reward(A("inf"), A("inf"), "numerical", **compat) == 1.0
    assert accuracy_reward(A("1e999"), A("inf"), "numerical", **compat) == 1.0
    assert accuracy_reward(A("nan"), A("nan"), "numerical", **compat) == 0.0  # nan != nan


def test_compat_switch_is_process_wide_and_set_from_the_config(tmp_path, monkeypatch):
    from videor1 import session
    from videor1.config import Config
    from videor1.train import check_config

    monkeypatch.setattr(rewards_mod, "_VIDEO_R1_COMPAT", False)  # restored after the test
    monkeypatch.setattr(session, "check_paths", lambda cfg: None)  # no files needed for this check
    row = {"solution": A("10"), "problem_type": "regression"}
    cfg = Config()
    cfg.algo.video_r1_compat_rewards = True
    check_config(cfg)
    assert video_r1_compat() and get_reward("accuracy")(A("nan"), row) == 1.0
    cfg.algo.video_r1_compat_rewards = False
    check_config(cfg)
    assert not video_r1_compat() and get_reward("accuracy")(A("nan"), row) == 0.0
    set_video_r1_compat(True)
    assert accuracy_reward(A("nan"), A("10"), "regression", video_r1_compat=False) == 0.0  # explicit wins
    with pytest.raises(TypeError):
        set_video_r1_compat("yes")


def test_accuracy_equals_video_r1_on_random_inputs():
    rng = random.Random(0)
    pieces = ["1", "2", "3.5", "0", "-4", "1,5", "10.00", "A", "B", "red", "square", "moves", "left", " ", ".", ",",
              "e", "nan", "inf", "C.", "the", "running", "ran"]
    types = ["multiple choice", "numerical", "OCR", "free-form", "regression", "other"]
    for _ in range(3000):
        out = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 4)))
        gt = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 4)))
        wrap_out = A(out) if rng.random() < 0.9 else out
        ptype = rng.choice(types)
        got = accuracy_reward(wrap_out, A(gt), ptype, video_r1_compat=True)
        assert got == pytest.approx(video_r1_accuracy(wrap_out, A(gt), ptype), abs=1e-12), (wrap_out, gt, ptype)
        safe = accuracy_reward(wrap_out, A(gt), ptype)
        assert safe == got or (safe == 0.0 and any(p in out + gt for p in ("nan", "inf"))), (wrap_out, gt, ptype)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>a</think><answer>B</answer>", 1.0),
        ("<think>a\nb</think>\n  <answer>B\n</answer>", 1.0),
        (" <think>a</think><answer>B</answer>", 0.0),
        ("<think>a</think><answer>B</answer>\n", 0.0),
        ("<answer>B</answer>", 0.0),
        ("<think>a</think>x<answer>B</answer>", 0.0),
    ],
)
def test_format_reward(text, expected):
    assert format_reward(text) == expected


def test_wer():
    assert word_error_rate("a b c", "a x c") == pytest.approx(1 / 3)
    assert word_error_rate("", "a b") == 2.0
    assert word_error_rate("a b", "a b") == 0.0


def test_registry():
    row = {"solution": A("B"), "problem_type": "multiple choice"}
    assert get_reward("accuracy")(A("B"), row) == 1.0
    assert get_reward("format")("nope", row) == 0.0

    @register_reward("test_always_half")
    def half(completion, row):
        return 0.5

    try:
        assert get_reward("test_always_half")("", row) == 0.5
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_always_half")(half)
    finally:
        REWARDS.pop("test_always_half")
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        get_reward("nope")
