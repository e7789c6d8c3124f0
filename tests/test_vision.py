"""videor1.vision: smart_resize, frame sampling, video / image decoding and decode errors.

The mp4 files are written here with PyAV (libx264) into tmp_path; every frame of the test clip has
its own brightness, so the decoded frames identify their own index.
"""

import math

import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

from videor1.vision import (
    ImageDecodeError,
    MediaDecodeError,
    VideoDecodeError,
    load_image,
    load_video,
    sample_frame_indices,
    smart_resize,
)

av = pytest.importorskip("av")

CLIP_FPS = 15
CLIP_FRAMES = 45
BRIGHTNESS_STEP = 5  # frame i is a pattern around level 5*i


def write_mp4(path, frames: np.ndarray, fps: int) -> None:
    """uint8 [T, H, W, 3] -> H.264 mp4 (yuv420p, near-lossless crf)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10", "preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def clip_frames(num_frames=CLIP_FRAMES, height=64, width=96) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    texture = ((xx + 2 * yy) % 16).astype(np.int64)  # a little detail so the encoder has work
    frames = [np.repeat((BRIGHTNESS_STEP * t + texture)[..., None], 3, axis=-1) for t in range(num_frames)]
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    files = {"clip": root / "clip.mp4", "one_frame": root / "one_frame.mp4"}
    write_mp4(files["clip"], clip_frames(), CLIP_FPS)
    write_mp4(files["one_frame"], clip_frames(1), CLIP_FPS)
    data = files["clip"].read_bytes()
    files["truncated"] = root / "truncated.mp4"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["not_video"] = root / "not_video.mp4"
    files["not_video"].write_text("this is not a video\n" * 50)
    files["missing"] = root / "missing.mp4"
    return files


# ------------------------------------------------------------------------------------------------
# smart_resize


SIZES = [1, 13, 14, 27, 28, 29, 41, 42, 56, 99, 100, 224, 239, 333, 360, 480, 512, 720, 1000, 1080, 1280, 1920, 4096]
PIXEL_BOUNDS = [(56 * 56, 28 * 28 * 1280), (128 * 784, 128 * 784), (256 * 784, 256 * 784), (4 * 784, 16 * 784), (3136, 12845056)]


@pytest.mark.parametrize("min_pixels,max_pixels", PIXEL_BOUNDS)
def test_smart_resize_matches_transformers(min_pixels, max_pixels):
    checked = 0
    for h in SIZES:
        for w in SIZES:
            if max(h, w) / min(h, w) > 200:
                continue
            ours = smart_resize(h, w, 28, min_pixels, max_pixels)
            assert ours == hf_smart_resize(h, w, 28, min_pixels, max_pixels), (h, w)
            assert ours[0] % 28 == 0 and ours[1] % 28 == 0
            checked += 1
    assert checked > 400


def test_smart_resize_rounds_half_to_even():
    # 42/28 = 1.5 and 70/28 = 2.5: Python's round gives 2 and 2 (half to even), so 56 and 56.
    assert smart_resize(42, 70, 28, 1, 10**9) == (56, 56) == hf_smart_resize(42, 70, 28, 1, 10**9)


@pytest.mark.parametrize("h,w", [(1, 201), (2000, 9), (10, 2001)])
def test_smart_resize_rejects_aspect_ratio_over_200_like_transformers(h, w):
    with pytest.raises(ValueError, match="aspect ratio"):
        hf_smart_resize(h, w, 28, 3136, 10**7)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(h, w, 28, 3136, 10**7)


def test_smart_resize_accepts_aspect_ratio_of_exactly_200():
    assert smart_resize(5, 1000, 28, 3136, 10**7) == hf_smart_resize(5, 1000, 28, 3136, 10**7)


@pytest.mark.parametrize("h,w", [(0, 10), (10, -1), (2.5, 10)])
def test_smart_resize_rejects_bad_sides(h, w):
    with pytest.raises(ValueError, match="positive integers"):
        smart_resize(h, w)


# ------------------------------------------------------------------------------------------------
# Frame sampling


def qwen_vl_utils_indices(total, video_fps, fps, min_frames, max_frames):
    """Reference: qwen-vl-utils' smart_nframes (FRAME_FACTOR = 2, min_frames / max_frames given)
    then torch.linspace(0, total - 1, nframes).round().long() as in its _read_video_decord
    (QwenLM/Qwen2.5-VL, qwen-vl-utils/src/qwen_vl_utils/vision_process.py), transcribed plainly."""
    min_frames = math.ceil(min_frames / 2) * 2  # ceil_by_factor
    max_frames = math.floor(max_frames / 2) * 2  # floor_by_factor
    nframes = total / video_fps * fps
    nframes = min(min(max(nframes, min_frames), max_frames), total)
    nframes = math.floor(nframes / 2) * 2
    if not (2 <= nframes <= total):
        raise ValueError(nframes)
    return torch.linspace(0, total - 1, nframes).round().long().tolist()


def test_sample_frame_indices_matches_qwen_vl_utils_rule():
    checked = 0
    for total in list(range(2, 70)) + [89, 90, 91, 150, 299, 300, 301, 1000, 7201]:
        for video_fps in (10.0, 23.976, 25.0, 29.97, 30.0, 60.0):
            for fps in (1.0, 2.0, 4.0):
                for min_frames, max_frames in ((4, 16), (4, 768), (2, 8), (5, 15), (1, 64)):
                    expected = qwen_vl_utils_indices(total, video_fps, fps, min_frames, max_frames)
                    got = sample_frame_indices(total, video_fps, fps=fps, min_frames=min_frames, max_frames=max_frames)
                    assert got == expected, (total, video_fps, fps, min_frames, max_frames)
                    checked += 1
    assert checked > 5000


def test_sample_frame_indices_hand_checked():
    # 10 s at 30 fps, 2 fps wanted -> 20 frames, capped at 16: linspace(0, 299, 16) rounded.
    assert sample_frame_indices(300, 30.0, fps=2.0, min_frames=4, max_frames=16) == [
        0, 20, 40, 60, 80, 100, 120, 140, 159, 179, 199, 219, 239, 259, 279, 299,
    ]
    # 3 s at 15 fps -> 6 frames; 1 s at 30 fps -> 2 wanted, raised to min_frames 4.
    assert sample_frame_indices(45, 15.0, fps=2.0) == [0, 9, 18, 26, 35, 44]
    assert sample_frame_indices(30, 30.0, fps=2.0) == [0, 10, 19, 29]
    # Fewer frames than min_frames: all of them, floored to an even count.
    assert sample_frame_indices(3, 30.0, fps=2.0) == [0, 2]


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((1, 30.0), {}, "cannot sample"),
        ((0, 30.0), {}, "num_frames"),
        ((10, 0.0), {}, "source_fps"),
        ((10, 30.0), {"fps": -1.0}, "fps"),
        ((10, 30.0), {"max_frames": 0}, "max_frames"),
    ],
)
def test_sample_frame_indices_rejects_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_frame_indices(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# load_video


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_load_video_samples_the_right_frames(media, backend):
    frames, meta = load_video(media["clip"], fps=2.0, min_frames=4, max_frames=16, backend=backend)
    idx = sample_frame_indices(CLIP_FRAMES, CLIP_FPS, fps=2.0, min_frames=4, max_frames=16)
    assert frames.dtype == torch.uint8 and frames.shape == (len(idx), 64, 96, 3) and frames.is_contiguous()
    assert meta.backend == backend and meta.total_frames == CLIP_FRAMES and meta.source_fps == pytest.approx(CLIP_FPS)
    assert list(meta.frame_indices) == idx
    assert meta.timestamps == pytest.approx([i / CLIP_FPS for i in idx])
    assert meta.sample_fps == pytest.approx(len(idx) / CLIP_FRAMES * CLIP_FPS)
    assert meta.second_per_grid_t == pytest.approx(2 / meta.sample_fps)
    assert (meta.height, meta.width) == (64, 96)
    # Each decoded frame is the source frame it claims to be (brightness 5*i + texture mean 7.5).
    source = torch.from_numpy(clip_frames())[idx].float()
    assert (frames.float() - source).abs().mean() < 2.0
    brightness = frames.float().mean(dim=(1, 2, 3)) - 7.5
    assert torch.allclose(brightness, BRIGHTNESS_STEP * torch.tensor(idx, dtype=torch.float32), atol=1.5)


def test_load_video_decord_and_pyav_give_the_same_frames(media):
    a, meta_a = load_video(media["clip"], backend="decord", max_frames=30)
    b, meta_b = load_video(media["clip"], backend="pyav", max_frames=30)
    assert meta_a.frame_indices == meta_b.frame_indices and len(meta_a.frame_indices) == 6
    assert torch.equal(a, b)


def test_load_video_auto_prefers_decord(media):
    _, meta = load_video(media["clip"])
    assert meta.backend == "decord"


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("name,reason", [("missing", "no such file"), ("truncated", ""), ("not_video", ""),
                                         ("one_frame", "at least 2")])
def test_load_video_raises_decode_error_with_path_and_reason(media, backend, name, reason):
    with pytest.raises(VideoDecodeError) as info:
        load_video(media[name], backend=backend)
    err = info.value
    assert isinstance(err, MediaDecodeError)
    assert err.path == str(media[name]) and err.backend == backend and err.reason
    assert reason in err.reason and str(media[name]) in str(err)


def test_load_video_rejects_bad_arguments(media):
    with pytest.raises(ValueError, match="backend"):
        load_video(media["clip"], backend="ffmpeg")
    with pytest.raises(ValueError, match="fps"):
        load_video(media["clip"], fps=0)
    with pytest.raises(ValueError, match="min_frames"):
        load_video(media["clip"], min_frames=-2)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("torchcodec") is not None, reason="torchcodec is installed"
)
def test_torchcodec_backend_missing_is_an_import_error(media):
    with pytest.raises(ImportError, match="torchcodec"):
        load_video(media["clip"], backend="torchcodec")


# ------------------------------------------------------------------------------------------------
# load_image


def test_load_image_rgb_png_roundtrip(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.dtype == torch.uint8 and img.shape == (17, 23, 3)
    assert torch.equal(img, torch.from_numpy(rgb))


def test_load_image_composites_transparency_on_white(tmp_path):
    from PIL import Image

    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 10, 30)
    rgba[0, :, 3] = 0  # fully transparent row -> white
    rgba[1:, :, 3] = 255  # opaque -> the colour itself
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    img = load_image(tmp_path / "t.png")
    assert img[0].eq(255).all()
    assert img[1:].reshape(-1, 3).eq(torch.tensor([200, 10, 30], dtype=torch.uint8)).all()


def test_load_image_grayscale_becomes_rgb(tmp_path):
    from PIL import Image

    gray = np.arange(60, dtype=np.uint8).reshape(6, 10)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.shape == (6, 10, 3) and all(torch.equal(img[..., c], torch.from_numpy(gray)) for c in range(3))


def test_load_image_raises_decode_error(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    for name in ("truncated.jpg", "text.png", "missing.png"):
        with pytest.raises(ImageDecodeError) as info:
            load_image(tmp_path / name)
        assert isinstance(info.value, MediaDecodeError)
        assert info.value.path == str(tmp_path / name) and info.value.reason
        assert str(tmp_path / name) in str(info.value)


# ------------------------------------------------------------------------------------------------
# qwen-vl-utils' video pixel rule (Video-R1's data path), transcribed from its vendored
# src/qwen-vl-utils/src/qwen_vl_utils/vision_process.py (fetch_video + smart_resize).


def qvu_smart_resize(height, width, factor=28, min_pixels=4 * 28 * 28, max_pixels=256 * 28 * 28):
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qvu_fetch_video_size(nframes, height, width, min_pixels=128 * 28 * 28, video_max_pixels=128 * 28 * 28,
                         total_pixels=int(float(128000 * 28 * 28 * 0.9))):
    max_pixels = max(min(video_max_pixels, total_pixels / nframes * 2), int(min_pixels * 1.05))
    return qvu_smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)


# (width, height): 16:9, 4:3, 3:2, portrait, square, tiny
VIDEO_SIZES = [(1280, 720), (640, 360), (1920, 1080), (640, 480), (320, 240), (720, 480), (480, 854), (360, 640),
               (1080, 1920), (448, 448), (64, 64), (32, 24), (30, 14)]


def test_qwen_vl_utils_video_pixels_are_video_r1s_bounds():
    from videor1.vision import VIDEO_TOTAL_PIXELS, qwen_vl_utils_video_pixels

    assert VIDEO_TOTAL_PIXELS == 90316800
    assert qwen_vl_utils_video_pixels(16) == (100352, 105369)
    assert qwen_vl_utils_video_pixels(4) == (100352, 105369)
    # the total budget binds when the per-frame cap is raised: 90316800 / 16 * 2 = 11289600
    assert qwen_vl_utils_video_pixels(16, 100352, 768 * 28 * 28 * 100) == (100352, 11289600.0)
    assert qwen_vl_utils_video_pixels(16, 3136, 12544, 1000) == (3136, 3292)  # int(3136 * 1.05) floor
    with pytest.raises(ValueError, match="num_frames"):
        qwen_vl_utils_video_pixels(0)


@pytest.mark.parametrize("width,height", VIDEO_SIZES)
@pytest.mark.parametrize("nframes", [4, 16])
def test_qwen_vl_utils_mode_sizes_equal_the_formula(width, height, nframes):
    from videor1.vision import qwen_vl_utils_video_pixels

    lo, hi = qwen_vl_utils_video_pixels(nframes)
    assert smart_resize(height, width, 28, lo, hi) == qvu_fetch_video_size(nframes, height, width)


def test_qwen_vl_utils_mode_hand_checked_sizes():
    from videor1.vision import qwen_vl_utils_video_pixels

    lo, hi = qwen_vl_utils_video_pixels(16)
    fixed = 128 * 28 * 28
    # (width, height) -> (width, height) there vs with the fixed 128*28*28 budget (the numbers)
    assert smart_resize(480, 640, 28, lo, hi)[::-1] == (364, 280)
    assert smart_resize(480, 640, 28, fixed, fixed)[::-1] == (364, 252)
    assert smart_resize(480, 720, 28, lo, hi)[::-1] == (392, 252)
    assert smart_resize(480, 720, 28, fixed, fixed)[::-1] == (364, 252)
    assert smart_resize(64, 64, 28, lo, hi) == (336, 336)  # tiny inputs grow to min_pixels


def test_frames_to_patches_takes_the_fractional_qwen_vl_utils_bound():
    from videor1.vision import frames_to_patches

    frames = torch.zeros(2, 480, 640, 3, dtype=torch.uint8)
    _, grid = frames_to_patches(frames, min_pixels=100352, max_pixels=105369.5)
    assert grid.tolist() == [1, 20, 26]  # 280 x 364
    for bad in (float("nan"), float("inf"), -1.0, True):
        with pytest.raises(ValueError, match="max_pixels"):
            frames_to_patches(frames, min_pixels=3136, max_pixels=bad)
