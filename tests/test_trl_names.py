"""TRL GRPOConfig names: flat, in YAML and on the command line, mapped onto our dotted keys."""

import math

import pytest

from videor1.config import TRL_NAMES, ConfigError, load_config, parse_cli, to_dict


def cli(*args):
    return parse_cli(list(args))


# (TRL flag, its value on the command line, the dotted key, the value it must give there)
CASES = [
    ("max_steps", "5", "train.max_steps", 5),
    ("num_train_epochs", "2.5", "train.num_epochs", 2.5),
    ("per_device_train_batch_size", "3", "train.per_device_batch_size", 3),
    ("gradient_accumulation_steps", "4", "optim.grad_accum", 4),
    ("learning_rate", "2e-5", "optim.lr", 2e-5),
    ("weight_decay", "0.01", "optim.weight_decay", 0.01),
    ("warmup_ratio", "0.1", "optim.warmup_ratio", 0.1),
    ("lr_scheduler_type", "linear", "optim.scheduler", "linear"),
    ("lr_scheduler_type", "constant_with_warmup", "optim.scheduler", "constant"),
    ("max_grad_norm", "1.0", "optim.max_grad_norm", 1.0),
    ("seed", "42", "train.seed", 42),
    ("output_dir", "/tmp/run7", "train.output_dir", "/tmp/run7"),
    ("overwrite_output_dir", "true", "train.overwrite_output_dir", True),
    ("resume_from_checkpoint", "/tmp/run7/checkpoint-4", "train.resume_from", "/tmp/run7/checkpoint-4"),
    ("resume_from_checkpoint", "true", "train.resume_from", "auto"),
    ("resume_from_checkpoint", "false", "train.resume_from", ""),
    ("save_steps", "50", "train.save_steps", 50),
    ("save_total_limit", "2", "train.save_total_limit", 2),
    ("save_total_limit", "null", "train.save_total_limit", 0),
    ("logging_steps", "10", "train.logging_steps", 10),
    ("report_to", "tensorboard", "train.report_to", "tensorboard"),
    ("report_to", "[wandb]", "train.report_to", "wandb"),
    ("report_to", "[]", "train.report_to", "none"),
    ("report_to", "none", "train.report_to", "none"),
    ("log_completions", "true", "train.log_completions", True),
    ("bf16", "true", "train.mixed_precision", "bf16"),
    ("bf16", "false", "train.mixed_precision", "no"),
    ("gradient_checkpointing", "true", "model.gradient_checkpointing", True),
    ("num_generations", "4", "rollout.num_generations", 4),
    ("max_completion_length", "256", "rollout.max_completion_length", 256),
    ("max_prompt_length", "2048", "data.max_prompt_length", 2048),
    ("max_prompt_length", "null", "data.max_prompt_length", 0),
    ("temperature", "0.7", "rollout.temperature", 0.7),
    ("top_p", "0.9", "rollout.top_p", 0.9),
    ("top_k", "50", "rollout.top_k", 50),
    ("top_k", "null", "rollout.top_k", 0),
    ("min_p", "0.05", "rollout.min_p", 0.05),
    ("repetition_penalty", "1.1", "rollout.repetition_penalty", 1.1),
    ("beta", "0.0", "algo.beta", 0.0),
    ("epsilon_high", "0.28", "algo.eps_high", 0.28),
    ("importance_sampling_level", "sequence", "algo.importance_level", "sequence"),
    ("loss_type", "dr_grpo", "algo.loss_type", "dr_grpo"),
    ("loss_type", "bnpo", "algo.loss_type", "bnpo"),
    ("loss_type", "dapo", "algo.loss_type", "dapo"),
    ("scale_rewards", "batch", "algo.scale_rewards", "batch"),
    ("scale_rewards", "none", "algo.scale_rewards", "none"),
    ("scale_rewards", "true", "algo.scale_rewards", "group"),
    ("scale_rewards", "false", "algo.scale_rewards", "none"),
    ("num_iterations", "2", "algo.num_iterations", 2),
    ("mask_truncated_completions", "true", "algo.mask_truncated_completions", True),
    ("reward_weights", "[1.0, 0.5]", "algo.reward_weights", [1.0, 0.5]),
]


