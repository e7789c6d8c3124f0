"""The CUDA frame-to-patch op equals the C++ op: the cases tests/test_frame_to_patch.py's CUDA tests
leave out (CUDA only; skipped without a GPU or without a CUDA build of videor1._C).

tests/test_frame_to_patch.py::test_cuda_equals_cpu covers 720p, 4K, odd frame counts (1, 3, 5, 7),
channels-first input and bf16, always with a frame_order permutation; test_cuda_from_pinned_host_frames
covers pinned host frames. Here: frame_order=None (the ordered rollouts' path), frame_order against
permuting the frames first, non-contiguous views (a channels-first view of channels-last frames and
the reverse, strided columns, a cropped window, every other frame), hard-edged content (bicubic
overshoot: the uint8 clamping), a frame size that needs no resize, extreme aspect ratios at the
training size, 16 x 720p at the evaluation size, the per-image op, and repeated calls.
"""

import pytest
import torch

import videor1._C as C
from videor1.vision import frames_to_patches, image_to_patches

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and C.cuda_built()),
    reason="no GPU here (or videor1._C built without CUDA): the CUDA kernel is compiled and linked but not run",
)

TRAIN, EVAL = 128 * 28 * 28, 256 * 28 * 28


def random_frames(t, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, h, w, 3), dtype=torch.uint8, generator=g)


def edge_frames(t, h, w):
    """Flat regions and hard edges (as tests/test_frame_to_patch.py): bicubic overshoots there."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    frames = []
    for i in range(t):
        checker = (((xx + 3 * i) // 7 + yy // 5) % 2) * 255
        frames.append(torch.stack([checker, 255 - checker, (xx * 255) // max(1, w - 1)], dim=-1))
    return torch.stack(frames).to(torch.uint8)


def assert_cuda_equals_cpu(frames, **kw):
    cpu, grid = frames_to_patches(frames, **kw)
    gpu, grid_g = frames_to_patches(frames.cuda(), **kw)
    assert gpu.is_cuda and gpu.dtype == cpu.dtype and torch.equal(grid, grid_g)
    assert torch.equal(gpu.cpu(), cpu)
    return gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "t,h,w,pixels",
    [(16, 720, 1280, TRAIN), (16, 720, 1280, EVAL), (7, 480, 640, EVAL), (1, 28, 28, TRAIN), (2, 100, 1000, TRAIN),
     (3, 1000, 100, TRAIN)],
)
def test_cuda_equals_cpu_in_order(t, h, w, pixels, dtype):
    assert_cuda_equals_cpu(random_frames(t, h, w, seed=t + w), min_pixels=pixels, max_pixels=pixels, dtype=dtype)


@pytest.mark.parametrize("t,h,w", [(16, 360, 640), (2, 100, 1000), (5, 37, 53)])
def test_cuda_equals_cpu_on_hard_edges(t, h, w):
    assert_cuda_equals_cpu(edge_frames(t, h, w), min_pixels=3136, max_pixels=TRAIN)


def test_cuda_without_resize():
    assert_cuda_equals_cpu(random_frames(2, 56, 308, seed=1), min_pixels=3136, max_pixels=20000)


@pytest.mark.parametrize("t", [7, 16])
def test_cuda_frame_order_equals_permuting_first(t):
    frames = random_frames(t, 240, 320, seed=t).cuda()
    perm = torch.randperm(t, generator=torch.Generator().manual_seed(3))
    shuffled, grid = frames_to_patches(frames, min_pixels=3136, max_pixels=TRAIN, frame_order=perm)
    permuted, grid_p = frames_to_patches(frames[perm.cuda()].contiguous(), min_pixels=3136, max_pixels=TRAIN)
    assert torch.equal(shuffled, permuted) and torch.equal(grid, grid_p)
    cpu, _ = frames_to_patches(frames.cpu(), min_pixels=3136, max_pixels=TRAIN, frame_order=perm.tolist())
    assert torch.equal(shuffled.cpu(), cpu)


def test_cuda_views_equal_contiguous_frames():
    thwc = random_frames(6, 200, 300, seed=4)
    want, _ = frames_to_patches(thwc, min_pixels=3136, max_pixels=20000)
    g = thwc.cuda()
    tchw = g.permute(0, 3, 1, 2).contiguous()
    variants = {
        "tchw": tchw,
        "tchw view of thwc": g.permute(0, 3, 1, 2),
        "thwc view of tchw": tchw.permute(0, 2, 3, 1),
        "strided columns": torch.stack([g, g], dim=3).flatten(2, 3)[:, :, ::2],
    }
    for name, frames in variants.items():
        out, _ = frames_to_patches(frames, min_pixels=3136, max_pixels=20000)
        assert torch.equal(out.cpu(), want), name
    # views that select other pixels: equal to the C++ op on the same view
    big = random_frames(12, 260, 400, seed=5)
    for name, view in {"crop": big[:, 30:230, 50:350], "every other frame": big[::2]}.items():
        cpu, _ = frames_to_patches(view, min_pixels=3136, max_pixels=20000)
        gpu_view = {"crop": big.cuda()[:, 30:230, 50:350], "every other frame": big.cuda()[::2]}[name]
        gpu, _ = frames_to_patches(gpu_view, min_pixels=3136, max_pixels=20000)
        assert torch.equal(gpu.cpu(), cpu), name


@pytest.mark.parametrize("h,w", [(28, 28), (480, 640), (50, 600), (1080, 1920)])
def test_cuda_image_to_patches_equals_cpu(h, w):
    image = random_frames(1, h, w, seed=h)[0]
    cpu, grid = image_to_patches(image, min_pixels=3136, max_pixels=256 * 28 * 28)
    gpu, grid_g = image_to_patches(image.cuda(), min_pixels=3136, max_pixels=256 * 28 * 28)
    assert gpu.is_cuda and torch.equal(grid, grid_g) and torch.equal(gpu.cpu(), cpu)


def test_cuda_repeated_calls_are_deterministic():
    frames = random_frames(16, 720, 1280, seed=6).cuda()
    first, _ = frames_to_patches(frames, min_pixels=TRAIN, max_pixels=TRAIN, dtype=torch.bfloat16)
    for _ in range(3):
        again, _ = frames_to_patches(frames, min_pixels=TRAIN, max_pixels=TRAIN, dtype=torch.bfloat16)
        assert torch.equal(again, first)
