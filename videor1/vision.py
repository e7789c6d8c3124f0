"""Video and image input for Qwen2.5-VL: decode, sample frames, resize, patchify.

    frames, meta = load_video(path, fps=2.0, min_frames=4, max_frames=16)   # uint8 [T, H, W, 3]
    pixel_values, grid_thw = frames_to_patches(frames, min_pixels=..., max_pixels=...)
    img = load_image(path)                                                   # uint8 [H, W, 3]
    pixel_values, grid_thw = image_to_patches(img, min_pixels=..., max_pixels=...)

Frame sampling is qwen-vl-utils' rule (what Video-R1 trained on); frames_to_patches and
image_to_patches equal transformers' Qwen2VLVideoProcessor / Qwen2VLImageProcessor outputs bit for
bit (torchvision's antialiased bicubic uint8 resize, CLIP normalisation, merge-size-2 patch order),
computed by the fused C++/CUDA op torch.ops.videor1.frames_to_patches (csrc/, docs/frame_to_patch.md).

A file that cannot be opened or decoded raises VideoDecodeError / ImageDecodeError (both
MediaDecodeError) with the path and the backend's reason; nothing is ever substituted for it.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Qwen2.5-VL vision geometry.
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: resized sides are multiples of this
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176

# qwen-vl-utils' frame-sampling constants.
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768

# Video-R1 trains on 16 frames of 128*28*28 pixels; images default to Qwen2VLImageProcessor's.
VIDEO_PIXELS = 128 * 28 * 28
# Video-R1's vendored qwen-vl-utils (src/qwen-vl-utils/src/qwen_vl_utils/vision_process.py):
# VIDEO_MIN_PIXELS = VIDEO_MAX_PIXELS = 128*28*28 and VIDEO_TOTAL_PIXELS = int(128000*28*28*0.9)
# (unless its VIDEO_MAX_PIXELS environment variable is set; Video-R1's scripts do not set it).
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200

VIDEO_BACKENDS = ("decord", "pyav", "torchcodec")


class MediaDecodeError(RuntimeError):
    """A media file could not be opened or decoded. Carries the path, the backend and its reason."""

    def __init__(self, path: str, backend: str, reason: str):
        self.path = path
        self.backend = backend
        self.reason = reason
        super().__init__(f"{self.kind} {path!r} could not be decoded ({backend}): {reason}")

    kind = "media file"


class VideoDecodeError(MediaDecodeError):
    """A video file is missing, truncated, not a video, or too short to sample."""

    kind = "video"


class ImageDecodeError(MediaDecodeError):
    """An image file is missing, truncated or not an image."""

    kind = "image"


@dataclass(frozen=True)
class VideoMeta:
    """What load_video sampled, and the timing Qwen2.5-VL's M-RoPE needs.

    source_fps: the container's average frame rate; total_frames: frames in the file;
    frame_indices / timestamps (seconds): the sampled frames; sample_fps = T / total * source_fps
    (qwen-vl-utils' video_sample_fps); second_per_grid_t = TEMPORAL_PATCH_SIZE / sample_fps (the
    processor's second_per_grid_ts entry for this video); height, width: decoded frame size.
    """

    path: str
    backend: str
    source_fps: float
    total_frames: int
    frame_indices: tuple[int, ...]
    timestamps: tuple[float, ...]
    sample_fps: float
    second_per_grid_t: float
    height: int
    width: int


# ------------------------------------------------------------------------------------------------
# Sizes and frame sampling


def smart_resize(
    height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = 56 * 56, max_pixels: int = 14 * 14 * 4 * 1280
) -> tuple[int, int]:
    """The resized (height, width) transformers' Qwen2-VL processors use: both multiples of
    `factor`, about the same aspect ratio, area within [min_pixels, max_pixels] (rounded as
    transformers does: Python's round, half to even; floor when shrinking, ceil when growing).

    Raises ValueError for a non-positive side or an aspect ratio over 200 (transformers' message).
    """
    if not (_is_int(height) and _is_int(width)) or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive integers, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def sample_frame_indices(
    num_frames: int, source_fps: float, *, fps: float = 2.0, min_frames: int = FPS_MIN_FRAMES, max_frames: int = 16
) -> list[int]:
    """Indices of the frames to decode, as qwen-vl-utils samples them (smart_nframes with explicit
    min_frames / max_frames, then torch.linspace(0, num_frames - 1, n).round()).

    n = num_frames / source_fps * fps, clamped to [ceil_2(min_frames), floor_2(max_frames)] and to
    num_frames, then floored to an even count. Raises ValueError when that leaves fewer than 2
    frames (a video of one frame) or on non-positive arguments.
    """
    if not _is_int(num_frames) or num_frames <= 0:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if not (isinstance(source_fps, (int, float)) and math.isfinite(source_fps) and source_fps > 0):
        raise ValueError(f"source_fps must be a positive number, got {source_fps!r}")
    _check_sampling_args(fps, min_frames, max_frames)
    lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    hi = math.floor(max_frames / FRAME_FACTOR) * FRAME_FACTOR
    n = num_frames / source_fps * fps
    n = min(min(max(n, lo), hi), num_frames)
    n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= num_frames:
        raise ValueError(f"cannot sample {n} frames from a video of {num_frames}: need {FRAME_FACTOR}..{num_frames}")
    return torch.linspace(0, num_frames - 1, n).round().long().tolist()


def _check_sampling_args(fps, min_frames, max_frames) -> None:
    if not (isinstance(fps, (int, float)) and not isinstance(fps, bool) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    for name, value in (("min_frames", min_frames), ("max_frames", max_frames)):
        if not _is_int(value) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


# ------------------------------------------------------------------------------------------------
# Decoding


def load_video(
    path: str | os.PathLike,
    *,
    fps: float = 2.0,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int = 16,
    backend: str = "auto",
) -> tuple[torch.Tensor, VideoMeta]:
    """Decode the frames sample_frame_indices picks: uint8 [T, H, W, 3] (RGB) and a VideoMeta.

    backend: "decord" (the default when importable), "pyav" or "torchcodec"; "auto" picks the first
    importable. Raises VideoDecodeError (path + backend's reason) for a missing, unreadable,
    truncated or non-video file and for a video too short to sample; ValueError for bad arguments.
    """
    path = os.fspath(path)
    _check_sampling_args(fps, min_frames, max_frames)  # before decoding: bad arguments are not decode errors
    backend = _pick_backend(backend)
    if not os.path.isfile(path):
        raise VideoDecodeError(path, backend, "no such file")
    read = {"decord": _read_decord, "pyav": _read_pyav, "torchcodec": _read_torchcodec}[backend]
    sample = functools.partial(_sample_or_raise, path, backend, fps, min_frames, max_frames)  # (total, source_fps)
    frames, source_fps, total, idx = read(path, sample)
    if frames.ndim != 4 or frames.shape[0] != len(idx) or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise VideoDecodeError(path, backend, f"decoded an unexpected array {frames.dtype} {tuple(frames.shape)}")
    sample_fps = len(idx) / max(total, 1e-6) * source_fps
    meta = VideoMeta(
        path=path,
        backend=backend,
        source_fps=float(source_fps),
        total_frames=int(total),
        frame_indices=tuple(int(i) for i in idx),
        timestamps=tuple(float(i) / source_fps for i in idx),
        sample_fps=float(sample_fps),
        second_per_grid_t=TEMPORAL_PATCH_SIZE / sample_fps,
        height=int(frames.shape[1]),
        width=int(frames.shape[2]),
    )
    return torch.from_numpy(np.ascontiguousarray(frames)), meta


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to RGB uint8 [H, W, 3]. Transparent images are composited on white,
    as qwen-vl-utils does (Video-R1's image path); no EXIF rotation, as there.

    Raises ImageDecodeError (path + Pillow's reason) for a missing, truncated or non-image file.
    """
    from PIL import Image

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageDecodeError(path, "pillow", "no such file")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: Pillow is lazy and would fail later, or not at all
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                rgb = Image.new("RGB", rgba.size, (255, 255, 255))
                rgb.paste(rgba, mask=rgba.split()[3])
            else:
                rgb = img.convert("RGB")
            array = np.asarray(rgb, dtype=np.uint8).copy()
    except Exception as e:  # Pillow raises several types (UnidentifiedImageError, OSError, SyntaxError...)
        raise ImageDecodeError(path, "pillow", f"{type(e).__name__}: {e}") from e
    return torch.from_numpy(array)


def _pick_backend(backend: str) -> str:
    if backend == "auto":
        for name, module in (("decord", "decord"), ("pyav", "av"), ("torchcodec", "torchcodec")):
            if importlib.util.find_spec(module) is not None:
                return name
        raise ImportError("no video backend is installed: install decord, av (PyAV) or torchcodec")
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {VIDEO_BACKENDS}, got {backend!r}")
    module = {"decord": "decord", "pyav": "av", "torchcodec": "torchcodec"}[backend]
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"video backend {backend!r} requested but the {module!r} package is not installed")
    return backend


def _sample_or_raise(path, backend, fps, min_frames, max_frames, total, source_fps) -> list[int]:
    if not (source_fps and math.isfinite(source_fps) and source_fps > 0):
        raise VideoDecodeError(path, backend, f"no usable frame rate (got {source_fps!r})")
    if total < FRAME_FACTOR:
        raise VideoDecodeError(path, backend, f"has {total} frame(s); sampling needs at least {FRAME_FACTOR}")
    return sample_frame_indices(total, source_fps, fps=fps, min_frames=min_frames, max_frames=max_frames)


def _read_decord(path, sample):
    import decord

    try:
        vr = decord.VideoReader(path)
        total, source_fps = len(vr), float(vr.get_avg_fps())
    except Exception as e:
        raise VideoDecodeError(path, "decord", f"{type(e).__name__}: {e}") from e
    idx = sample(total, source_fps)
    try:
        frames = vr.get_batch(idx).asnumpy()
    except Exception as e:
        raise VideoDecodeError(path, "decord", f"{type(e).__name__}: {e}") from e
    return frames, source_fps, total, idx


def _read_pyav(path, sample):
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "pyav", "the file has no video stream")
            stream = container.streams.video[0]
            source_fps = float(stream.average_rate) if stream.average_rate else 0.0
            total = stream.frames or _count_packets(container, stream)
            idx = sample(total, source_fps)
            wanted, frames, decoded = set(idx), {}, 0
            for frame in container.decode(stream):  # presentation order, as decord indexes frames
                if decoded in wanted:
                    frames[decoded] = frame.to_ndarray(format="rgb24")
                decoded += 1
                if decoded > idx[-1]:
                    break
    except VideoDecodeError:
        raise
    except Exception as e:
        raise VideoDecodeError(path, "pyav", f"{type(e).__name__}: {e}") from e
    if len(frames) != len(wanted):
        raise VideoDecodeError(path, "pyav", f"decoded {decoded} of {total} frames; the file is truncated or corrupt")
    return np.stack([frames[i] for i in idx]), source_fps, total, idx


def _count_packets(container, stream) -> int:
    count = sum(1 for packet in container.demux(stream) if packet.size > 0)
    container.seek(0)
    return count


def _read_torchcodec(path, sample):
    from torchcodec.decoders import VideoDecoder

    try:
        decoder = VideoDecoder(path, dimension_order="NHWC")
        source_fps = float(decoder.metadata.average_fps or 0.0)
        total = int(decoder.metadata.num_frames or 0)
    except Exception as e:
        raise VideoDecodeError(path, "torchcodec", f"{type(e).__name__}: {e}") from e
    idx = sample(total, source_fps)
    try:
        frames = decoder.get_frames_at(indices=idx).data.numpy()
    except Exception as e:
        raise VideoDecodeError(path, "torchcodec", f"{type(e).__name__}: {e}") from e
    return frames, source_fps, total, idx


# ------------------------------------------------------------------------------------------------
# Frames -> patches


def qwen_vl_utils_video_pixels(num_frames: int, min_pixels: int = VIDEO_PIXELS, max_pixels: int = VIDEO_PIXELS,
                               total_pixels: int = VIDEO_TOTAL_PIXELS) -> tuple[int, float]:
    """The (min_pixels, max_pixels) qwen-vl-utils' fetch_video resizes a video of `num_frames`
    sampled frames within (then smart_resize(H, W, 28, min, max)), with its arguments' meaning:
    max = max(min(max_pixels, total_pixels / num_frames * FRAME_FACTOR), int(min_pixels * 1.05)).
    The max may be fractional (used as is, as there). With Video-R1's values (128*28*28, 128*28*28,
    int(128000*28*28*0.9)) and 16 frames: (100352, 105369)."""
    if not _is_int(num_frames) or num_frames <= 0:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    upper = max(min(max_pixels, total_pixels / num_frames * FRAME_FACTOR), int(min_pixels * 1.05))
    return min_pixels, upper


def frames_to_patches(
    frames: torch.Tensor | np.ndarray,
    *,
    min_pixels: int = VIDEO_PIXELS,
    max_pixels: int = VIDEO_PIXELS,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    frame_order: Sequence[int] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's pixel_values_videos for one video, in one fused pass.

    frames: uint8 [T, H, W, 3] (or [T, 3, H, W]; when both dims 1 and 3 are 3, [T, H, W, 3]),
    T >= 1, on the CPU or a GPU. Each frame is resized to smart_resize(H, W, 28, min_pixels,
    max_pixels) with antialiased bicubic, normalised with the CLIP mean/std, padded to an even T by
    repeating the last frame, and laid out in 2x14x14 patches in merge-size-2 order.
    frame_order: optional permutation of range(T); slot i takes frame frame_order[i] (T-GRPO's
    shuffled copy) without copying the frames.
    dtype: torch.float32 or torch.bfloat16. device: where to compute and return (default: the
    frames' device; uint8 frames are moved there first, asynchronously from pinned memory).

    Returns pixel_values [gt*gh*gw, 1176] (dtype, on device) and grid_thw int64 [3] = (gt, gh, gw)
    on the CPU, with gt = ceil(T/2), gh = h/14, gw = w/14. Equal to
    Qwen2VLVideoProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}) on the
    same frames as [T, 3, H, W]. Raises TypeError / ValueError naming the bad argument.
    """
    frames = _as_uint8_tensor(frames, "frames")
    if frames.dim() != 4:
        raise ValueError(f"frames must have rank 4 ([T, H, W, 3] or [T, 3, H, W]), got shape {tuple(frames.shape)}")
    return _patchify(frames, min_pixels, max_pixels, dtype, device, frame_order, what="frames")


def image_to_patches(
    image: torch.Tensor | np.ndarray,
    *,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's pixel_values for one image: uint8 [H, W, 3] (or [3, H, W]) ->
    pixel_values [gh*gw, 1176] (the frame repeated over the temporal patch) and grid_thw int64 [3]
    = (1, gh, gw). Equal to Qwen2VLImageProcessor(size={"shortest_edge": min_pixels,
    "longest_edge": max_pixels}) on the same image. Defaults are that processor's pixel bounds.
    """
    image = _as_uint8_tensor(image, "image")
    if image.dim() != 3:
        raise ValueError(f"image must have rank 3 ([H, W, 3] or [3, H, W]), got shape {tuple(image.shape)}")
    return _patchify(image.unsqueeze(0), min_pixels, max_pixels, dtype, device, None, what="image")


def _patchify(frames, min_pixels, max_pixels, dtype, device, frame_order, what):
    channels_last = frames.shape[-1] == 3
    if not channels_last and frames.shape[1] != 3:
        raise ValueError(f"{what} must have 3 channels (last or after the frame dim), got shape {tuple(frames.shape)}")
    if frames.shape[0] == 0:
        raise ValueError(f"{what} has zero frames")
    height, width = (frames.shape[1], frames.shape[2]) if channels_last else (frames.shape[2], frames.shape[3])
    if height == 0 or width == 0:
        raise ValueError(f"{what} has an empty spatial size: shape {tuple(frames.shape)}")
    if not _is_int(min_pixels) or min_pixels <= 0:
        raise ValueError(f"min_pixels must be a positive integer, got {min_pixels!r}")
    # max_pixels may be fractional: qwen-vl-utils' video bound (qwen_vl_utils_video_pixels) is.
    if not (_is_int(max_pixels) or isinstance(max_pixels, float)) or not (0 < max_pixels < math.inf):
        raise ValueError(f"max_pixels must be a positive number, got {max_pixels!r}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    out_h, out_w = smart_resize(height, width, IMAGE_FACTOR, min_pixels, max_pixels)
    order = _check_frame_order(frame_order, frames.shape[0])

    ops = _ops_module()
    target = torch.device(device) if device is not None else frames.device
    if frames.device != target:
        frames = frames.to(target, non_blocking=frames.device.type == "cpu" and frames.is_pinned())
    if target.type == "cuda" and not ops.cuda_built():
        raise RuntimeError("videor1._C was built without its CUDA kernels; rebuild with VIDEOR1_FORCE_CUDA_BUILD=1")
    # Hand the op whichever dense layout the memory already has (a permuted view costs no copy).
    frames, channels_last = _dense_layout(frames, channels_last)
    pixel_values = torch.ops.videor1.frames_to_patches(frames, channels_last, out_h, out_w, order, dtype)
    gt = (frames.shape[0] + TEMPORAL_PATCH_SIZE - 1) // TEMPORAL_PATCH_SIZE
    grid_thw = torch.tensor([gt, out_h // PATCH_SIZE, out_w // PATCH_SIZE], dtype=torch.int64)
    return pixel_values, grid_thw


def _dense_layout(frames: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, bool]:
    if frames.is_contiguous():
        return frames, channels_last
    other = frames.permute(0, 2, 3, 1) if not channels_last else frames.permute(0, 3, 1, 2)
    if other.is_contiguous():
        return other, not channels_last
    return frames.contiguous(), channels_last


def _check_frame_order(frame_order, num_frames: int) -> torch.Tensor | None:
    if frame_order is None:
        return None
    order = torch.as_tensor(frame_order).detach().to("cpu")
    if order.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"frame_order must hold integers, got dtype {order.dtype}")
    order = order.to(torch.int64).reshape(-1)
    if order.numel() != num_frames or not torch.equal(torch.sort(order).values, torch.arange(num_frames)):
        raise ValueError(f"frame_order must be a permutation of range({num_frames}), got {order.tolist()}")
    return order


def _as_uint8_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x if x.flags.writeable else x.copy())
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8, got {x.dtype}")
    return x


def _ops_module():
    try:
        import videor1._C as ops  # registers torch.ops.videor1.*
    except ImportError as e:
        raise ImportError("videor1._C is not built: run `pip install --no-build-isolation -e .` (see Makefile)") from e
    return ops


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