def get(cfg, dotted):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


@pytest.mark.parametrize("trl, raw, dotted, want", CASES, ids=[f"{c[0]}={c[1]}" for c in CASES])
def test_each_trl_flag_sets_its_key(trl, raw, dotted, want):
    assert TRL_NAMES[trl][0] == dotted
    cfg = cli(f"--{trl}", raw)
    got = get(cfg, dotted)
    assert got == (pytest.approx(want) if isinstance(want, float) else want)
    # The --name=value spelling too.
    assert get(cli(f"--{trl}={raw}"), dotted) == got


def test_every_trl_name_is_tested():
    assert {c[0] for c in CASES} | {"epsilon"} == set(TRL_NAMES)


def test_epsilon_sets_both_bounds_unless_epsilon_high_is_given(tmp_path):
    cfg = cli("--epsilon", "0.3")
    assert (cfg.algo.eps_low, cfg.algo.eps_high) == (0.3, 0.3)  # TRL: epsilon_high defaults to epsilon
    cfg = cli("--epsilon", "0.2", "--epsilon_high", "0.28")
    assert (cfg.algo.eps_low, cfg.algo.eps_high) == (0.2, 0.28)
    cfg = cli("--epsilon", "0.1", "--algo.eps_high", "0.4")
    assert (cfg.algo.eps_low, cfg.algo.eps_high) == (0.1, 0.4)
    # eps_high from the file survives an epsilon on the command line.
    path = tmp_path / "c.yaml"
    path.write_text("algo:\n  eps_high: 0.28\n")
    cfg = cli("--config", str(path), "--epsilon", "0.15")
    assert (cfg.algo.eps_low, cfg.algo.eps_high) == (0.15, 0.28)


def test_trl_names_in_yaml_at_top_level(tmp_path):
    path = tmp_path / "trl.yaml"
    path.write_text("max_steps: 7\nlearning_rate: 3.0e-6\nbf16: true\nnum_generations: 4\nscale_rewards: batch\n"
                    "report_to: [tensorboard]\nloss_type: dr_grpo\nepsilon_high: 0.28\n"
                    "rollout:\n  max_completion_length: 64\n")
    cfg = load_config(str(path))
    assert cfg.train.max_steps == 7 and cfg.optim.lr == pytest.approx(3e-6)
    assert cfg.train.mixed_precision == "bf16" and cfg.rollout.num_generations == 4
    assert cfg.algo.scale_rewards == "batch" and cfg.train.report_to == "tensorboard"
    assert cfg.algo.loss_type == "dr_grpo" and cfg.algo.eps_high == 0.28 and cfg.algo.eps_low == 0.2
    assert cfg.rollout.max_completion_length == 64
    # The command line overrides the file, whichever name either uses.
    cfg = load_config(str(path), ["--train.max_steps", "3", "--num_generations", "6"])
    assert cfg.train.max_steps == 3 and cfg.rollout.num_generations == 6
    path2 = tmp_path / "dotted.yaml"
    path2.write_text("train:\n  max_steps: 40\n")
    assert parse_cli(["--config", str(path2), "--max_steps", "5"]).train.max_steps == 5


def test_dotted_overrides_and_config_file_still_work():
    cfg = parse_cli(["--config", "configs/tiny_cpu.yaml", "--train.max_steps", "3", "--max_completion_length", "12"])
    assert cfg.train.max_steps == 3 and cfg.rollout.max_completion_length == 12
    assert cfg.train.output_dir == "runs/demo/tgrpo" and cfg.rollout.num_generations == 8


@pytest.mark.parametrize("args, names", [
    (["--max_steps", "5", "--train.max_steps", "6"], ["max_steps", "train.max_steps"]),
    (["--epsilon", "0.2", "--algo.eps_low", "0.3"], ["epsilon", "algo.eps_low"]),
    (["--epsilon_high", "0.28", "--algo.eps_high", "0.3"], ["epsilon_high", "algo.eps_high"]),
    (["--bf16", "true", "--train.mixed_precision", "bf16"], ["bf16", "train.mixed_precision"]),
    (["--importance_sampling_level", "sequence", "--algo.importance_level", "token"],
     ["importance_sampling_level", "algo.importance_level"]),
    (["--learning_rate", "1e-5", "--optim.lr", "1e-5"], ["learning_rate", "optim.lr"]),  # even when equal
])
def test_trl_name_and_its_dotted_key_together_are_an_error(args, names):
    with pytest.raises(ConfigError) as e:
        cli(*args)
    for name in names:
        assert f"'{name}'" in str(e.value)
    assert "the command line" in str(e.value)


