import os

import pytest

from videor1.config import Config, ConfigError, load_config, parse_cli, to_dict


def test_defaults_are_video_r1_settings():
    cfg = load_config()
    assert cfg.rollout.num_generations == 8 and cfg.rollout.num_shuffled == -1
    assert (cfg.algo.alpha, cfg.algo.mu, cfg.algo.beta, cfg.algo.kl_clamp) == (0.3, 0.8, 0.04, 10.0)
    assert cfg.data.video_max_pixels == 128 * 28 * 28 and cfg.data.max_frames == 16
    assert cfg.optim.max_grad_norm == 5.0
    # Video-R1's data path (its vendored qwen-vl-utils) and its GRPO scripts' optimiser
    d = cfg.data
    assert (d.video_pixels, d.video_min_pixels, d.video_total_pixels) == ("qwen_vl_utils", 100352, 90316800)
    assert (d.image_min_pixels, d.image_max_pixels) == (4 * 28 * 28, 256 * 28 * 28)
    assert d.second_per_grid_ts == "fps"  # ours on purpose (README); "one" is Video-R1's effective value
    assert cfg.optim.weight_decay == 0.01
    assert cfg.algo.video_r1_compat_rewards is False


REPO_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")


def test_7b_configs_match_video_r1_scripts():
    for name in ("qwen25vl_7b_tgrpo_8gpu.yaml", "qwen25vl_7b_sft_8gpu.yaml"):
        cfg = load_config(os.path.join(REPO_CONFIGS, name))
        d = cfg.data
        assert (d.video_pixels, d.video_min_pixels, d.video_max_pixels, d.video_total_pixels) == (
            "qwen_vl_utils", 128 * 28 * 28, 128 * 28 * 28, int(128000 * 28 * 28 * 0.9)), name
        assert (d.image_min_pixels, d.image_max_pixels) == (3136, 200704), name
        assert (d.fps, d.max_frames) == (2.0, 16), name
    grpo = load_config(os.path.join(REPO_CONFIGS, "qwen25vl_7b_tgrpo_8gpu.yaml"))
    assert (grpo.optim.lr, grpo.optim.weight_decay, grpo.optim.scheduler) == (1e-6, 0.01, "cosine")  # run_grpo_video.sh
    sft = load_config(os.path.join(REPO_CONFIGS, "qwen25vl_7b_sft_8gpu.yaml"))
    # run_sft_video.sh passes neither: TrainingArguments' defaults, linear and 0.0
    assert (sft.optim.lr, sft.optim.weight_decay, sft.optim.scheduler, sft.optim.grad_accum) == (1e-6, 0.0, "linear", 2)


def test_tiny_demo_configs_keep_their_fixed_sizes_and_no_weight_decay():
    from videor1.rollout import video_pixel_bounds
    from videor1.vision import smart_resize

    for name in ("tiny_cpu.yaml", "tiny_sft_cpu.yaml"):
        cfg = load_config(os.path.join(REPO_CONFIGS, name))
        assert cfg.data.video_pixels == "fixed" and cfg.optim.weight_decay == 0.0, name
        lo, hi = video_pixel_bounds(cfg.data, 8)
        assert (lo, hi) == (3136, 12544) and smart_resize(64, 64, 28, lo, hi) == (56, 56), name


def test_new_choices_are_checked():
    for key, good, bad in (("data.video_pixels", "fixed", "auto"), ("data.second_per_grid_ts", "one", "1.0"),
                           ("sft.loss_on", "video_r1", "vision")):
        assert load_config(None, [f"--{key}", good]) is not None
        with pytest.raises(ConfigError, match=key):
            load_config(None, [f"--{key}", bad])


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
