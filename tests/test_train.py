"""End-to-end T-GRPO runs under torchrun on the CPU (gloo): both engines, resume, and faults."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from videor1.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(REPO, "videor1", "train.py")


def base_args(tiny_ckpt, synth_data, out):
    return [
        "--config", os.path.join(REPO, "configs", "tiny_cpu.yaml"),
        "--model.path", tiny_ckpt, "--data.train_file", synth_data, "--train.output_dir", str(out),
        "--rollout.num_generations", "4", "--rollout.max_completion_length", "12",
        "--train.per_device_batch_size", "1", "--train.save_steps", "2",
        "--algo.reward_modules", "[reward_plugins]", "--algo.rewards", "[accuracy, format, test_signal]",
        "--optim.lr", "0.01", "--optim.warmup_ratio", "0",
    ]


def torchrun(args, nproc=2, env=None, timeout=420):
    full_env = {**os.environ, "PYTHONPATH": TESTS, "HF_HUB_OFFLINE": "1", "DS_BUILD_OPS": "0",
                "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TRAIN, *args]
    return subprocess.run(cmd, env=full_env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


REQUIRED = ["loss", "reward", "reward/accuracy", "reward/format", "reward/test_signal", "reward/length_bonus",
            "reward/temporal_bonus", "acc/ordered", "kl", "clip_ratio", "completion_length", "grad_norm", "lr",
            "time/rollout", "time/reference", "time/policy", "time/optimizer", "tokens_per_s", "peak_mem_gb",
            "reward_std", "frac_reward_zero_std", "frac_all_correct", "frac_all_wrong", "clipped_ratio",
            "samples_too_long"]


@pytest.fixture(scope="module")
def fsdp_run(tiny_ckpt, synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    proc = torchrun(base_args(tiny_ckpt, synth_data, out) + ["--train.max_steps", "4", "--train.engine", "fsdp2",
                                                             "--train.report_to", "tensorboard", "--train.logging_steps",
                                                             "2", "--train.log_completions", "true"])
    check_ok(proc)
    return str(out), proc


def test_fsdp2_two_ranks_trains_and_logs(fsdp_run, tiny_ckpt):
    out, proc = fsdp_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for key in REQUIRED:
            assert key in r, key
        assert not r["step_skipped"]
        assert 0 < r["completion_length"] <= 12
        assert r["grad_norm"] > 0  # the dense test reward gives non-zero advantages
    assert any(r["kl"] > 0 for r in rows[1:])  # the policy moved away from the reference
    assert any("acc/shuffled" in r for r in rows)  # video prompts had shuffled rollouts
    # Final model: HF format, loads, and differs from the starting weights.
    from transformers import AutoModelForImageTextToText

    final = AutoModelForImageTextToText.from_pretrained(os.path.join(out, "final"))
    start = AutoModelForImageTextToText.from_pretrained(tiny_ckpt)
    assert not torch.equal(final.lm_head.weight, start.lm_head.weight)
    assert os.path.isfile(os.path.join(out, "reward_curves.png"))
    assert "metric" in proc.stdout and "final model:" in proc.stdout  # the summary table
    # checkpoint-2 holds an HF copy of the step-2 weights (train.save_hf_checkpoints, on by default)
    ckpt = AutoModelForImageTextToText.from_pretrained(os.path.join(out, "checkpoint-2", "hf"))
    assert not torch.equal(ckpt.lm_head.weight, start.lm_head.weight)
    assert not torch.equal(ckpt.lm_head.weight, final.lm_head.weight)
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "hf", "processor_config.json"))
    # logging_steps 2: the console line at steps 2 and 4; a completions sample at each, TensorBoard events
    assert "step 2/4: reward" in proc.stderr and "step 4/4: reward" in proc.stderr and "step 1/4:" not in proc.stderr
    with open(os.path.join(out, "completions.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert [s["step"] for s in samples] == [2, 4]
    for s in samples:
        assert {"problem_id", "problem", "data_type"} <= set(s) and 1 <= len(s["completions"]) <= 4
        assert {"text", "rewards", "reward", "advantage"} == set(s["completions"][0])
    assert os.listdir(os.path.join(out, "tensorboard"))


def test_resume_continues_exactly(fsdp_run, tiny_ckpt, synth_data, tmp_path):
    out, _ = fsdp_run
    ckpt = os.path.join(out, "checkpoint-2")
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        state = json.load(f)
    # Every rank's data position and reward-error counts travel with the checkpoint.
    assert [sorted(r) for r in state["ranks"]] == [["rewards", "stream"]] * 2
    proc = torchrun(base_args(tiny_ckpt, synth_data, tmp_path) + ["--train.max_steps", "4", "--train.engine", "fsdp2",
                                                                   "--train.resume_from", ckpt])
    check_ok(proc)
    resumed, full = metrics(tmp_path), metrics(out)
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(resumed, full[2:]):
        for key in ("loss", "reward", "kl", "grad_norm", "completion_length", "reward/test_signal", "reward_errors",
                    "samples_attempted", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (key, a[key], b[key])


def test_deepspeed_zero3_two_ranks_two_iterations(tiny_ckpt, synth_data, tmp_path):
    """ZeRO-3, and each batch of rollouts used twice (old log-probs, two optimiser steps per step)."""
    proc = torchrun(base_args(tiny_ckpt, synth_data, tmp_path) + ["--train.max_steps", "3", "--train.engine", "deepspeed",
                                                                   "--train.deepspeed_config", "configs/zero3.json",
                                                                   "--algo.num_iterations", "2",
                                                                   "--algo.scale_rewards", "batch",
                                                                   "--algo.reward_weights", "[1.0, 0.5, 1.0]"],
                    env={"TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".venv", "torch_extensions")})
    check_ok(proc)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["grad_norm"] > 0 and not r["step_skipped"] for r in rows)
    # The cosine schedule spans 3 x 2 optimiser steps; "lr" is the rate of each step's last one (1, 3, 5).
    want = [0.01 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in (1, 3, 5)]
    assert [r["lr"] for r in rows] == pytest.approx(want, rel=1e-6)
    assert os.path.isfile(os.path.join(tmp_path, "checkpoint-2", "trainer_state.json"))
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(os.path.join(tmp_path, "final"))
    AutoModelForImageTextToText.from_pretrained(os.path.join(tmp_path, "checkpoint-2", "hf"))  # ZeRO-3 gathered


def test_bad_config_fails_before_any_model_loads(tiny_ckpt, synth_data, tmp_path):
    from videor1.train import main

    with pytest.raises(ConfigError, match=r"rollout\.bogus"):
        main(base_args(tiny_ckpt, synth_data, tmp_path) + ["--rollout.bogus", "1"])
    with pytest.raises(ConfigError, match="missing.json"):
        main(base_args(tiny_ckpt, str(tmp_path / "missing.json"), tmp_path))
    with pytest.raises(ConfigError, match="unknown reward 'nope'"):
        main(base_args(tiny_ckpt, synth_data, tmp_path) + ["--algo.rewards", "[accuracy, nope]"])


def _with_missing_videos(synth_data, tmp_path, missing_every):
    with open(synth_data) as f:
        rows = json.load(f)
    for i, row in enumerate(rows):
        if i % missing_every == 0:
            row["path"] = f"./videos/missing-{i}.mp4"
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows))
    return str(path)


def test_missing_videos_are_skipped_counted_then_fatal(tiny_ckpt, synth_data, tmp_path):
    data = _with_missing_videos(synth_data, tmp_path, missing_every=4)
    args = base_args(tiny_ckpt, synth_data, tmp_path / "a")
    args[args.index("--data.train_file") + 1] = data
    args += ["--data.data_root", os.path.dirname(synth_data), "--train.max_steps", "3", "--train.save_steps", "0"]
    # Tolerated: 1 in 4 missing under a 50% threshold -> skipped, counted, logged with the path.
    proc = torchrun(args + ["--data.max_skip_rate", "0.5", "--data.skip_rate_min_samples", "4"], nproc=1)
    check_ok(proc)
    rows = metrics(tmp_path / "a")
    assert rows[-1]["samples_skipped"] >= 1
    assert "missing-" in proc.stderr and "skipping problem" in proc.stderr
    # Over the threshold: a clear error, the job exits non-zero.
    args[args.index("--train.output_dir") + 1] = str(tmp_path / "b")
    proc = torchrun(args + ["--data.max_skip_rate", "0.01", "--data.skip_rate_min_samples", "2"], nproc=1)
    assert proc.returncode != 0
    assert "could not be loaded" in proc.stderr and "max_skip_rate" in proc.stderr


def test_raising_reward_scores_zero_and_nan_step_is_skipped(tiny_ckpt, synth_data, tmp_path):
    args = base_args(tiny_ckpt, synth_data, tmp_path) + [
        "--algo.rewards", "[accuracy, format, test_signal, test_raises]", "--train.max_steps", "3",
        "--train.save_steps", "0"]
    # test_signal's 5th call returns NaN: that step's loss and gradient are non-finite -> skipped.
    proc = torchrun(args, nproc=1, env={"VIDEOR1_TEST_RAISE": "1", "VIDEOR1_TEST_NAN_CALL": "5"})
    check_ok(proc)
    rows = metrics(tmp_path)
    assert rows[-1]["reward_errors"] > 0
    assert proc.stderr.count("reward 'test_raises' raised ValueError") == 1  # logged once per kind
    skipped = [r for r in rows if r["step_skipped"]]
    assert len(skipped) == 1 and "non-finite gradient" in proc.stderr
    assert all(r["step_skipped"] or r["grad_norm"] > 0 for r in rows)


def test_dead_rank_fails_the_job_and_keeps_the_last_checkpoint(tiny_ckpt, synth_data, tmp_path):
    args = base_args(tiny_ckpt, synth_data, tmp_path) + ["--train.max_steps", "4", "--train.dist_timeout_s", "60"]
    # rank 1 calls test_signal 4 times a step (ordered rollouts only): call 10 is in step 3.
    proc = torchrun(args, env={"VIDEOR1_TEST_DIE_CALL": "10"}, timeout=240)
    assert proc.returncode != 0
    ckpt = os.path.join(tmp_path, "checkpoint-2")
    assert os.path.isfile(os.path.join(ckpt, "trainer_state.json"))
    assert not os.path.exists(os.path.join(tmp_path, "final"))
    from videor1.checkpoint import latest_checkpoint

    assert latest_checkpoint(str(tmp_path)) == ckpt
