"""The run directory: refusal of a used output_dir, overwrite, config hash checked on resume,
save_total_limit, writability, and the errors that used to escape bare."""

import json
import os

import pytest

from videor1 import session
from videor1.checkpoint import STATE_FILE, complete_checkpoints, latest_checkpoint, prune_checkpoints
from videor1.config import RESUME_IGNORED_KEYS, ConfigError, config_changes, config_hash, load_config, to_dict
from videor1.data import DataError, load_rows


def make_cfg(tmp_path, *extra):
    """A config whose paths exist (check_paths only looks at the filesystem)."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    data = tmp_path / "train.json"
    data.write_text("[]")
    return load_config(None, ["--model.path", str(model), "--data.train_file", str(data),
                              "--train.output_dir", str(tmp_path / "out"), *extra])


class FakeEngine:
    def __init__(self):
        self.saved = []

    def save(self, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "engine.bin"), "w") as f:
            f.write("weights")
        self.saved.append(path)


class Stateful:
    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def write_checkpoint(cfg, step, hf_writer=None):
    return session.checkpoint(cfg, step, FakeEngine(), {"stream": Stateful()}, {}, hf_writer=hf_writer)


# ------------------------------------------------------------------------------------------------
# A fresh run into a used output_dir.


def test_fresh_run_into_an_empty_or_missing_dir_starts(tmp_path):
    cfg = make_cfg(tmp_path)
    session.check_paths(cfg)  # missing: created, writable
    assert os.path.isdir(cfg.train.output_dir) and os.listdir(cfg.train.output_dir) == []
    session.check_paths(cfg)  # empty: fine
    # A launcher's log file (the demo writes sft.log there before the run) is not an earlier run.
    (tmp_path / "out" / "train.log").write_text("starting\n")
    session.check_paths(cfg)


@pytest.mark.parametrize("leftover", ["metrics.jsonl", "checkpoint-4", "final", "config.yaml", "checkpoint-2.tmp"])
def test_fresh_run_into_a_used_dir_refuses(tmp_path, leftover):
    cfg = make_cfg(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / leftover).mkdir() if "checkpoint" in leftover or leftover == "final" else (out / leftover).write_text("{}")
    with pytest.raises(ConfigError) as e:
        session.check_paths(cfg)
    msg = str(e.value)
    assert str(out) in msg and leftover in msg and "overwrite_output_dir" in msg and "resume_from" in msg
    assert (out / leftover).exists()  # nothing was touched


def test_resume_auto_without_a_complete_checkpoint_still_refuses(tmp_path):
    cfg = make_cfg(tmp_path, "--train.resume_from", "auto")
    out = tmp_path / "out"
    (out / "checkpoint-2.tmp").mkdir(parents=True)  # a crash mid-save: not a complete checkpoint
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="found no complete checkpoint there"):
        session.check_paths(cfg)


def test_overwrite_removes_the_earlier_run_and_keeps_other_files(tmp_path, caplog):
    cfg = make_cfg(tmp_path, "--overwrite_output_dir", "true")
    out = tmp_path / "out"
    for d in ("checkpoint-2", "checkpoint-4", "checkpoint-6.tmp", "final", "tensorboard"):
        (out / d).mkdir(parents=True)
        (out / d / "x").write_text("x")
    for f in ("metrics.jsonl", "completions.jsonl", "config.yaml", "reward_curves.png", "notes.txt", "train.log"):
        (out / f).write_text("old")
    with caplog.at_level("WARNING", logger="videor1"):
        session.check_paths(cfg)
    assert sorted(os.listdir(out)) == ["notes.txt", "train.log"]
    assert "removed" in caplog.text and "checkpoint-4" in caplog.text and "metrics.jsonl" in caplog.text


def test_overwrite_with_auto_resumes_when_it_can_else_starts_fresh(tmp_path):
    cfg = make_cfg(tmp_path, "--overwrite_output_dir", "true", "--train.resume_from", "auto")
    out = cfg.train.output_dir
    os.makedirs(out)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:  # a run that died before its first checkpoint
        f.write('{"step": 1}\n')
    session.check_paths(cfg)
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))  # nothing to resume: fresh, old outputs gone
    write_checkpoint(cfg, 2)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1}\n{"step": 2}\n')
    session.check_paths(cfg)  # a complete checkpoint: resumed, nothing removed
    assert session.resume_path(cfg) == os.path.join(out, "checkpoint-2")
    assert os.path.exists(os.path.join(out, "metrics.jsonl"))


def test_overwrite_contradicting_an_explicit_resume_is_refused(tmp_path):
    inside = tmp_path / "out" / "checkpoint-2"
    inside.mkdir(parents=True)
    with pytest.raises(ConfigError, match="would remove train.resume_from"):
        session.check_paths(make_cfg(tmp_path, "--overwrite_output_dir", "true", "--train.resume_from", str(inside)))


def test_output_dir_must_be_writable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a dir")
    cfg = make_cfg(tmp_path, "--train.output_dir", str(blocker / "run"))
    with pytest.raises(ConfigError, match=r"train.output_dir '.*a_file/run' is not writable"):
        session.check_paths(cfg)
    with pytest.raises(ConfigError, match="is not a directory"):
        session.check_paths(make_cfg(tmp_path, "--train.output_dir", str(blocker)))
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="not writable"):
            session.check_writable(str(ro))
    session.check_writable(str(tmp_path / "fine"))
    assert os.listdir(tmp_path / "fine") == []  # the probe is removed


# ------------------------------------------------------------------------------------------------
# Checkpoints record the seed and the config; resume compares them.


def test_checkpoint_records_seed_hash_and_config_and_calls_the_hf_writer(tmp_path):
    cfg = make_cfg(tmp_path, "--train.seed", "7")
    seen = []

    def hf_writer(tmp_dir):
        seen.append(tmp_dir)
        assert tmp_dir.endswith("checkpoint-3.tmp") and os.path.isfile(os.path.join(tmp_dir, "engine.bin"))
        assert not os.path.exists(tmp_dir[: -len(".tmp")])  # before the atomic rename
        with open(os.path.join(tmp_dir, "config.json"), "w") as f:
            f.write("{}")

    path = write_checkpoint(cfg, 3, hf_writer)
    assert seen == [path + ".tmp"] and not os.path.exists(path + ".tmp")
    assert os.path.isfile(os.path.join(path, "config.json"))  # the writer's files are in the checkpoint
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    assert state["step"] == 3 and state["seed"] == 7
    assert state["config_hash"] == config_hash(cfg) and len(state["config_hash"]) == 16
    assert state["config"] == json.loads(json.dumps(to_dict(cfg)))
    assert state["ranks"] == [{"stream": {"n": 0}}]


def test_config_hash_ignores_run_plumbing_only(tmp_path):
    base = make_cfg(tmp_path)
    plumbing = make_cfg(tmp_path, "--train.output_dir", "/elsewhere", "--max_steps", "99", "--save_steps", "5",
                        "--save_total_limit", "2", "--logging_steps", "3", "--report_to", "tensorboard",
                        "--num_train_epochs", "3", "--train.resume_allow_changes", "[algo.beta]",
                        "--train.dist_timeout_s", "30", "--data.cache_media", "true", "--log_completions", "true")
    assert config_hash(plumbing) == config_hash(base)
    for args in (["--seed", "1"], ["--beta", "0.0"], ["--learning_rate", "1e-3"], ["--num_generations", "4"],
                 ["--model.path", str(tmp_path)], ["--scale_rewards", "batch"]):
        assert config_hash(make_cfg(tmp_path, *args)) != config_hash(base), args
    assert "train.seed" not in RESUME_IGNORED_KEYS and "model.path" not in RESUME_IGNORED_KEYS


def test_resume_refuses_a_different_config_naming_the_keys(tmp_path):
    ckpt = write_checkpoint(make_cfg(tmp_path), 2)
    cfg = make_cfg(tmp_path, "--train.resume_from", "auto", "--beta", "0.0", "--seed", "3")
    with pytest.raises(ConfigError) as e:
        session.check_paths(cfg)
    msg = str(e.value)
    assert ckpt in msg
    assert "algo.beta: 0.04 -> 0.0" in msg and "train.seed: 0 -> 3" in msg
    assert "resume_allow_changes" in msg and "optim.lr" not in msg


def test_resume_allows_listed_changes_and_plumbing(tmp_path, caplog):
    write_checkpoint(make_cfg(tmp_path), 2)
    # max_steps, save_steps, output_dir-independent plumbing: no listing needed.
    session.check_paths(make_cfg(tmp_path, "--train.resume_from", "auto", "--max_steps", "50", "--save_steps", "7"))
    # A deliberate change, listed: allowed, and logged.
    cfg = make_cfg(tmp_path, "--train.resume_from", "auto", "--beta", "0.0",
                   "--train.resume_allow_changes", "[algo.beta]")
    with caplog.at_level("WARNING", logger="videor1"):
        session.check_paths(cfg)
    assert "algo.beta: 0.04 -> 0.0" in caplog.text
    # Listing one key does not allow another.
    cfg = make_cfg(tmp_path, "--train.resume_from", "auto", "--beta", "0.0", "--num_iterations", "2",
                   "--train.resume_allow_changes", "[algo.beta]")
    with pytest.raises(ConfigError, match=r"algo.num_iterations: 1 -> 2") as e:
        session.check_paths(cfg)
    assert "algo.beta" not in str(e.value)


def test_resume_from_an_explicit_checkpoint_elsewhere_is_checked_too(tmp_path):
    other = make_cfg(tmp_path, "--train.output_dir", str(tmp_path / "other"))
    ckpt = write_checkpoint(other, 4)
    session.check_paths(make_cfg(tmp_path, "--resume_from_checkpoint", ckpt))  # into an empty output_dir
    with pytest.raises(ConfigError, match=r"rollout.temperature: 1.0 -> 0.5"):
        session.check_paths(make_cfg(tmp_path, "--resume_from_checkpoint", ckpt, "--temperature", "0.5"))


def test_resume_from_elsewhere_into_a_used_dir_refuses(tmp_path):
    ckpt = write_checkpoint(make_cfg(tmp_path, "--train.output_dir", str(tmp_path / "other")), 4)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="lies outside it"):
        session.check_paths(make_cfg(tmp_path, "--resume_from_checkpoint", ckpt))
    session.check_paths(make_cfg(tmp_path, "--resume_from_checkpoint", ckpt, "--overwrite_output_dir", "true"))
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and os.path.isdir(ckpt)


def test_config_changes_lists_old_and_new():
    a = to_dict(load_config())
    b = to_dict(load_config(None, ["--epsilon_high", "0.28", "--max_steps", "9"]))
    assert config_changes(a, b) == {"algo.eps_high": (0.2, 0.28)}
    del a["algo"]["eps_low"]  # a key an older version did not have
    assert config_changes(a, b)["algo.eps_low"] == ("<absent>", 0.2)


# ------------------------------------------------------------------------------------------------
# save_total_limit.


def test_save_total_limit_keeps_the_last_n_after_the_new_one_is_complete(tmp_path):
    cfg = make_cfg(tmp_path, "--save_total_limit", "2")
    out = cfg.train.output_dir
    os.makedirs(os.path.join(out, "final"))
    os.makedirs(os.path.join(out, "checkpoint-9.tmp"))  # someone else's half-written save: untouched
    existing_at_write = []

    def hf_writer(tmp_dir):  # called before the rename: nothing deleted yet
        existing_at_write.append(sorted(s for s, _ in complete_checkpoints(out)))

    for step in (1, 2, 3, 4):
        write_checkpoint(cfg, step, hf_writer)
    assert [s for s, _ in complete_checkpoints(out)] == [3, 4]
    assert existing_at_write == [[], [1], [1, 2], [2, 3]]  # the old ones survive until the new one is complete
    assert os.path.isdir(os.path.join(out, "final")) and os.path.isdir(os.path.join(out, "checkpoint-9.tmp"))
    assert latest_checkpoint(out) == os.path.join(out, "checkpoint-4")


def test_save_total_limit_zero_keeps_all_and_prune_ignores_incomplete(tmp_path):
    cfg = make_cfg(tmp_path)
    for step in (1, 2, 3):
        write_checkpoint(cfg, step)
    out = cfg.train.output_dir
    assert [s for s, _ in complete_checkpoints(out)] == [1, 2, 3]
    os.makedirs(os.path.join(out, "checkpoint-0"))  # no trainer_state.json: not a checkpoint, not counted
    assert prune_checkpoints(out, 1) == [os.path.join(out, "checkpoint-1"), os.path.join(out, "checkpoint-2")]
    assert sorted(os.listdir(out)) == ["checkpoint-0", "checkpoint-3"]


# ------------------------------------------------------------------------------------------------
# Errors that used to escape bare.


def test_non_utf8_data_file_names_the_file_and_byte_offset(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes(b'[{"problem": "caf\xe9"}]')
    with pytest.raises(DataError) as e:
        load_rows(str(path))
    assert str(path) in str(e.value) and "byte offset 17" in str(e.value) and "0xe9" in str(e.value)
    jl = tmp_path / "train.jsonl"
    jl.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n')
    with pytest.raises(DataError, match=r"byte offset 16 \(line 2\)"):
        load_rows(str(jl))


def test_malformed_deepspeed_json_names_file_and_position(tmp_path):
    from videor1.engine import load_deepspeed_config

    ds = tmp_path / "zero.json"
    ds.write_text('{\n  "zero_optimization": {"stage": 3,}\n}\n')
    cfg = make_cfg(tmp_path, "--train.engine", "deepspeed", "--train.deepspeed_config", str(ds))
    with pytest.raises(ConfigError, match=r"zero\.json is not valid JSON: .* at line 2 column 36"):
        load_deepspeed_config(cfg, 1)
    with pytest.raises(ConfigError, match=r"zero\.json is not valid JSON"):
        session.check_paths(cfg)  # before any model loads
    ds.write_text('{"zero_optimization": {"stage": 3}}')
    assert load_deepspeed_config(cfg, 2)["gradient_accumulation_steps"] == 2


def test_missing_reward_module_is_a_config_error(tmp_path):
    from videor1.train import check_config

    cfg = make_cfg(tmp_path, "--algo.reward_modules", "[no_such_reward_module_xyz]")
    with pytest.raises(ConfigError, match=r"algo.reward_modules: cannot import 'no_such_reward_module_xyz'"):
        check_config(cfg)


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    from videor1.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "loss": 0.3}\n{"step": 4, "lo')
    with caplog.at_level("WARNING", logger="videor1"):
        logger = MetricsLogger(str(tmp_path), "none", True, resume_step=3)
    assert "torn last line" in caplog.text
    logger.log({"step": 4, "loss": 0.2})
    logger.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 0.5), (2, 0.4), (3, 0.3), (4, 0.2)]
    # A damaged line in the middle is not silently dropped.
    path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        MetricsLogger(str(tmp_path), "none", True, resume_step=2)


# ------------------------------------------------------------------------------------------------
# End to end under torchrun: refusal, resume mismatch, overwrite.


def test_used_output_dir_refuses_then_resume_mismatch_then_overwrite(tiny_ckpt, synth_data, tmp_path):
    from test_train import base_args, check_ok, metrics, torchrun

    from videor1.train import main

    out = tmp_path / "run"
    args = base_args(tiny_ckpt, synth_data, out) + ["--train.save_hf_checkpoints", "false"]
    proc = torchrun(args + ["--max_steps", "3", "--train.save_steps", "1", "--save_total_limit", "1"])
    check_ok(proc)
    assert [s for s, _ in complete_checkpoints(str(out))] == [2]  # checkpoint-1 deleted once 2 was complete
    assert os.path.isdir(out / "final") and [r["step"] for r in metrics(out)] == [1, 2, 3]

    # A fresh run into it refuses, before any model loads, and leaves everything in place.
    proc = torchrun(args + ["--max_steps", "2"])
    assert proc.returncode != 0 and "is not empty" in proc.stderr and "overwrite_output_dir" in proc.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    # Resuming with a different training config refuses, naming the key.
    with pytest.raises(ConfigError, match=r"algo.beta: 0.04 -> 0.0"):
        main(args + ["--max_steps", "4", "--train.resume_from", "auto", "--beta", "0.0"])

    # Overwrite: the old run's outputs go, on both ranks consistently, and a new run trains.
    proc = torchrun(args + ["--max_steps", "1", "--overwrite_output_dir", "true"])
    check_ok(proc)
    assert "removed" in proc.stderr and "checkpoint-2" in proc.stderr
    assert [r["step"] for r in metrics(out)] == [1]
    assert complete_checkpoints(str(out)) == [] and os.path.isdir(out / "final")
