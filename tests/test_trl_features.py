"""Issue 12's TRL-familiar options around the train step: max_prompt_length skips, truncated
completions, reward_weights checks, report_to trackers (none / tensorboard / wandb, optional), the
completions sample, and the console line. The algorithm's values are in test_tgrpo.py and the
cross-rank metrics in test_train_step.py; the end-to-end runs in test_train.py."""

import glob
import json
import logging
import os
import sys
import types

import pytest
import torch

from videor1.config import Config, ConfigError
from videor1.metrics import MetricsLogger, check_report_to, completions_markdown
from videor1.rollout import Prompt, truncated_completions
from videor1.sampler import PromptSampler
from videor1.session import PromptStream
from videor1.train import Group, check_config, completion_sample, summary_line

T = torch.tensor


def test_truncated_completions_are_the_ones_at_the_limit_without_eos():
    eos, pad = [7, 8], 7
    ids = T([[1, 2, 3, 4], [1, 7, pad, pad], [1, 2, 3, 8], [5, 5, 5, 5]])
    mask = T([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    assert truncated_completions(ids, mask, eos, 4).tolist() == [True, False, False, True]
    # shorter than the limit (generate stopped because every other row ended): not truncated
    assert truncated_completions(ids, mask, eos, 5).tolist() == [False] * 4


def _config(tiny_ckpt, synth_data, tmp_path) -> Config:
    cfg = Config()
    cfg.model.path, cfg.data.train_file, cfg.train.output_dir = tiny_ckpt, synth_data, str(tmp_path)
    return cfg


def test_reward_weights_need_one_weight_per_reward(tiny_ckpt, synth_data, tmp_path):
    cfg = _config(tiny_ckpt, synth_data, tmp_path)
    cfg.algo.rewards, cfg.algo.reward_weights = ["accuracy", "format"], [1.0]
    with pytest.raises(ConfigError, match=r"algo\.reward_weights has 1 entries but algo\.rewards has 2"):
        check_config(cfg)
    cfg.algo.reward_weights = [1.0, 0.5]
    check_config(cfg)


def _stream(cfg, rows, processor):
    sampler = PromptSampler(len(rows), 0, 0, 1, shuffle=False)
    return PromptStream(cfg, rows, processor, sampler, torch.Generator().manual_seed(0), shuffled=False)


def test_prompts_over_max_prompt_length_are_skipped_and_counted_apart(tiny_ckpt, synth_data, tmp_path, caplog):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    with open(synth_data) as f:
        rows = json.load(f)[:6]
    cfg = _config(tiny_ckpt, synth_data, tmp_path)
    d = cfg.data
    d.fps, d.video_min_pixels, d.video_max_pixels, d.image_min_pixels, d.image_max_pixels = 8.0, 3136, 3136, 3136, 3136
    lengths = [p.input_ids.numel() for p in _stream(cfg, rows, processor).take(len(rows))]
    limit = sorted(lengths)[len(lengths) // 2]
    too_long = [r["problem_id"] for r, n in zip(rows, lengths) if n > limit]
    assert too_long and len(too_long) < len(rows)

    d.max_prompt_length = limit
    stream = _stream(cfg, rows, processor)
    with caplog.at_level(logging.WARNING, logger="videor1"):
        kept = stream.take(len(rows) - len(too_long))
    assert all(p.input_ids.numel() <= limit for p in kept)  # skipped whole, never truncated
    assert [p.row["problem_id"] for p in kept] == [r["problem_id"] for r in rows if r["problem_id"] not in too_long]
    seen = [pid for pid in too_long if pid < kept[-1].row["problem_id"]]  # the too-long rows drawn so far
    assert seen and stream.too_long == len(seen) and stream.skipped == 0  # not decode failures
    assert stream.attempted == len(kept) + len(seen)
    for pid in seen:
        assert f"skipping problem {pid}: prompt of" in caplog.text
    assert "max_prompt_length" in caplog.text
    # the counter travels with a checkpoint
    state = stream.state_dict()
    assert state["too_long"] == len(seen)
    restored = _stream(cfg, rows, processor)
    restored.load_state_dict(state)
    assert restored.too_long == len(seen)
    # every prompt too long: a clear error instead of an endless search
    d.max_prompt_length, d.skip_rate_min_samples = 1, 3
    with pytest.raises(RuntimeError, match="longer than data.max_prompt_length=1"):
        _stream(cfg, rows, processor).take(1)


def _group() -> Group:
    g = Group(Prompt({"problem_id": 3, "problem": "Which came first?", "data_type": "video"},
                     torch.zeros(2, dtype=torch.long), {}),
              torch.zeros(5, 2), torch.ones(5, 2), T([2, 2, 2, 2, 2]),
              {"accuracy": T([1.0, 0.0, 1.0, 0.0, 1.0]), "format": T([1.0, 1.0, 0.0, 0.0, 1.0])},
              texts=["<answer>A</answer>", "B | C\nD", "x", "y", "z"])
    g.total = g.rewards["accuracy"] + g.rewards["format"]
    g.advantages = T([1.0, -0.5, 0.0, -1.0, 1.0])
    return g


def test_completion_sample_holds_the_problem_and_four_completions():
    sample = completion_sample(7, _group())
    assert (sample["step"], sample["problem_id"], sample["problem"], sample["data_type"]) == (
        7, 3, "Which came first?", "video")
    assert len(sample["completions"]) == 4
    first = sample["completions"][0]
    assert first == {"text": "<answer>A</answer>", "rewards": {"accuracy": 1.0, "format": 1.0}, "reward": 2.0,
                     "advantage": 1.0}
    assert sample["completions"][1]["advantage"] == -0.5
    json.dumps(sample)  # plain JSON
    md = completions_markdown(sample)
    assert "problem 3" in md and "B \\| C<br>D" in md  # table-safe


def test_summary_line():
    rec = {"step": 3, "reward": 1.25, "acc/ordered": 0.5, "kl": 0.001, "loss": -0.02, "time/step": 1.5}
    assert summary_line(rec, 10) == "step 3/10: reward 1.2500 acc 0.500 kl 0.00100 loss -0.02000 step 1.50s"


def test_report_to_none_writes_jsonl_only(tmp_path):
    logger = MetricsLogger(str(tmp_path), "none", True)
    logger.log({"step": 1, "loss": 0.5})
    logger.log_completions(completion_sample(1, _group()))
    logger.close()
    assert [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")] == [0.5]
    assert json.loads(open(tmp_path / "completions.jsonl").read())["problem_id"] == 3
    assert not os.path.exists(tmp_path / "tensorboard")
    # a fresh run starts both files anew; a resume keeps the lines up to the resumed step
    with open(tmp_path / "completions.jsonl", "a") as f:
        f.write('{"step": 2, "problem_id": 3}\n{"step": 3, "probl')  # a later step, then a write torn by a crash
    logger = MetricsLogger(str(tmp_path), "none", True, resume_step=1)
    assert [json.loads(line)["step"] for line in open(tmp_path / "completions.jsonl")] == [1]
    MetricsLogger(str(tmp_path), "none", True)
    assert not os.path.exists(tmp_path / "completions.jsonl")
    MetricsLogger(str(tmp_path / "other"), "none", False).log({"step": 1})  # not rank 0: writes nothing
    assert not os.path.exists(tmp_path / "other")


def test_report_to_tensorboard_writes_scalars_and_completion_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(str(tmp_path), "tensorboard", True)
    logger.log({"step": 1, "loss": 0.5, "reward_std": 0.25, "lr": float("nan")})
    logger.log_completions(completion_sample(1, _group()))
    logger.close()
    (events,) = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    acc = EventAccumulator(os.path.dirname(events))
    acc.Reload()
    tags = acc.Tags()
    assert {"loss", "reward_std"} <= set(tags["scalars"]) and "lr" not in tags["scalars"]
    assert any(t.startswith("completions") for t in tags["tensors"])


def test_report_to_wandb_missing_fails_before_any_model_loads(tiny_ckpt, synth_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match="report_to=wandb needs the wandb package"):
        check_report_to("wandb")
    from videor1 import session
    from videor1.train import main

    monkeypatch.setattr(session, "build_models", lambda *a, **k: pytest.fail("models loaded"))
    args = ["--model.path", tiny_ckpt, "--data.train_file", synth_data, "--train.output_dir", str(tmp_path),
            "--train.report_to", "wandb"]
    with pytest.raises(ConfigError, match="wandb"):
        main(args)
    check_report_to("none")


def test_report_to_wandb_inits_and_logs(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run(),
                                 Table=lambda columns, data: ("table", columns, data))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    check_report_to("wandb")
    logger = MetricsLogger(str(tmp_path), "wandb", True, run_config={"algo": {"beta": 0.04}})
    logger.log({"step": 2, "loss": 0.5, "step_skipped": False})
    logger.log_completions(completion_sample(2, _group()))
    logger.close()
    assert calls[0] == ("init", {"project": "videor1", "dir": str(tmp_path), "config": {"algo": {"beta": 0.04}},
                                 "mode": "offline"})
    assert calls[1] == ("log", {"loss": 0.5, "step_skipped": False}, 2)
    assert calls[2][0] == "log" and calls[2][1]["completions"][0] == "table" and calls[2][2] == 2
    assert calls[-1] == ("finish",)


def test_truncated_completions_leave_the_loss_but_keep_their_rewards(tiny_ckpt, synth_data):
    """mask_truncated_completions (TRL): a completion at max_completion_length without EOS gets an
    all-zero loss mask, while it is still scored and counts in its group's advantages."""
    from transformers import AutoProcessor

    from standin import StandInEngine, StandInVL
    from videor1.metrics import StepTimer
    from videor1.policy import PolicyModule
    from videor1.rollout import prepare_prompt, vision_token_ids
    from videor1.session import special_ids
    from videor1.train import SafeRewards, StepContext, step_record, tgrpo_step

    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    tok = processor.tokenizer
    with open(synth_data) as f:
        row = next(r for r in json.load(f) if r["data_type"] == "image")
    cfg = Config()
    d = cfg.data
    d.image_min_pixels, d.image_max_pixels = 3136, 3136
    cfg.rollout.num_generations, cfg.rollout.max_completion_length = 4, 3
    cfg.algo.rewards, cfg.algo.kernel_backend, cfg.algo.mask_truncated_completions = ["accuracy", "format"], "torch", True
    cfg.algo.beta = 0.0  # no reference engine
    cfg.train.shared_prefix = False  # the stand-in has no attention and no KV cache to share a prefix through
    cfg.rollout.batch_requests = False
    prompt = prepare_prompt(row, processor, d, os.path.dirname(synth_data), shuffled=False)
    policy = StandInEngine(PolicyModule(StandInVL(tok, seed=0), kernel_backend="torch"), torch.device("cpu"), "fsdp2")
    eos_ids, pad_id = special_ids(tok)
    ctx = StepContext(cfg, policy, None, tok, SafeRewards(cfg.algo.rewards), eos_ids, pad_id, vision_token_ids(tok))
    torch.manual_seed(0)
    timer = StepTimer()
    (g,), stats = tgrpo_step(ctx, [prompt], timer)
    assert g.truncated.any()  # random tokens from a stand-in: EOS is rare in 3 tokens
    assert torch.equal(g.truncated, truncated_completions(g.completion_ids, g.mask, eos_ids, 3))
    assert torch.equal(g.loss_mask.sum(1) == 0, g.truncated) and torch.equal(g.mask.sum(1), g.lengths)
    assert torch.equal(g.loss_lengths, g.lengths * ~g.truncated)
    assert g.total.shape == (4,) and g.advantages.shape == (4,) and len(g.texts) == 4  # all scored
    assert stats.tokens == float(g.loss_lengths.sum())
    record = step_record(1, [g], stats, timer, 1.0, 0, 1, 0)
    assert record["clipped_ratio"] == pytest.approx(float(g.truncated.float().mean()))
