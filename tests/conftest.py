"""Session fixtures shared by the trainer, SFT and eval tests: one tiny checkpoint, one dataset."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny Qwen2.5-VL checkpoint directory (built in-process, deterministic by seed; vLLM serves its shape)."""
    from videor1.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny"), seed=0)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A small synthetic Video-R1 dataset: 12 rows cycling every task (videos and images), 8 frames of 64x64."""
    from videor1.synthetic import generate_dataset

    return generate_dataset(str(tmp_path_factory.mktemp("synth")), n=12, seed=0, frames=8, fps=8, size=64)


@pytest.fixture(scope="session")
def synth_rows(synth_data):
    """synth_data's rows (list of dicts)."""
    import json

    with open(synth_data) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def synth_data_cfg():
    """A DataConfig that reads synth_data as the tests do: every frame (8 fps), 4x4 to 8x8 patches per
    frame. Shared by the session: read it, do not change it."""
    from videor1.config import Config

    data = Config().data
    data.fps, data.video_min_pixels, data.video_max_pixels = 8.0, 3136, 12544
    data.image_min_pixels, data.image_max_pixels = 3136, 12544
    return data
