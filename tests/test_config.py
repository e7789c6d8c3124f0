import pytest

from videor1.config import Config, ConfigError, load_config, parse_cli, to_dict


def test_defaults_are_video_r1_settings():
    cfg = load_config()
    assert cfg.rollout.num_generations == 8 and cfg.rollout.num_shuffled == -1
    assert (cfg.algo.alpha, cfg.algo.mu, cfg.algo.beta, cfg.algo.kl_clamp) == (0.3, 0.8, 0.04, 10.0)
    assert cfg.data.video_max_pixels == 128 * 28 * 28 and cfg.data.max_frames == 16
    assert cfg.optim.max_grad_norm == 5.0


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  num_generations: 4\n  temperature: 0.7\nalgo:\n  rewards: [accuracy]\n")
    cfg = load_config(str(path), ["--rollout.temperature", "1.5", "--train.output_dir=/tmp/x", "--algo.temporal", "false"])
    assert cfg.rollout.num_generations == 4
    assert cfg.rollout.temperature == 1.5
    assert cfg.train.output_dir == "/tmp/x"
    assert cfg.algo.temporal is False
    assert cfg.algo.rewards == ["accuracy"]
    assert to_dict(cfg)["rollout"]["num_generations"] == 4


def test_int_accepted_for_float_and_parse_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1\n")
    cfg = parse_cli(["--config", str(path), "--optim.warmup_ratio", "0.1"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0
    assert cfg.optim.warmup_ratio == pytest.approx(0.1)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["--rollout.foo", "1"], "rollout.foo"),
        (["--nosuch.key", "1"], "nosuch"),
        (["--rollout.num_generations", "1"], "rollout.num_generations"),
        (["--model.dtype", "fp8"], "model.dtype"),
        (["--train.seed", "abc"], "train.seed"),
        (["--algo.temporal", "maybe"], "algo.temporal"),
        (["--data.max_skip_rate", "1.5"], "data.max_skip_rate"),
        (["--algo.rewards", "accuracy"], "algo.rewards"),
        (["--data.min_frames", "32"], "data.min_frames"),
        (["--rollout", "3"], "rollout"),
        # Accepted and never read before: removed, so a config that sets them learns it at once.
        (["--train.log_every", "5"], "train.log_every"),
        (["--data.eval_file", "x.json"], "data.eval_file"),
        (["--rollout.repetition_penalty", "0"], "rollout.repetition_penalty"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_unknown_key_in_yaml_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo:\n  alpha: 0.3\n  temporal_bonus: 1\n")
    with pytest.raises(ConfigError, match=r"algo\.temporal_bonus"):
        load_config(str(path))


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_override_without_value():
    with pytest.raises(ConfigError, match="no value"):
        load_config(None, ["--train.seed"])


def test_config_files_in_repo_load():
    import glob

    files = glob.glob("configs/*.yaml")
    for f in files:
        assert isinstance(load_config(f), Config), f


def test_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-6\n")
    assert load_config(str(path), ["--optim.weight_decay", "2e-3"]).optim.lr == 1e-6
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_config(None, ["--optim.lr", "fast"])