def test_same_setting_twice_in_a_yaml_file_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 5\ntrain:\n  max_steps: 6\n")
    with pytest.raises(ConfigError, match=r"'max_steps' \(TRL name for train.max_steps\) and 'train.max_steps'") as e:
        load_config(str(path))
    assert str(path) in str(e.value)


def test_two_trl_names_of_one_key_are_an_error(monkeypatch):
    import videor1.config as C

    monkeypatch.setitem(C.TRL_NAMES, "lr_alias", ("optim.lr", None))  # no two real TRL names share a key today
    with pytest.raises(ConfigError, match=r"'learning_rate' and 'lr_alias', both for optim.lr"):
        cli("--learning_rate", "1e-5", "--lr_alias", "2e-5")


def test_unsupported_trl_names_and_values_are_clear():
    with pytest.raises(ConfigError) as e:
        cli("--use_vllm", "true")
    msg = str(e.value)
    assert "unknown config key 'use_vllm'" in msg and "'epsilon_high'" in msg and "'max_steps'" in msg
    with pytest.raises(ConfigError, match=r"loss_type 'cispo' is not implemented here; supported: \['grpo', 'bnpo', "
                                          r"'dr_grpo', 'dapo'\]"):
        cli("--loss_type", "cispo")
    with pytest.raises(ConfigError, match=r"config key 'algo.loss_type' must be a string, got 7"):
        cli("--loss_type", "7")  # a non-string: our choices check names our key
    with pytest.raises(ConfigError, match="one backend at a time"):
        cli("--report_to", "[tensorboard, wandb]")
    with pytest.raises(ConfigError, match="'all' is not supported"):
        cli("--report_to", "all")
    with pytest.raises(ConfigError, match=r"lr_scheduler_type 'polynomial' is not supported"):
        cli("--lr_scheduler_type", "polynomial")
    with pytest.raises(ConfigError, match=r"'bf16' \(TRL name for train.mixed_precision\).*true or false"):
        cli("--bf16", "yes please")
    with pytest.raises(ConfigError, match=r"'algo.scale_rewards' must be one of \['group', 'batch', 'none'\]"):
        cli("--scale_rewards", "token")


def test_scale_rewards_bools_still_load_from_yaml(tmp_path):
    for raw, want in (("true", "group"), ("false", "none"), ("batch", "batch")):
        path = tmp_path / f"{raw}.yaml"
        path.write_text(f"algo:\n  scale_rewards: {raw}\n")
        assert load_config(str(path)).algo.scale_rewards == want
    assert load_config(None, ["--algo.scale_rewards", "false"]).algo.scale_rewards == "none"
    assert to_dict(load_config())["algo"]["scale_rewards"] == "group"


@pytest.mark.parametrize("value", ["nan", "inf", ".inf", "-.inf"])
def test_lr_must_be_finite(value):
    with pytest.raises(ConfigError, match=r"'optim.lr' must be (a finite number|> 0)"):
        cli("--optim.lr", value)
    with pytest.raises(ConfigError, match="optim.lr"):
        cli("--learning_rate", value)
    assert math.isfinite(cli("--optim.lr", "1e-3").optim.lr)


def test_max_steps_zero_or_minus_one_means_by_epochs():
    from videor1.sampler import PromptSampler
    from videor1.train import step_count

    sampler = PromptSampler(40, 0, 0, 1, True)
    for steps in ("0", "-1"):
        cfg = cli("--max_steps", steps, "--num_train_epochs", "2", "--per_device_train_batch_size", "4")
        assert step_count(cfg, sampler) == 20  # 2 epochs x 40 rows / 4 prompts a step
    assert step_count(cli("--max_steps", "3"), sampler) == 3
