// Host-side pieces shared by the CPU and CUDA ops: argument checks and the per-axis fixed-point
// filters built from frame_to_patch.h. Defined in frame_to_patch_cpu.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace videor1 {

// One axis of the separable resize, ready for the kernels: output pixel i reads input pixels
// [start[i], start[i] + taps) with int16 weights weights[i*taps .. i*taps + taps) (zero padded),
// and start[i] + taps <= in_size always holds, so kernels may read all `taps` inputs.
// in_size == out_size is the identity (torchvision skips that pass; one tap of 1.0 is the same).
struct AxisFilter {
  int64_t in_size = 0;
  int64_t out_size = 0;
  int taps = 0;
  int precision = 0;
  std::vector<int32_t> start;
  std::vector<int16_t> weights;
  // The same weights as int32 pairs (w[2k] | w[2k+1] << 16, zero past `taps`), for vpmaddwd.
  int pairs = 0;
  std::vector<int32_t> weight_pairs;
};

AxisFilter make_axis_filter(int64_t in_size, int64_t out_size);

struct FrameGeometry {
  int64_t T, H, W;        // source frames
  int64_t out_h, out_w;   // resized size (multiples of 28 for patches)
  bool channels_last;     // frames are [T, H, W, 3] (true) or [T, 3, H, W] (false)
};

// Validates uint8 frames of rank 4 with 3 channels where `channels_last` says, at least one
// frame, and positive output sizes. `need_patch_grid` also requires multiples of 28.
FrameGeometry check_frames_args(const at::Tensor& frames, bool channels_last, int64_t out_h, int64_t out_w,
                                bool need_patch_grid);

// Validates an optional permutation of range(T); returns it (identity when absent).
std::vector<int64_t> check_frame_order(const std::optional<at::Tensor>& frame_order, int64_t T);

void check_patch_dtype(at::ScalarType dtype);

}  // namespace videor1
