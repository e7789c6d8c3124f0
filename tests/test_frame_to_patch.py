"""frames_to_patches / image_to_patches against transformers' Qwen2-VL processors (the oracle),
the fused resize against torchvision, the AVX2 path against the scalar path, and CUDA against CPU.
"""

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as tvF
from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor
from transformers.utils.constants import OPENAI_CLIP_STD

import videor1._C as C
from videor1.vision import frames_to_patches, image_to_patches, smart_resize

# One uint8 level after normalisation, for the channel with the smallest std (the largest step).
ONE_LEVEL = 1.0 / (255.0 * min(OPENAI_CLIP_STD))


def random_frames(t, h, w, seed=0, layout="thwc"):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (t, h, w, 3), dtype=torch.uint8, generator=g)
    return frames if layout == "thwc" else frames.permute(0, 3, 1, 2).contiguous()


def edge_frames(t, h, w):
    """Flat regions and hard edges: bicubic overshoots there, so the uint8 clamping matters."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    frames = []
    for i in range(t):
        checker = (((xx + 3 * i) // 7 + yy // 5) % 2) * 255
        frames.append(torch.stack([checker, 255 - checker, (xx * 255) // max(1, w - 1)], dim=-1))
    return torch.stack(frames).to(torch.uint8)


def hf_video(frames_thwc, min_pixels, max_pixels):
    proc = Qwen2VLVideoProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    out = proc(videos=[frames_thwc.permute(0, 3, 1, 2).contiguous()], return_tensors="pt", cap_pixels_per_frame=False)
    return out["pixel_values_videos"], out["video_grid_thw"][0]


def hf_image(image_hwc, min_pixels, max_pixels):
    proc = Qwen2VLImageProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    out = proc(images=[image_hwc.permute(2, 0, 1).contiguous()], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"][0]


def assert_within_one_level(ours, ref):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    diff = (ours - ref).abs().max().item()
    assert diff <= ONE_LEVEL * 1.0001, f"max difference {diff} is more than one uint8 level ({ONE_LEVEL})"


VIDEO_CASES = [
    # T, H, W, min_pixels, max_pixels, content
    (1, 28, 28, 128 * 784, 128 * 784, "noise"),  # tiny single frame, upscaled to 336x336
    (3, 720, 1280, 128 * 784, 128 * 784, "noise"),  # 720p to the training size 224x420
    (7, 480, 640, 256 * 784, 256 * 784, "noise"),  # odd T, evaluation size
    (2, 100, 1000, 3136, 64 * 784, "edges"),  # aspect ratio 10, landscape
    (3, 1000, 100, 3136, 64 * 784, "noise"),  # aspect ratio 10, portrait
    (4, 37, 53, 3136, 12845056, "edges"),  # odd sizes, area within bounds (rounded)
    (5, 56, 300, 3136, 20000, "noise"),  # height unchanged: only the horizontal pass
    (2, 56, 308, 3136, 20000, "noise"),  # no resize at all
    (16, 360, 640, 64 * 784, 256 * 784, "edges"),  # 16 frames within the bounds
]


@pytest.mark.parametrize("t,h,w,min_pixels,max_pixels,content", VIDEO_CASES)
def test_frames_to_patches_matches_video_processor(t, h, w, min_pixels, max_pixels, content):
    frames = random_frames(t, h, w, seed=t * 1000 + h) if content == "noise" else edge_frames(t, h, w)
    ref, ref_grid = hf_video(frames, min_pixels, max_pixels)
    ours, grid = frames_to_patches(frames, min_pixels=min_pixels, max_pixels=max_pixels)
    assert grid.dtype == torch.int64 and grid.tolist() == ref_grid.tolist()
    rh, rw = smart_resize(h, w, 28, min_pixels, max_pixels)
    assert grid.tolist() == [(t + 1) // 2, rh // 14, rw // 14]
    assert_within_one_level(ours, ref)


@pytest.mark.parametrize("t,h,w", [(7, 120, 200), (16, 90, 160)])
def test_frame_order_equals_permuting_the_frames_first(t, h, w):
    frames = random_frames(t, h, w, seed=t)
    perm = torch.randperm(t, generator=torch.Generator().manual_seed(1))
    ours, grid = frames_to_patches(frames, min_pixels=3136, max_pixels=64 * 784, frame_order=perm)
    permuted, grid_p = frames_to_patches(frames[perm], min_pixels=3136, max_pixels=64 * 784)
    assert torch.equal(ours, permuted) and torch.equal(grid, grid_p)
    ref, _ = hf_video(frames[perm], 3136, 64 * 784)
    assert_within_one_level(ours, ref)
    unshuffled, _ = frames_to_patches(frames, min_pixels=3136, max_pixels=64 * 784)
    assert not torch.equal(ours, unshuffled)
    # A list works as well as a tensor.
    assert torch.equal(frames_to_patches(frames, min_pixels=3136, max_pixels=64 * 784, frame_order=perm.tolist())[0], ours)


def test_layouts_and_views_give_the_same_patches():
    thwc = random_frames(3, 70, 90, seed=3)
    ref, _ = frames_to_patches(thwc, min_pixels=3136, max_pixels=20000)
    tchw = thwc.permute(0, 3, 1, 2).contiguous()
    variants = {
        "tchw": tchw,
        "tchw view of thwc": thwc.permute(0, 3, 1, 2),
        "thwc view of tchw": tchw.permute(0, 2, 3, 1),
        "numpy": thwc.numpy(),
        "strided": torch.stack([thwc, thwc], dim=3).flatten(2, 3)[:, :, ::2],  # every other column
    }
    for name, frames in variants.items():
        assert torch.equal(frames_to_patches(frames, min_pixels=3136, max_pixels=20000)[0], ref), name


def test_bfloat16_output_is_the_rounded_float32_output():
    frames = random_frames(3, 100, 150, seed=5)
    f32, grid = frames_to_patches(frames, min_pixels=3136, max_pixels=30000)
    bf16, grid_b = frames_to_patches(frames, min_pixels=3136, max_pixels=30000, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(grid, grid_b)
    assert torch.equal(bf16, f32.to(torch.bfloat16))


@pytest.mark.parametrize(
    "h,w,min_pixels,max_pixels",
    [(28, 28, 56 * 56, 28 * 28 * 1280), (480, 640, 56 * 56, 28 * 28 * 1280), (50, 600, 3136, 128 * 784)],
)
def test_image_to_patches_matches_image_processor(h, w, min_pixels, max_pixels):
    image = random_frames(1, h, w, seed=h + w)[0]
    ref, ref_grid = hf_image(image, min_pixels, max_pixels)
    ours, grid = image_to_patches(image, min_pixels=min_pixels, max_pixels=max_pixels)
    assert grid.tolist() == ref_grid.tolist() and grid[0] == 1
    assert_within_one_level(ours, ref)
    assert torch.equal(image_to_patches(image.permute(2, 0, 1), min_pixels=min_pixels, max_pixels=max_pixels)[0], ours)


def test_image_to_patches_defaults_are_the_image_processor_defaults():
    image = random_frames(1, 200, 300, seed=9)[0]
    proc = Qwen2VLImageProcessor()
    ref = proc(images=[image.permute(2, 0, 1)], return_tensors="pt")["pixel_values"]
    assert_within_one_level(image_to_patches(image)[0], ref)


# ------------------------------------------------------------------------------------------------
# The kernel pieces: the resize is torchvision's, bit for bit; AVX2 and scalar paths agree.


@pytest.mark.parametrize(
    "t,h,w,out_h,out_w",
    [(2, 720, 1280, 224, 420), (1, 28, 28, 56, 56), (3, 100, 37, 56, 28), (1, 33, 333, 28, 280),
     (1, 5, 900, 28, 420), (2, 57, 61, 57, 30), (1, 31, 45, 200, 45)],
)
def test_resize_is_bit_exact_with_torchvision(t, h, w, out_h, out_w):
    frames = random_frames(t, h, w, seed=h * w, layout="tchw")
    ref = tvF.resize(frames, [out_h, out_w], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(torch.ops.videor1.resize_frames(frames, False, out_h, out_w), ref)
    thwc = frames.permute(0, 2, 3, 1).contiguous()
    assert torch.equal(torch.ops.videor1.resize_frames(thwc, True, out_h, out_w), ref)


@pytest.mark.skipif(not C.cpu_simd_active(), reason="this CPU has no AVX2: only the scalar path exists")
@pytest.mark.parametrize("t,h,w,layout", [(3, 720, 1280, "thwc"), (2, 99, 301, "tchw"), (1, 28, 28, "thwc")])
def test_avx2_and_scalar_paths_agree(t, h, w, layout):
    frames = random_frames(t, h, w, seed=7, layout=layout)
    args = (frames, layout == "thwc", 224, 420, torch.tensor([t - 1 - i for i in range(t)]), torch.float32)
    simd = torch.ops.videor1.frames_to_patches(*args)
    simd_bf16 = torch.ops.videor1.frames_to_patches(*args[:5], torch.bfloat16)
    try:
        C.set_cpu_simd(False)
        assert not C.cpu_simd_active()
        scalar = torch.ops.videor1.frames_to_patches(*args)
        scalar_bf16 = torch.ops.videor1.frames_to_patches(*args[:5], torch.bfloat16)
    finally:
        C.set_cpu_simd(True)
    assert torch.equal(simd, scalar) and torch.equal(simd_bf16, scalar_bf16)


@pytest.mark.parametrize("threads", [1, 2])
def test_result_does_not_depend_on_thread_count(threads):
    frames = random_frames(5, 200, 300, seed=11)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        ours, _ = frames_to_patches(frames, min_pixels=3136, max_pixels=64 * 784)
    finally:
        torch.set_num_threads(before)
    ref, _ = frames_to_patches(frames, min_pixels=3136, max_pixels=64 * 784)
    assert torch.equal(ours, ref)


# ------------------------------------------------------------------------------------------------
# CUDA


needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and C.cuda_built()),
    reason="no GPU here (or videor1._C built without CUDA): the CUDA kernel is compiled and linked but not run",
)


@needs_cuda
@pytest.mark.parametrize(
    "t,h,w,min_pixels,max_pixels,layout,dtype",
    [
        (16, 720, 1280, 128 * 784, 128 * 784, "thwc", torch.float32),
        (7, 480, 640, 256 * 784, 256 * 784, "tchw", torch.bfloat16),
        (1, 28, 28, 128 * 784, 128 * 784, "thwc", torch.float32),
        (3, 1000, 100, 3136, 64 * 784, "thwc", torch.bfloat16),
        (2, 2160, 3840, 3136, 4 * 128 * 784, "thwc", torch.float32),  # 4K: many shared-memory chunks
        (5, 56, 300, 3136, 20000, "tchw", torch.float32),
    ],
)
def test_cuda_equals_cpu(t, h, w, min_pixels, max_pixels, layout, dtype):
    frames = random_frames(t, h, w, seed=t + h, layout=layout)
    order = torch.randperm(t, generator=torch.Generator().manual_seed(0))
    cpu, grid = frames_to_patches(frames, min_pixels=min_pixels, max_pixels=max_pixels, dtype=dtype, frame_order=order)
    gpu, grid_g = frames_to_patches(
        frames.cuda(), min_pixels=min_pixels, max_pixels=max_pixels, dtype=dtype, frame_order=order
    )
    assert gpu.is_cuda and torch.equal(grid, grid_g)
    assert torch.equal(gpu.cpu(), cpu)


@needs_cuda
def test_cuda_from_pinned_host_frames():
    frames = random_frames(4, 360, 640, seed=2).pin_memory()
    gpu, _ = frames_to_patches(frames, device="cuda")
    cpu, _ = frames_to_patches(frames)
    torch.cuda.synchronize()
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "frames,kwargs,error,match",
    [
        (torch.zeros(2, 28, 28, 3), {}, TypeError, "uint8"),
        (np.zeros((2, 28, 28, 3), np.int32), {}, TypeError, "uint8"),
        ([[1, 2]], {}, TypeError, "torch.Tensor"),
        (torch.zeros(28, 28, 3, dtype=torch.uint8), {}, ValueError, "rank 4"),
        (torch.zeros(2, 28, 28, 4, dtype=torch.uint8), {}, ValueError, "3 channels"),
        (torch.zeros(0, 28, 28, 3, dtype=torch.uint8), {}, ValueError, "zero frames"),
        (torch.zeros(2, 1, 300, 3, dtype=torch.uint8), {}, ValueError, "aspect ratio"),
        (torch.zeros(2, 28, 28, 3, dtype=torch.uint8), {"min_pixels": 2000, "max_pixels": 1000}, ValueError,
         "min_pixels"),
        (torch.zeros(2, 28, 28, 3, dtype=torch.uint8), {"max_pixels": 0}, ValueError, "max_pixels"),
        (torch.zeros(2, 28, 28, 3, dtype=torch.uint8), {"dtype": torch.float16}, ValueError, "dtype"),
        (torch.zeros(3, 28, 28, 3, dtype=torch.uint8), {"frame_order": [0, 0, 1]}, ValueError, "permutation"),
        (torch.zeros(3, 28, 28, 3, dtype=torch.uint8), {"frame_order": [0, 1]}, ValueError, "permutation"),
        (torch.zeros(3, 28, 28, 3, dtype=torch.uint8), {"frame_order": [0.0, 1.0, 2.0]}, TypeError, "integers"),
    ],
)
def test_frames_to_patches_rejects_bad_input(frames, kwargs, error, match):
    with pytest.raises(error, match=match):
        frames_to_patches(frames, **kwargs)


def test_image_to_patches_rejects_bad_input():
    with pytest.raises(ValueError, match="rank 3"):
        image_to_patches(torch.zeros(1, 28, 28, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        image_to_patches(torch.zeros(28, 28, 3))

