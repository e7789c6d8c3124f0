"""videor1._C: the op schemas, which devices have kernels, and the C++ argument checks (the second
line of defence behind videor1.vision's Python checks)."""

import pytest
import torch

import videor1._C as C

ops = torch.ops.videor1


def test_cuda_built_reports_a_bool():
    assert isinstance(C.cuda_built(), bool)


def test_schemas():
    assert str(ops.frames_to_patches.default._schema) == (
        "videor1::frames_to_patches(Tensor frames, bool channels_last, int out_h, int out_w, Tensor? frame_order, "
        "ScalarType dtype) -> Tensor"
    )
    assert str(ops.resize_frames.default._schema) == (
        "videor1::resize_frames(Tensor frames, bool channels_last, int out_h, int out_w) -> Tensor"
    )


def test_kernels_are_registered_for_the_devices_that_were_built():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("videor1::frames_to_patches", "CPU") and has("videor1::resize_frames", "CPU")
    # The CUDA kernel exists exactly when the CUDA sources were compiled in (CI forces that).
    assert has("videor1::frames_to_patches", "CUDA") == C.cuda_built()


def test_op_output_shape_and_padding_slot():
    frames = torch.randint(0, 256, (3, 56, 84, 3), dtype=torch.uint8)
    out = ops.frames_to_patches(frames, True, 56, 84, None, torch.float32)
    assert out.shape == (2 * 4 * 6, 1176) and out.dtype == torch.float32
    # T = 3 is padded with a copy of the last frame: in the second temporal group the two
    # temporal halves of each channel's 392 columns are equal.
    second = out[24:].view(24, 3, 2, 196)
    assert torch.equal(second[:, :, 0], second[:, :, 1])
    first = out[:24].view(24, 3, 2, 196)
    assert not torch.equal(first[:, :, 0], first[:, :, 1])


def test_op_accepts_non_contiguous_frames():
    frames = torch.randint(0, 256, (2, 56, 112, 3), dtype=torch.uint8)
    strided = torch.stack([frames, frames], dim=3).flatten(2, 3)[:, :, ::2]  # every other column
    assert not strided.is_contiguous()
    assert torch.equal(
        ops.frames_to_patches(strided, True, 28, 56, None, torch.float32),
        ops.frames_to_patches(frames, True, 28, 56, None, torch.float32),
    )


U8 = torch.zeros(2, 56, 56, 3, dtype=torch.uint8)


@pytest.mark.parametrize(
    "args,match",
    [
        ((U8.float(), True, 56, 56, None, torch.float32), "frames must be uint8"),
        ((U8[0], True, 56, 56, None, torch.float32), "rank 4"),
        ((U8, False, 56, 56, None, torch.float32), "3 channels at dim 1"),
        ((U8[:, :, :, :2], True, 56, 56, None, torch.float32), "3 channels at dim 3"),
        ((U8[:0], True, 56, 56, None, torch.float32), "zero frames"),
        ((U8, True, 50, 56, None, torch.float32), "multiples of 28"),
        ((U8, True, 0, 56, None, torch.float32), "must be positive"),
        ((U8, True, 56, 56, torch.tensor([1, 1]), torch.float32), "permutation of range\\(2\\)"),
        ((U8, True, 56, 56, torch.tensor([0, 1, 2]), torch.float32), "permutation of range\\(2\\)"),
        ((U8, True, 56, 56, None, torch.float16), "dtype must be float32 or bfloat16"),
    ],
)
def test_op_argument_checks(args, match):
    with pytest.raises(RuntimeError, match=match):
        ops.frames_to_patches(*args)


def test_resize_op_allows_any_output_size_but_checks_frames():
    out = ops.resize_frames(U8, True, 17, 5)
    assert out.shape == (2, 3, 17, 5) and out.dtype == torch.uint8 and out.eq(0).all()
    with pytest.raises(RuntimeError, match="uint8"):
        ops.resize_frames(U8.float(), True, 17, 5)


def test_simd_switch_round_trips():
    active = C.cpu_simd_active()
    try:
        C.set_cpu_simd(False)
        assert C.cpu_simd_active() is False
    finally:
        C.set_cpu_simd(True)
    assert C.cpu_simd_active() is active
